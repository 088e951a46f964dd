"""Linear layers laid out for the host CPU: the op table's `linear` entry.

With the plugin's native kernels built (`hallm_cpu.native`), a weight is packed once, at load,
into 16-feature panels that the native GEMM/GEMV reads for every row count: the one-row GEMV
streams it at copy bandwidth, and a decode batch of a few dozen rows runs register-tiled panels
that outpace the oneDNN/MKL matmul (benchmarks/results/cpu.md). bf16 weights are widened in
registers, or, where the kernels are built for AVX512-BF16, multiplied as they are by its
dot-product instructions. The packed copy replaces the [N, K] weight, so weights take no more
memory (a tied LM head gets its own packed copy of the embedding). A CPU with native bf16
compute whose kernels lack the bf16 dot product (a compiler without AVX512-BF16, say) keeps bf16
weights on oneDNN/MKL.

Without the native kernels: a GEMV against a wide weight (the LM head) is faster as `x @ W^T`
with `W^T` stored contiguous than as `F.linear(x, W)`; and without native bf16 instructions a
bf16 GEMM with more than a couple of rows is several times slower than upcasting both operands
to fp32, while a bf16 GEMV (bandwidth-bound) is the faster choice. `linear_op` gives every
linear layer a `CpuLinear` kernel that takes the fast path per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hallm.platforms.ops import LinearKernel, LinearOp, LinearWeights
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


class CpuLinear(LinearKernel):
    """y = x W^T + b, in the layout and kernel the CPU is fastest with (see the module doc)."""

    def __init__(self, weights: LinearWeights, native_bf16: bool, use_native: bool) -> None:
        weight = weights.weight
        self.out_features, self.in_features = weight.shape
        self.bias = weights.bias
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
        self.packed = native.pack_linear(weight) if self.native else None
        self.weight: torch.Tensor | None = None
        if not self.native:
            # [in, out] contiguous for the transposed path, else the usual [out, in].
            self.weight = weight.t().contiguous() if self.transposed else weight
        self.replaces_weight = self.native or self.transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the native kernels would read past the row
            raise ValueError(
                f"linear layer takes {self.in_features} input features, got an input of shape {tuple(x.shape)}; "
                "the model's config is inconsistent with its weights (check hidden_size / intermediate_size)"
            )
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


def linear_op(use_native: bool) -> LinearOp:
    """The op table's `linear` entry: a `CpuLinear` for every layer."""
    native_bf16 = has_native_bf16()

    def make(weights: LinearWeights) -> CpuLinear:
        return CpuLinear(weights, native_bf16, use_native)

    return make
