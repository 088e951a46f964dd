"""The decoder stack of hallm's Llama-family models in one native call: the op table's
`llama_decoder_stack`.

With the table's native norms, rotary and linear kernels, each of a small model's ~30 decoder
layers still costs ~10 Python calls and ~9 ctypes calls per step, several milliseconds of host
work per decode step against a weight-streaming floor of about ten (benchmarks/results/cpu.md).
`CpuDecoderStack` runs every layer plus the final norm in one call of `hallm_decoder_layers`,
which chains the same kernels in the same order as the layers do one op at a time, so the
results are identical. The per-layer pointers are gathered once, when the KV caches are first
seen, and again if they are reallocated; until then (and when any layer is bound to another
attention backend) it declines the step and the layers run one op at a time.
"""

from __future__ import annotations

import ctypes

import torch

from hallm.platforms import get_forward_context
from hallm.platforms.ops import BoundLinear, DecoderStackWeights
from hallm_cpu import native
from hallm_cpu.attention import CpuNativeAttention
from hallm_cpu.linear import CpuLinear
from hallm_cpu.memory import empty_weight

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


def _packed(linear: BoundLinear) -> torch.Tensor | None:
    """The native panels of a layer this plugin's `linear` entry prepared, else None."""
    kernel = linear.kernel
    return kernel.packed if isinstance(kernel, CpuLinear) else None


def decoder_stack(weights: DecoderStackWeights) -> CpuDecoderStack | None:
    """The table's entry: a stack kernel when every projection is natively packed."""
    if not native.available():
        return None
    for layer in weights.layers:
        if any(_packed(lin) is None for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            return None
    return CpuDecoderStack(weights)


class CpuDecoderStack:
    """`(positions [T], hidden [T, H]) -> final-normed hidden [T, H]`; see the module doc."""

    def __init__(self, weights: DecoderStackWeights) -> None:
        self.weights = weights
        layer0 = weights.layers[0]
        self.dtype = weights.final_norm.dtype
        self.hidden_size = weights.final_norm.shape[0]
        self.num_heads, self.num_kv_heads, self.head_size = (
            layer0.num_heads,
            layer0.num_kv_heads,
            layer0.head_size,
        )
        self.intermediate_size = layer0.intermediate_size
        self.inv_freq = weights.inv_freq.float().contiguous()
        self._params: ctypes.Array[LayerParams] | None = None
        self._caches: list[torch.Tensor | None] = []
        self._gather_panels()

    def _gather_panels(self) -> None:
        """Move every layer's packed panels into one buffer, in the order a step reads them.

        A batch-1 step streams every panel once, so it runs at copy bandwidth; with the panels
        wherever the allocator left them as layers were prepared, the same call measured 14-27%
        slower than with them back to back (benchmarks/results/cpu.md). The buffer is advised as
        huge pages (`hallm_cpu.memory`). Each old panel is freed as it is copied, so the peak
        memory stays about one panel above the weights."""
        kernels = [
            lin.kernel
            for layer in self.weights.layers
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
            if isinstance(lin.kernel, CpuLinear) and lin.kernel.packed is not None
        ]
        panels = [k.packed for k in kernels if k.packed is not None]
        if len({p.dtype for p in panels}) != 1:
            return
        arena = empty_weight((sum(p.numel() for p in panels),), panels[0].dtype)
        del panels
        offset = 0
        for kernel in kernels:
            old = kernel.packed
            assert old is not None
            view = arena[offset : offset + old.numel()].view(old.shape)
            view.copy_(old)
            kernel.packed, offset = view, offset + old.numel()

    def _layer_params(self) -> ctypes.Array[LayerParams] | None:
        """The per-layer pointers, rebuilt when the caches change; None until all are native-bound."""
        layers = self.weights.layers
        caches = [layer.attention.kv_cache for layer in layers]
        if self._params is not None and all(a is b for a, b in zip(caches, self._caches, strict=True)):
            return self._params
        if any(c is None for c in caches) or any(
            not isinstance(layer.attention.impl, CpuNativeAttention) for layer in layers
        ):
            return None
        params = (LayerParams * len(layers))()
        for p, layer, cache in zip(params, layers, caches, strict=True):
            assert cache is not None
            attn = layer.attention
            p.input_norm, p.post_norm = _ptr(layer.input_norm), _ptr(layer.post_norm)
            p.qkv_w, p.qkv_b = _ptr(_packed(layer.qkv)), _ptr(layer.qkv.weights.bias)
            p.q_norm, p.k_norm = _ptr(layer.q_norm), _ptr(layer.k_norm)
            p.qk_eps = layer.qk_eps
            p.o_w, p.o_b = _ptr(_packed(layer.o)), _ptr(layer.o.weights.bias)
            p.gate_up_w, p.gate_up_b = _ptr(_packed(layer.gate_up)), _ptr(layer.gate_up.weights.bias)
            p.down_w, p.down_b = _ptr(_packed(layer.down)), _ptr(layer.down.weights.bias)
            p.kv_cache, p.num_blocks = _ptr(cache), cache.shape[1]
            p.window = attn.sliding_window or 0
            p.input_eps, p.post_eps = layer.input_eps, layer.post_eps
            p.scale, p.soft_cap = attn.scale, attn.logits_soft_cap or 0.0
        self._params, self._caches = params, list(caches)
        return params

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        t = hidden.shape[0]
        params = self._layer_params() if t > 0 and hidden.dtype == self.dtype else None
        if params is None:
            return None
        meta = get_forward_context().metadata[CpuNativeAttention]
        h, hq, hk, d, i = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.intermediate_size,
        )
        hidden = hidden.contiguous()
        scratch = torch.empty(t * (3 * h + (2 * hq + 2 * hk) * d + 3 * i), dtype=self.dtype)
        residual, hbuf, out, qkv, attn, gate_up, act = scratch.split(
            [t * h, t * h, t * h, t * (hq + 2 * hk) * d, t * hq * d, t * 2 * i, t * i]
        )
        positions = positions.to(torch.int64)
        block_tables = meta.block_tables
        cache0 = self._caches[0]
        assert cache0 is not None
        native.library().hallm_decoder_layers(  # type: ignore[union-attr]
            ctypes.addressof(params), len(params), self.weights.final_norm.data_ptr(), self.weights.final_eps,
            hidden.data_ptr(), residual.data_ptr(), hbuf.data_ptr(), qkv.data_ptr(), attn.data_ptr(),
            gate_up.data_ptr(), act.data_ptr(), out.data_ptr(),
            t, h, hq, hk, d, i, cache0.shape[2],
            positions.data_ptr(), self.inv_freq.data_ptr(), self.inv_freq.shape[0], self.weights.rotary_scaling,
            meta.slot_mapping.data_ptr(), meta.query_start_loc.data_ptr(), meta.context_lens.data_ptr(),
            meta.context_lens.shape[0], block_tables.data_ptr(), block_tables.stride(0),
            native.DTYPES[self.dtype], torch.get_num_threads(),
        )  # fmt: skip
        return out.view(t, h)
