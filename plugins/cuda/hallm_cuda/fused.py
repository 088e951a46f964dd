"""Swap the decoder layers' elementwise chains for fused Triton kernels (`CudaPlatform.compile_model`).

hallm's native models build their layers from `hallm.core.layers`: `RMSNorm` (optionally with
the residual add), `RotaryEmbedding`, `GatedMLP`. Each is a chain of small PyTorch kernels; on a
GPU those launches, not bytes, dominate a small model's decode step. `fuse_layers` replaces, in
place, every such module `hallm.ops.fusion` recognizes with one that calls
`hallm.ops.triton.fused`; the parameters are shared, not copied. HALLM_CUDA_FUSED=0 turns the
swap off.

The projections of at most SKINNY_MAX_WEIGHT_BYTES run through `hallm.ops.triton.skinny_gemm`
when a step has at most HALLM_CUDA_SKINNY_ROWS rows (default SKINNY_ROWS; 0 = always cuBLAS) in
bf16/fp16: decode steps of small models, where one cuBLAS GEMM per projection costs ~4.5 us for
~0.5 us of bytes and cannot overlap its neighbours (the Triton kernels launch with programmatic
dependent launch, `hallm.ops.triton.runtime.pdl_launch`). Measured on an H200
(benchmarks/results/gpu.md, run 11): Qwen2.5-0.5B's qkv, o and down projections are faster
this way, while cuBLAS stays faster for bigger weights (its gate/up, lm_head, all of
Llama-3.1-8B's). The gated form (gate/up with the SiLU-and-mul in its epilogue) measured slower
than cuBLAS + the SiLU kernel, so it is off unless HALLM_CUDA_SKINNY_GATED_ROWS is set.

Llama-family decoder layers of small models are replaced as a whole
(`hallm_cuda.fused_decoder.FusedDecoderLayer`: the input RMSNorm and the rotary folded into the
qkv projection for the same few-row steps); HALLM_CUDA_FUSED_DECODER=0 keeps the per-module
swaps there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hallm.ops.fusion import DECODER_LAYER, LINEAR, RMS_NORM, ROTARY, SILU_GATED_MLP, swap_layers
from hallm.platforms import env_flag, env_int

#: Most rows (tokens) a projection sends to the skinny GEMM instead of cuBLAS.
SKINNY_ROWS = 16
#: Largest weight the skinny GEMM takes (H200: it wins up to Qwen2.5-0.5B's 8.7 MB down
#: projection, cuBLAS from its 17 MB gate/up on).
SKINNY_MAX_WEIGHT_BYTES = 12 << 20
_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def _skinny_rows() -> int:
    return env_int("HALLM_CUDA_SKINNY_ROWS", SKINNY_ROWS)


def _plain_linear(linear: nn.Module) -> bool:
    """An nn.Linear (not a subclass) without hooks, which a swap would drop."""
    return type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks)


def _skinny_fits(linear: nn.Module) -> bool:
    """A plain nn.Linear whose weight is small enough for the skinny GEMM to win."""
    w = linear.weight
    return _plain_linear(linear) and w.numel() * w.element_size() <= SKINNY_MAX_WEIGHT_BYTES


def skinny_input_rows(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> int:
    """The rows of x when this call may take the skinny GEMM, else 0."""
    from hallm.ops.triton.runtime import interpreting

    k = weight.shape[1]
    if x.dim() == 0 or k == 0 or x.dtype != weight.dtype or x.dtype not in _SKINNY_DTYPES:
        return 0
    if x.device != weight.device or not (x.is_cuda or interpreting()) or not weight.is_contiguous():
        return 0
    rows = x.numel() // k
    return rows if 0 < rows <= max_rows else 0


class SkinnyLinear(nn.Module):
    """`nn.Linear` whose few-row calls (decode) run the skinny GEMM; same parameters and names."""

    def __init__(self, linear: nn.Linear, max_rows: int) -> None:
        super().__init__()
        from hallm.ops.triton.skinny_gemm import MAX_ROWS, counters_for

        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = min(max_rows, MAX_ROWS)
        # Split-K counters, zero between launches; a buffer so a captured graph reuses them.
        self.register_buffer(
            "counters", counters_for(self.out_features, self.weight.device), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = skinny_input_rows(x, self.weight, self.max_rows)
        if not rows:
            return F.linear(x, self.weight, self.bias)
        from hallm.ops.triton.skinny_gemm import skinny_linear

        out = skinny_linear(x.reshape(rows, self.in_features), self.weight, self.bias, counters=self.counters)
        return out.view(*x.shape[:-1], self.out_features)


class FusedRMSNorm(nn.Module):
    """RMSNorm (with an optional fused residual add) in one kernel; same call signature."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from hallm.ops.triton.fused import rms_norm

        return rms_norm(x, self.weight, self.eps, residual)


class FusedRotaryEmbedding(nn.Module):
    """forward(positions, q, k) -> (q, k) rotated, in one kernel for both."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().contiguous(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)
        self.rotary_dim = int(rotary.rotary_dim)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from hallm.ops.triton.fused import rotary

        return rotary(positions, q, k, self.inv_freq, self.attention_scaling)


class FusedGatedMLP(nn.Module):
    """down(silu(gate) * up) with the activation and product in one kernel: the gate/up
    projection's epilogue for few-row steps (skinny GEMM), else a kernel after cuBLAS."""

    def __init__(self, mlp: nn.Module, max_rows: int = 0, gated_rows: int = 0) -> None:
        super().__init__()
        self.intermediate_size = mlp.intermediate_size
        self.gate_up_proj = mlp.gate_up_proj
        down = mlp.down_proj
        self.down_proj = SkinnyLinear(down, max_rows) if max_rows > 0 and _skinny_fits(down) else down
        from hallm.ops.triton.skinny_gemm import MAX_ROWS, counters_for

        self.max_rows = min(gated_rows, MAX_ROWS) if _plain_linear(mlp.gate_up_proj) else 0
        if self.max_rows:  # the gated launch splits K; a buffer so a captured graph reuses them
            w = self.gate_up_proj.weight
            self.register_buffer("counters", counters_for(w.shape[0] // 2, w.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate_up_proj.weight
        rows = skinny_input_rows(x, w, self.max_rows)
        if rows:
            from hallm.ops.triton.skinny_gemm import skinny_linear

            act = skinny_linear(
                x.reshape(rows, w.shape[1]), w, self.gate_up_proj.bias, gated=True, counters=self.counters
            )
            return self.down_proj(act.view(*x.shape[:-1], self.intermediate_size))
        from hallm.ops.triton.fused import silu_and_mul

        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def _replacement(kind: str, module: nn.Module, skinny_rows: int) -> nn.Module | None:
    if kind == DECODER_LAYER:
        from hallm_cuda.fused_decoder import FusedDecoderLayer, fits

        if skinny_rows <= 0 or not env_flag("HALLM_CUDA_FUSED_DECODER", True) or not fits(module):
            return None  # its submodules are swapped one by one

        def swap_children(layer: nn.Module) -> None:
            swap_layers(layer, lambda k, m: _replacement(k, m, skinny_rows), None)

        return FusedDecoderLayer(module, skinny_rows, swap_children)
    if kind == RMS_NORM:
        return FusedRMSNorm(module)
    if kind == ROTARY:
        return FusedRotaryEmbedding(module)
    if kind == SILU_GATED_MLP:
        gated = env_int("HALLM_CUDA_SKINNY_GATED_ROWS", 0)
        return FusedGatedMLP(module, skinny_rows, gated)
    if kind == LINEAR and skinny_rows > 0 and _skinny_fits(module):
        return SkinnyLinear(module, skinny_rows)  # type: ignore[arg-type]
    return None


def fuse_layers(model: Any) -> Any:
    """Replace recognized layer modules of `model` in place (see the module doc); return it."""
    if env_flag("HALLM_CUDA_FUSED", True):
        rows = _skinny_rows()
        swap_layers(model, lambda kind, module: _replacement(kind, module, rows), "fused Triton layers")
    return model
