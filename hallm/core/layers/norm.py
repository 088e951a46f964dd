"""RMSNorm with an optional fused residual add, through the op table's `rms_norm`."""

from __future__ import annotations

import torch
from torch import nn

from hallm.core.layers.op_context import current_ops


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
        op = current_ops().rms_norm
        assert op is not None  # current_ops() fills every elementwise entry
        self._op = op

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._op(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
