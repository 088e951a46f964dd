"""A linear layer whose kernel comes from the platform's op table (`OpTable.linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hallm.core.layers.op_context import current_ops
from hallm.platforms.ops import BoundLinear, LinearWeights


class Linear(nn.Module):
    """y = x @ weight.T + bias, x [..., in_features] -> [..., out_features].

    Parameters are named as `nn.Linear`'s (`weight` [out, in], `bias` [out]), so checkpoints load
    unchanged. After loading, `prepare_kernels()` asks the table's `linear` entry for a kernel;
    until then, and where the entry declines, `F.linear` runs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features)) if bias else None
        self._make_kernel = current_ops().linear
        self.kernel: BoundLinear | None = None

    def prepare_kernels(self) -> None:
        """Build this layer's kernel from its loaded weights (once; again after a reload)."""
        if self.weight is None:
            return  # the kernel already replaced the weight
        weights = LinearWeights(self.weight.detach(), None if self.bias is None else self.bias.detach())
        made = self._make_kernel(weights) if self._make_kernel is not None else None
        if made is None:
            self.kernel = None
            return
        if made.replaces_weight:
            self.weight = None
            weights = LinearWeights(None, weights.bias)  # type: ignore[arg-type]
        self.kernel = BoundLinear(weights, made)

    def bound(self) -> BoundLinear:
        """The weights and the kernel a decoder-stack kernel may use."""
        if self.kernel is not None:
            return self.kernel
        assert self.weight is not None
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        return BoundLinear(LinearWeights(w, b), lambda x: F.linear(x, w, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.kernel(x)
        return F.linear(x, self.weight, self.bias)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )
