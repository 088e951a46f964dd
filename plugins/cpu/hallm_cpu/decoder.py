"""The decoder stack of hallm's Llama-family models in one native call, for small steps.

After `hallm_cpu.fused` and `hallm_cpu.linear` have swapped a model's layers, each of its ~30
decoder layers still costs ~10 Python module calls and ~9 ctypes calls per step: ~8 ms of host
work per decode step on the 2-core EPYC, against a 20 ms (fp32) or 10 ms (bf16) weight-streaming
floor for SmolLM2-135M. `CpuDecoderStack` replaces the model's `LlamaModel` child: it embeds the
step's tokens and runs every layer plus the final norm in one call of `hallm_decoder_layers`,
which chains the same kernels in the same order as the swapped modules, so the results are
identical. The per-layer pointers are gathered once, when the KV caches are first seen, and
again if they are reallocated; until then (and for any layer bound to another attention
backend) the modules run.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import nn

from hallm.platforms import get_forward_context
from hallm_cpu import native
from hallm_cpu.attention import CpuNativeAttention
from hallm_cpu.fused import CpuGatedMLP, CpuRMSNorm, CpuRotaryEmbedding
from hallm_cpu.linear import CpuLinear

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class LayerParams(ctypes.Structure):
    """csrc/decoder.c `hallm_layer`: one decoder layer's pointers and scalars (same field order)."""

    _fields_ = [
        *[
            (name, _p)
            for name in (
                "input_norm", "post_norm", "qkv_w", "qkv_b", "q_norm", "k_norm", "o_w", "o_b",
                "gate_up_w", "gate_up_b", "down_w", "down_b", "kv_cache",
            )
        ],
        ("num_blocks", _i64),
        ("window", _i64),
        *[(name, _f32) for name in ("input_eps", "post_eps", "qk_eps", "scale", "soft_cap")],
    ]  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear_ok(m: Any) -> bool:
    return isinstance(m, CpuLinear) and m.packed is not None


def supports(model: nn.Module) -> bool:
    """True for a `hallm.core.models.llama.LlamaModel` whose layers were all swapped to native ones."""
    cls = type(model)
    if cls.__name__ != "LlamaModel" or not cls.__module__.startswith("hallm.core.models"):
        return False
    if not isinstance(getattr(model, "norm", None), CpuRMSNorm):
        return False
    if not isinstance(getattr(model, "rotary_emb", None), CpuRotaryEmbedding):
        return False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qk = (attn.q_norm, attn.k_norm)
        if not (
            isinstance(layer.input_layernorm, CpuRMSNorm)
            and isinstance(layer.post_attention_layernorm, CpuRMSNorm)
            and _linear_ok(attn.qkv_proj)
            and _linear_ok(attn.o_proj)
            and (qk == (None, None) or all(isinstance(n, CpuRMSNorm) for n in qk))
            and isinstance(mlp, CpuGatedMLP)
            and _linear_ok(mlp.gate_up_proj)
            and _linear_ok(mlp.down_proj)
        ):
            return False
    return True


class CpuDecoderStack(nn.Module):
    """forward(input_ids [T], positions [T]) -> final-normed hidden [T, hidden]; see the module doc."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        layer0 = model.layers[0]
        attn = layer0.self_attn
        self.dtype = model.embed_tokens.weight.dtype
        self.hidden_size = model.embed_tokens.weight.shape[1]
        self.num_heads, self.num_kv_heads, self.head_size = attn.num_heads, attn.num_kv_heads, attn.head_size
        self.intermediate_size = layer0.mlp.intermediate_size
        self._params: ctypes.Array[LayerParams] | None = None
        self._caches: list[torch.Tensor] = []

    def _layer_params(self) -> ctypes.Array[LayerParams] | None:
        """The per-layer pointers, rebuilt when the caches change; None until all are native-bound."""
        layers = self.inner.layers
        caches = [layer.self_attn.attn.kv_cache for layer in layers]
        if self._params is not None and all(a is b for a, b in zip(caches, self._caches, strict=True)):
            return self._params
        if any(c is None for c in caches) or any(
            not isinstance(layer.self_attn.attn.impl, CpuNativeAttention) for layer in layers
        ):
            return None
        params = (LayerParams * len(layers))()
        for p, layer, cache in zip(params, layers, caches, strict=True):
            sa, mlp, attn = layer.self_attn, layer.mlp, layer.self_attn.attn
            p.input_norm, p.post_norm = (
                _ptr(layer.input_layernorm.weight),
                _ptr(layer.post_attention_layernorm.weight),
            )
            p.qkv_w, p.qkv_b = _ptr(sa.qkv_proj.packed), _ptr(sa.qkv_proj.bias)
            p.q_norm = _ptr(sa.q_norm.weight) if sa.q_norm is not None else None
            p.k_norm = _ptr(sa.k_norm.weight) if sa.k_norm is not None else None
            p.qk_eps = sa.q_norm.eps if sa.q_norm is not None else 0.0
            p.o_w, p.o_b = _ptr(sa.o_proj.packed), _ptr(sa.o_proj.bias)
            p.gate_up_w, p.gate_up_b = _ptr(mlp.gate_up_proj.packed), _ptr(mlp.gate_up_proj.bias)
            p.down_w, p.down_b = _ptr(mlp.down_proj.packed), _ptr(mlp.down_proj.bias)
            p.kv_cache, p.num_blocks = _ptr(cache), cache.shape[1]
            p.window = attn.sliding_window or 0
            p.input_eps, p.post_eps = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
            p.scale, p.soft_cap = attn.scale, attn.logits_soft_cap or 0.0
        self._params, self._caches = params, caches
        return params

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[0]
        params = self._layer_params() if t > 0 else None
        if params is None:
            return self.inner(input_ids, positions)
        meta = get_forward_context().metadata[CpuNativeAttention]
        model = self.inner
        hidden = model.embed_tokens(input_ids)
        h, hq, hk, d, i = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.intermediate_size,
        )
        scratch = torch.empty(t * (3 * h + (2 * hq + 2 * hk) * d + 3 * i), dtype=self.dtype)
        residual, hbuf, out, qkv, attn, gate_up, act = scratch.split(
            [t * h, t * h, t * h, t * (hq + 2 * hk) * d, t * hq * d, t * 2 * i, t * i]
        )
        rotary = model.rotary_emb
        positions = positions.to(torch.int64)
        block_tables = meta.block_tables
        native.library().hallm_decoder_layers(  # type: ignore[union-attr]
            ctypes.addressof(params), len(params), model.norm.weight.data_ptr(), model.norm.eps,
            hidden.data_ptr(), residual.data_ptr(), hbuf.data_ptr(), qkv.data_ptr(), attn.data_ptr(),
            gate_up.data_ptr(), act.data_ptr(), out.data_ptr(),
            t, h, hq, hk, d, i, self.inner.layers[0].self_attn.attn.kv_cache.shape[2],
            positions.data_ptr(), rotary.inv_freq.data_ptr(), rotary.inv_freq.shape[0], rotary.attention_scaling,
            meta.slot_mapping.data_ptr(), meta.query_start_loc.data_ptr(), meta.context_lens.data_ptr(),
            meta.context_lens.shape[0], block_tables.data_ptr(), block_tables.stride(0),
            native.DTYPES[self.dtype], torch.get_num_threads(),
        )  # fmt: skip
        return out.view(t, h)


def stack_decoders(model: Any) -> Any:
    """Wrap each supported `LlamaModel` child of `model` in a `CpuDecoderStack`; return the model."""
    if not native.available() or not isinstance(model, nn.Module):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if supports(child):
                setattr(parent, name, CpuDecoderStack(child))
    return model
