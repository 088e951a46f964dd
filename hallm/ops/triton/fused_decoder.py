"""The Llama-family decoder stack with each layer's input RMSNorm and rotary embedding folded
into its qkv projection: the Triton op table's `llama_decoder_stack`.

A layer run one op at a time launches, per decode step, RMSNorm, qkv, rotary, (KV write +
attention), o, RMSNorm, gate/up, SiLU-and-mul and down; for a small model each launch and its
dependency wait cost more than its bytes. For steps of at most SKINNY_ROWS tokens this stack
runs each layer as

    qkv  = skinny(norm(hidden + residual) @ Wqkv.T + b), q and k rotated in its epilogue
    out  = o_proj(attn(q, k, v))
    then the post-attention RMSNorm, gate/up, SiLU-and-mul and down_proj from the table

so the norm and rotary launches are gone. Larger steps (prefill, big batches) are declined and
the layers run one op at a time. Only models whose qkv weights are small enough for the skinny
GEMM to win take it (large models' projections stay with cuBLAS); layers with per-head q/k
norms (Qwen3) are declined.
"""

from __future__ import annotations

import torch

from hallm.ops.triton.skinny_linear import SKINNY_DTYPES, SKINNY_ROWS, skinny_input_rows
from hallm.ops.triton.target import TritonTarget
from hallm.platforms.ops import DecoderStackWeights

#: Largest qkv weight the fused launch takes.
FUSED_MAX_WEIGHT_BYTES = 24 << 20


def decoder_stack(weights: DecoderStackWeights, target: TritonTarget) -> FusedDecoderStack | None:
    """The table's entry: a stack for 16-bit models with small qkv weights, no q/k norm, and a
    head size the rotary epilogue tiles (a multiple of 32); None otherwise."""
    for layer in weights.layers:
        w = layer.qkv.weights.weight
        if (
            w is None
            or w.dtype not in SKINNY_DTYPES
            or not w.is_contiguous()
            or w.numel() * w.element_size() > FUSED_MAX_WEIGHT_BYTES
            or layer.q_norm is not None
            or layer.head_size % 32
        ):
            return None
    head_size = weights.layers[0].head_size
    if weights.inv_freq.dtype != torch.float32 or 2 * weights.inv_freq.numel() != head_size:
        return None
    return FusedDecoderStack(weights, target)


class FusedDecoderStack:
    """`(positions [T], hidden [T, H]) -> final-normed hidden [T, H]`, or None for steps of more
    than SKINNY_ROWS tokens (see the module doc)."""

    def __init__(self, weights: DecoderStackWeights, target: TritonTarget) -> None:
        from hallm.ops.triton.skinny_gemm import MAX_ROWS, counters_for

        self.weights = weights
        self.target = target
        self.max_rows = min(SKINNY_ROWS, MAX_ROWS)
        # split-K counters per layer, zero between launches; kept so a captured graph reuses them
        self.counters = [
            counters_for(layer.qkv.weights.weight.shape[0], layer.qkv.weights.weight.device)
            for layer in weights.layers
        ]

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        from hallm.ops.triton.fused import rms_norm, silu_and_mul
        from hallm.ops.triton.skinny_gemm import RMSNormPrologue, RotaryEpilogue, skinny_linear

        w = self.weights
        rows = skinny_input_rows(hidden, w.layers[0].qkv.weights.weight, self.max_rows)
        if not rows or hidden.dim() != 2 or positions.shape != (rows,):
            return None
        target = self.target
        residual: torch.Tensor | None = None
        for layer, counters in zip(w.layers, self.counters, strict=True):
            qs, kvs = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
            rope = RotaryEpilogue(
                positions, w.inv_freq, w.rotary_scaling, layer.head_size, layer.num_heads + layer.num_kv_heads
            )
            qkv_w, qkv_b = layer.qkv.weights.weight, layer.qkv.weights.bias
            if residual is None:  # the first layer: the embeddings are the residual stream
                residual = hidden
                norm = RMSNormPrologue(layer.input_norm, layer.input_eps)
                qkv = skinny_linear(
                    hidden, qkv_w, qkv_b, norm=norm, rotary=rope, counters=counters, target=target
                )
            else:
                norm = RMSNormPrologue(layer.input_norm, layer.input_eps, residual)
                qkv, residual = skinny_linear(  # type: ignore[misc]
                    hidden, qkv_w, qkv_b, norm=norm, rotary=rope, counters=counters, target=target
                )
            q, k, v = qkv.split([qs, kvs, kvs], dim=-1)  # type: ignore[union-attr]
            hidden = layer.o.kernel(layer.attention(q, k, v))
            h, residual = rms_norm(hidden, layer.post_norm, layer.post_eps, residual, target)  # type: ignore[misc]
            hidden = layer.down.kernel(silu_and_mul(layer.gate_up.kernel(h), target))
        out, _ = rms_norm(hidden, w.final_norm, w.final_eps, residual, target)  # type: ignore[misc]
        return out
