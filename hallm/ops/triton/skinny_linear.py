"""Linear layers over few rows through the skinny GEMM: the Triton op table's `linear` entry.

Linear layers whose weight is at most SKINNY_MAX_WEIGHT_BYTES run steps of at most SKINNY_ROWS
rows through `hallm.ops.triton.skinny_gemm`, which streams the weight once with every row in one
tensor-core dot and launches with programmatic dependent launch where the GPU has it; bigger
weights and bigger steps stay with cuBLAS (or its HIP counterpart), which is faster there
(benchmarks/results/gpu.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hallm.ops.triton.target import TritonTarget
from hallm.platforms.ops import LinearKernel, LinearOp, LinearWeights

#: Most rows (tokens) a projection sends to the skinny GEMM instead of cuBLAS.
SKINNY_ROWS = 16
#: Largest weight the skinny GEMM takes: up to a few MB it beats cuBLAS at decode sizes, from
#: tens of MB cuBLAS streams as fast and the skinny launch's fixed costs no longer matter.
SKINNY_MAX_WEIGHT_BYTES = 12 << 20
SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def skinny_input_rows(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> int:
    """The rows of x when this call may take the skinny GEMM, else 0."""
    from hallm.ops.triton.runtime import interpreting

    k = weight.shape[1]
    if x.dim() == 0 or k == 0 or x.dtype != weight.dtype or x.dtype not in SKINNY_DTYPES:
        return 0
    if x.device != weight.device or not (x.is_cuda or interpreting()) or not weight.is_contiguous():
        return 0
    rows = x.numel() // k
    return rows if 0 < rows <= max_rows else 0


class SkinnyLinear(LinearKernel):
    """`F.linear` whose few-row calls (decode) run the skinny GEMM."""

    def __init__(self, weights: LinearWeights, target: TritonTarget) -> None:
        from hallm.ops.triton.skinny_gemm import MAX_ROWS, counters_for

        self.weight, self.bias = weights.weight, weights.bias
        self.out_features, self.in_features = self.weight.shape
        self.max_rows = min(SKINNY_ROWS, MAX_ROWS)
        self.target = target
        # Split-K counters, zero between launches; kept so a captured graph reuses them.
        self.counters = counters_for(self.out_features, self.weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = skinny_input_rows(x, self.weight, self.max_rows)
        if not rows:
            return F.linear(x, self.weight, self.bias)
        from hallm.ops.triton.skinny_gemm import skinny_linear

        out = skinny_linear(
            x.reshape(rows, self.in_features),
            self.weight,
            self.bias,
            counters=self.counters,
            target=self.target,
        )
        return out.view(*x.shape[:-1], self.out_features)  # type: ignore[union-attr]


def skinny_fits(weight: torch.Tensor | None) -> bool:
    """A 16-bit contiguous weight small enough for the skinny GEMM to win."""
    return (
        weight is not None
        and weight.dtype in SKINNY_DTYPES
        and weight.is_contiguous()
        and weight.numel() * weight.element_size() <= SKINNY_MAX_WEIGHT_BYTES
    )


def linear_op(target: TritonTarget) -> LinearOp:
    """The table's `linear` entry: the skinny GEMM for small 16-bit weights, else cuBLAS."""

    def make(weights: LinearWeights) -> SkinnyLinear | None:
        return SkinnyLinear(weights, target) if skinny_fits(weights.weight) else None

    return make
