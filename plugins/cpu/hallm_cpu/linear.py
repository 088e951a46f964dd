"""Linear layers laid out for the host CPU.

With the plugin's native kernels built (`hallm_cpu.native`), a weight is packed once, at load,
into 16-feature panels that the native GEMM/GEMV reads for every row count: the batch-1 GEMV
streams it at copy bandwidth, and a decode batch of 32 runs at 128-179 GFLOPS against MKL's
91-107 on the 2-core AVX2 EPYC (see csrc/linear.c); bf16 weights are widened in registers, or,
where the kernels are built for AVX512-BF16, multiplied as they are by its dot-product
instructions (~320 GFLOPS at 32 rows on a 2-core Zen 4, against oneDNN's ~260). The packed copy
replaces the [N, K] weight, so weights take no more memory (a tied LM head gets its own packed
copy of the embedding). A CPU with native bf16 compute whose kernels lack the bf16 dot product
(a compiler without AVX512-BF16, say) keeps bf16 weights on oneDNN/MKL.

Without the native kernels: a GEMV against a wide weight (the LM head, N=49152) runs 1.8x faster
as `x @ W^T` with `W^T` stored contiguous than as `F.linear(x, W)`; and without native bf16
instructions a bf16 GEMM with more than a couple of rows is ~4x slower than upcasting both
operands to fp32, while a bf16 GEMV (bandwidth-bound) is the faster choice.
`optimize_linears` swaps each `nn.Linear` for a module that takes the fast path per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hallm_cpu import native

#: Output widths from which the transposed layout wins for fp32 GEMV (the LM head), without native kernels.
WIDE_OUTPUT = 8192
#: Rows up to which a bf16 matmul stays in bf16 on CPUs without native bf16 compute.
BF16_GEMV_ROWS = 2


def has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN would use it.

    torch's capability string says only "AVX512" on such CPUs, so ask torch's CPU feature probes
    (private; where they are missing, fall back to the capability string)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        cap = torch.backends.cpu.get_cpu_capability()
        return "AMX" in cap or "BF16" in cap


class CpuLinear(nn.Module):
    """y = x W^T + b, choosing the layout and kernel the CPU is fastest with."""

    def __init__(self, linear: nn.Linear, native_bf16: bool, use_native: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.weight: nn.Parameter | None = None
        self.native = (
            use_native
            and weight.dtype in native.DTYPES
            and not (weight.dtype == torch.bfloat16 and native_bf16 and not native.bf16_dot())
        )
        self.transposed = (
            not self.native and weight.dtype == torch.float32 and self.out_features >= WIDE_OUTPUT
        )
        self.upcast_bf16 = weight.dtype == torch.bfloat16 and not native_bf16
        # [ceil(out/16), in, 16] panels for the native kernels (see the module doc), or None.
        self.register_buffer("packed", native.pack_linear(weight) if self.native else None, persistent=False)
        if not self.native:
            # [in, out] contiguous for the transposed path, else the usual [out, in].
            self.weight = nn.Parameter(
                weight.t().contiguous() if self.transposed else weight, requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype in native.DTYPES:
            return native.linear(x, self.packed, self.bias, self.out_features)
        if self.weight is None:  # packed, but an activation dtype the kernels do not take
            raise TypeError(f"CpuLinear packed for the native kernels got a {x.dtype} input")
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
