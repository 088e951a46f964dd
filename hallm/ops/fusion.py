"""Find the decoder-layer modules a plugin may replace with fused kernels, and swap them in place.

hallm's native models build their layers from `hallm.core.layers`: `RMSNorm` (optionally with the
residual add), `RotaryEmbedding` and `GatedMLP`, each a chain of small PyTorch ops, and their projections are
plain `nn.Linear`s; the Llama family's decoder layer is these in a fixed order (DECODER_LAYER), so a
plugin may also fold a layer's neighbouring ops into fewer kernels. A plugin with
fused kernels for these calls `swap_layers(model, make)` from its `Platform.compile_model`; `make`
gets each recognized module with its kind (see `layer_kind`) and returns the replacement (sharing
the parameters, not copying them) or None to keep it. Modules not recognized here (the generic
transformers path, long-rope rotary, partial rotary, activations other than SiLU) are left alone.
Recognition is by class name and attributes, so a plugin imports no core module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("hallm.ops")

RMS_NORM = "rms_norm"
ROTARY = "rotary"
SILU_GATED_MLP = "silu_gated_mlp"
LINEAR = "linear"
DECODER_LAYER = "llama_decoder_layer"


def layer_kind(module: nn.Module) -> str | None:
    """RMS_NORM, ROTARY (full NeoX rotary, no long-rope switch), SILU_GATED_MLP, LINEAR (a plain
    `nn.Linear`, not a subclass such as a quantized one), DECODER_LAYER, or None."""
    cls = type(module)
    if cls is nn.Linear:
        return LINEAR
    if cls.__module__ == "hallm.core.models.llama" and cls.__name__ == "LlamaDecoderLayer":
        return DECODER_LAYER if _plain_decoder_layer(module) else None
    if not cls.__module__.startswith("hallm.core.layers"):
        return None
    if cls.__name__ == "RMSNorm" and hasattr(module, "eps"):
        return RMS_NORM
    if (
        cls.__name__ == "RotaryEmbedding"
        and getattr(module, "original_max_position", None) is None
        and 2 * module.inv_freq.numel() == getattr(module, "rotary_dim", -1)
    ):
        return ROTARY
    if cls.__name__ == "GatedMLP" and getattr(module, "act", None) is F.silu:
        return SILU_GATED_MLP
    return None


def _plain_decoder_layer(layer: nn.Module) -> bool:
    """`LlamaDecoderLayer.forward` runs exactly: input_layernorm(hidden, residual) -> qkv_proj ->
    rotary -> attn -> o_proj -> post_attention_layernorm(hidden, residual) -> gate_up_proj ->
    SiLU-and-mul -> down_proj, with every piece recognized here (no q/k norm: Qwen3's layers
    keep the per-module swaps), and no forward hooks in it: a fused layer skips the forwards
    of the modules it folds."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(attn, "q_norm", None) is not None:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return False
    return (
        layer_kind(layer.input_layernorm) == RMS_NORM
        and layer_kind(layer.post_attention_layernorm) == RMS_NORM
        and layer_kind(attn.qkv_proj) == LINEAR
        and layer_kind(attn.o_proj) == LINEAR
        and layer_kind(mlp) == SILU_GATED_MLP
        and layer_kind(mlp.gate_up_proj) == LINEAR
    )


def swap_layers(
    model: Any, make: Callable[[str, nn.Module], nn.Module | None], label: str | None
) -> dict[str, int]:
    """Replace, in place, each recognized module of `model` for which `make` returns a module.

    `make` may swap the module's own children before wrapping them (a decoder layer does); the
    modules it was handed are not visited again. Returns how many modules of each class were
    replaced, and logs it under `label` (None: no log, for a swap nested in a `make`)."""
    counts: dict[str, int] = {}
    if not isinstance(model, nn.Module):
        return counts
    replaced: set[int] = set()  # ids of swapped-out modules and everything under them
    for parent in list(model.modules()):  # pre-order: a parent before its children
        if id(parent) in replaced:
            continue  # detached; its replacement decides what to do with its children
        for name, child in list(parent.named_children()):
            kind = layer_kind(child)
            if kind is None:
                continue
            subtree = {id(m) for m in child.modules()}  # before `make` may rewire it
            new = make(kind, child)
            if new is not None:
                setattr(parent, name, new)
                replaced.update(subtree)
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
    if counts and label is not None:
        logger.info("%s: %s", label, ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))
    return counts
