"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension.

    `forward(x)` returns the normalized tensor. `forward(x, residual)` first adds `residual`
    to `x` and returns `(normalized, x + residual)`, so a decoder layer carries its residual
    stream without a separate add kernel per norm (the pattern vLLM uses).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x + residual
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
