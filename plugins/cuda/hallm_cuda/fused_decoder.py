"""A Llama-family decoder layer whose decode steps fold the input RMSNorm and the rotary
embedding into the qkv projection.

`LlamaDecoderLayer` with the per-module swaps of `hallm_cuda.fused` still launches, per layer
and step, RMSNorm, qkv, rotary, (KV write + attention), o, RMSNorm, gate/up, SiLU-and-mul and
down: on an H200 Qwen2.5-0.5B's batch-1 step was 24 layers x 11 kernels, 0.85 ms against a
0.24 ms memory floor, each kernel's launch and dependency wait costing more than its bytes
(benchmarks/results/gpu.md, run 12). For steps of at most `max_rows` tokens `FusedDecoderLayer`
runs (`hallm.ops.triton.skinny_gemm`):

    qkv  = skinny(norm(hidden + residual) @ Wqkv.T + b), q and k rotated in its epilogue
    out  = o_proj(attn(q, k, v))
    then the stock post-attention RMSNorm, gate/up, SiLU-and-mul and down_proj

HALLM_CUDA_FUSED_GATE_UP=1 also folds that RMSNorm and the SiLU-and-mul into a gated skinny
gate/up; it measured slower than cuBLAS there (run 13), so it is off. Larger steps (prefill, big
batches) run the stock `LlamaDecoderLayer.forward` over the swapped submodules. The submodules
keep their names, so the parameters' names do not change.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hallm.platforms import env_flag

#: Largest weight a fused launch takes: the qkv projection, and gate/up when it is folded too
#: (H200, run 13: Qwen2.5-0.5B's 2 MB qkv is faster with the norm and rotary folded in;
#: Llama-3.1-8B's 50-117 MB projections stay with cuBLAS, where the skinny GEMM is not faster).
FUSED_MAX_WEIGHT_BYTES = 24 << 20
_DTYPES = (torch.bfloat16, torch.float16)


def _weight_bytes(linear: nn.Module) -> int:
    w = linear.weight
    return w.numel() * w.element_size()


def fold_gate_up() -> bool:
    """HALLM_CUDA_FUSED_GATE_UP=1: also fold the post-attention RMSNorm and the SiLU-and-mul into
    a gated skinny gate/up. Off: it measured slower than RMSNorm + cuBLAS + SiLU-and-mul (H200,
    run 13: 17-26 us against 10 us; the step 1.07-1.24 ms against 0.84)."""
    return env_flag("HALLM_CUDA_FUSED_GATE_UP", False)


def fits(layer: nn.Module) -> bool:
    """Whether a recognized decoder layer suits the fused path: 16-bit weights, the projections
    it folds small enough to win over cuBLAS, and a head size the rotary epilogue tiles (a
    multiple of 32)."""
    attn = layer.self_attn
    folded = [attn.qkv_proj, layer.mlp.gate_up_proj] if fold_gate_up() else [attn.qkv_proj]
    return (
        attn.qkv_proj.weight.dtype in _DTYPES
        and max(_weight_bytes(linear) for linear in folded) <= FUSED_MAX_WEIGHT_BYTES
        and attn.head_size % 32 == 0
    )


class FusedDecoderLayer(nn.Module):
    """Same call signature and parameters as the `LlamaDecoderLayer` it wraps (see module doc).

    `swap_children(layer)` applies the per-module fusions to the wrapped layer's submodules
    (used by both paths: o_proj and down_proj, the fallback's norms and MLP)."""

    def __init__(self, layer: nn.Module, max_rows: int, swap_children: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        from hallm.ops.triton.skinny_gemm import MAX_ROWS, counters_for

        swap_children(layer)
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self._stock_forward = type(layer).forward
        self.max_rows = min(max_rows, MAX_ROWS)
        self.fold_gate_up = fold_gate_up()
        attn = self.self_attn
        self.rotated_heads = attn.num_heads + attn.num_kv_heads
        device = attn.qkv_proj.weight.device
        # split-K counters, zero between launches; buffers so a captured graph reuses them
        self.register_buffer(
            "qkv_counters", counters_for(attn.qkv_proj.weight.shape[0], device), persistent=False
        )
        gate_up = self.mlp.gate_up_proj.weight
        self.register_buffer(
            "gate_up_counters", counters_for(gate_up.shape[0] // 2, device), persistent=False
        )
        # per rotary module (the model's one, handed in at each call)
        self._rotary_ok: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def _fusable_rotary(self, rotary: nn.Module) -> bool:
        """Full NeoX rotary with fixed frequencies (FusedRotaryEmbedding, or a RotaryEmbedding
        without the long-rope switch), over the whole head."""
        ok = self._rotary_ok.get(rotary)
        if ok is None:
            from hallm.ops.fusion import ROTARY, layer_kind
            from hallm_cuda.fused import FusedRotaryEmbedding

            inv_freq = getattr(rotary, "inv_freq", None)
            ok = (
                (layer_kind(rotary) == ROTARY or isinstance(rotary, FusedRotaryEmbedding))
                and not (rotary._forward_hooks or rotary._forward_pre_hooks)
                and inv_freq is not None
                and inv_freq.dtype == torch.float32
                and 2 * inv_freq.numel() == self.self_attn.head_size
            )
            self._rotary_ok[rotary] = ok
        return ok

    def _fused_rows(self, hidden: torch.Tensor, positions: torch.Tensor, rotary: nn.Module) -> bool:
        from hallm_cuda.fused import skinny_input_rows

        rows = skinny_input_rows(hidden, self.self_attn.qkv_proj.weight, self.max_rows)
        return (
            rows > 0
            and hidden.dim() == 2
            and (not self.fold_gate_up or self.mlp.gate_up_proj.weight.is_contiguous())
            and positions.shape == (rows,)
            and self._fusable_rotary(rotary)
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._fused_rows(hidden, positions, rotary):
            return self._stock_forward(self, positions, hidden, residual, rotary)
        from hallm.ops.triton.skinny_gemm import RMSNormPrologue, RotaryEpilogue, skinny_linear

        attn = self.self_attn
        norm = self.input_layernorm
        rope = RotaryEpilogue(
            positions, rotary.inv_freq, float(rotary.attention_scaling), attn.head_size, self.rotated_heads
        )
        if residual is None:  # the first layer: the embeddings are the residual stream
            residual = hidden
            qkv = skinny_linear(
                hidden,
                attn.qkv_proj.weight,
                attn.qkv_proj.bias,
                norm=RMSNormPrologue(norm.weight, norm.eps),
                rotary=rope,
                counters=self.qkv_counters,
            )
        else:
            qkv, residual = skinny_linear(
                hidden,
                attn.qkv_proj.weight,
                attn.qkv_proj.bias,
                norm=RMSNormPrologue(norm.weight, norm.eps, residual),
                rotary=rope,
                counters=self.qkv_counters,
            )
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        hidden = attn.o_proj(attn.attn(q, k, v))
        if not self.fold_gate_up:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        norm = self.post_attention_layernorm
        gate_up = self.mlp.gate_up_proj
        act, residual = skinny_linear(
            hidden,
            gate_up.weight,
            gate_up.bias,
            gated=True,
            norm=RMSNormPrologue(norm.weight, norm.eps, residual),
            counters=self.gate_up_counters,
        )
        return self.mlp.down_proj(act), residual
