"""Linear layers laid out for the host CPU's matmul libraries.

Measured on a 2-core AVX2 EPYC (torch 2.13, MKL): a GEMV against a wide weight (the LM head,
N=49152) runs 1.8x faster as `x @ W^T` with `W^T` stored contiguous than as `F.linear(x, W)`;
and without native bf16 instructions a bf16 GEMM with more than a couple of rows is ~4x slower
than upcasting both operands to fp32, while a bf16 GEMV (bandwidth-bound) is the faster choice.
With the plugin's native kernels (`hallm_cpu.native`) built, products of few rows go to its GEMV,
which streams fp32 weights at copy bandwidth and widens bf16 weights in registers (measured on
that EPYC, weight 3072x576: fp32 0.15 ms vs MKL 0.18 ms at 1 row, 0.60 vs 0.72 at 16, MKL ahead
from 32; bf16 0.09 ms vs 0.31 ms upcast at 1 row, 1.17 vs 1.32 at 32, upcast ahead from 64).
`optimize_linears` swaps each `nn.Linear` for a module that takes the fast path per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hallm_cpu import native

#: Output widths from which the transposed layout wins for fp32 GEMV (the LM head).
WIDE_OUTPUT = 8192
#: Rows up to which a bf16 matmul stays in bf16 on CPUs without native bf16 compute.
BF16_GEMV_ROWS = 2
#: Rows up to which the native kernel beats the BLAS path, per weight dtype.
NATIVE_ROWS = {torch.float32: 16, torch.bfloat16: 48}


def has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return "AMX" in cap or "BF16" in cap


class CpuLinear(nn.Module):
    """y = x W^T + b, choosing the layout and compute dtype the CPU is fastest with."""

    def __init__(self, linear: nn.Linear, native_bf16: bool, use_native: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # The native kernel reads [out, in]; without it, MKL's GEMV wants the wide head transposed.
        self.native_rows = NATIVE_ROWS.get(weight.dtype, 0) if use_native and weight.is_contiguous() else 0
        self.transposed = (
            not self.native_rows and weight.dtype == torch.float32 and self.out_features >= WIDE_OUTPUT
        )
        # [in, out] contiguous for the transposed path, else the usual [out, in].
        self.weight = nn.Parameter(
            weight.t().contiguous() if self.transposed else weight, requires_grad=False
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.upcast_bf16 = weight.dtype == torch.bfloat16 and not native_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.native_rows and x.dtype in native.DTYPES:
            return native.linear(x, self.weight, self.bias)
        if self.transposed:
            y = x @ self.weight
            return y if self.bias is None else y + self.bias
        if self.upcast_bf16 and x.shape[0] > BF16_GEMV_ROWS:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def optimize_linears(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` in `model` (in place) with a `CpuLinear`; return the model."""
    native_bf16 = has_native_bf16()
    use_native = native.available()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, CpuLinear(child, native_bf16, use_native))
    return model
