"""Run any transformers causal LM through hallm's paged attention.

The HF model is built as-is, with its attention implementation set to "hallm_paged", a
function registered in transformers' attention-function registry (`AttentionInterface`). Every
attention module of the HF model (one per layer, found by its `layer_idx`, `scaling` and
`is_causal` attributes) gets a hallm `Attention` layer attached as `module.hallm_attn`; the
registered function routes the module's query/key/value to it, so the bound backend and paged
KV cache do the attention. The step's packed tokens go in as a batch of one with
`position_ids = positions`. "hallm_paged" is deliberately not registered with
`AttentionMaskInterface`: transformers then skips mask creation (no dense [T, T] mask is built)
and passes `attention_mask=None`; causality and request boundaries come from the backend.

What this path cannot do: models whose attention does not go through the attention-function
interface (`_supports_attention_backend` false), recurrent/state-space layers, encoder-decoders,
and logits post-processing other than final soft-capping and the Cohere/Granite logit scales.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, cast

import torch
from torch import nn

from hallm.core.layers.attention import Attention
from hallm.core.layers.rotary import LongRopeCosSin, is_hf_longrope_rotary
from hallm.core.models.interface import CheckpointMismatchError, ModelBase, layer_sliding_window
from hallm.core.models.registry import TEXT_WEIGHT_PREFIXES
from hallm.core.models.weights import load_checkpoint_weights
from hallm.platforms import ConfigError

#: The name under which hallm's attention function is registered with transformers.
ATTN_IMPLEMENTATION = "hallm_paged"

_PREFIX = "hf_model."


def hallm_paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None).

    The mask is ignored: the paged backend applies causality per request from the layout.
    """
    attn: Attention | None = getattr(module, "hallm_attn", None)
    if attn is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no hallm Attention; "
            f"only models built by hallm's GenericCausalLM can use attn_implementation={ATTN_IMPLEMENTATION!r}"
        )
    if scaling is not None and abs(scaling - attn.scale) > 1e-6 * attn.scale:
        raise RuntimeError(f"layer {attn.layer_idx}: model passes scale {scaling}, hallm bound {attn.scale}")
    window = kwargs.get("sliding_window")
    if window != attn.sliding_window:
        raise RuntimeError(
            f"layer {attn.layer_idx}: model passes sliding_window={window}, hallm bound {attn.sliding_window}"
        )
    if (
        query.shape[1] != attn.num_heads
        or key.shape[1] != attn.num_kv_heads
        or query.shape[3] != attn.head_size
    ):
        raise RuntimeError(
            f"layer {attn.layer_idx}: model passes query {tuple(query.shape)} / key {tuple(key.shape)}, "
            f"hallm bound {attn.num_heads} heads, {attn.num_kv_heads} KV heads of size {attn.head_size}"
        )
    cap = kwargs.get("softcap")
    if cap is not None and cap != attn.logits_soft_cap:
        raise RuntimeError(
            f"layer {attn.layer_idx}: model passes softcap={cap}, hallm bound {attn.logits_soft_cap}"
        )
    sinks = kwargs.get("s_aux")  # gpt-oss: per-head sink logits [H]
    if (sinks is not None) != attn.sinks:
        raise RuntimeError(
            f"layer {attn.layer_idx}: model passes attention sinks={sinks is not None}, hallm bound "
            f"sinks={attn.sinks}"
        )
    t = query.shape[2]
    # [1, H, T, D] -> [T, H*D]: the layout the hallm Attention layer takes.
    q = query[0].transpose(0, 1).reshape(t, -1)
    k = key[0].transpose(0, 1).reshape(t, -1)
    v = value[0].transpose(0, 1).reshape(t, -1)
    out = attn(q, k, v, sinks=sinks)
    return out.view(1, t, attn.num_heads, attn.head_size), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hallm_paged_attention)


def _hf_class(config: Any) -> tuple[Any, str | None]:
    """(transformers causal-LM class for config, reason it cannot run here or None)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return None, "encoder-decoder models are not supported"
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    if name is None:
        return None, "config names no architecture and its model_type has no causal-LM class in transformers"
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return None, f"{name} is not a transformers causal-LM class"
    cls = getattr(transformers, name, None)
    if cls is None:
        return None, f"transformers {transformers.__version__} has no class {name}"
    if not getattr(cls, "_supports_attention_backend", False):
        return None, f"{name} does not route attention through transformers' attention-function interface"
    reason = _config_refusal(config, name) or _head_refusal(cls, config)
    if reason is not None:
        return None, reason
    return cls, None


def _head_refusal(cls: Any, config: Any) -> str | None:
    """Why the model's LM head is more than its output embedding (BERT-style decoders, ModernBERT
    decoder: dense + activation + norm before the vocabulary projection), or None.

    `compute_logits` applies the output embedding alone. The head's structure is read from a
    one-layer copy of the model built on the meta device (no memory, milliseconds); a config
    that cannot even be built there is left to the real build to report.
    """
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    try:
        with torch.device("meta"):
            model = cls._from_config(small, dtype=torch.get_default_dtype())
        base = model.base_model
        output = model.get_output_embeddings()
    except Exception:
        return None
    if output is None:
        return f"{cls.__name__} has no output embedding (LM head) that the generic path can apply"
    own = {id(p) for p in output.parameters()}
    extra = sorted(
        {
            f"{name}.{param_name}".rsplit(".", 1)[0]
            for name, child in model.named_children()
            if child is not base
            for param_name, param in child.named_parameters()
            if id(param) not in own
        }
    )
    if not extra:
        return None
    return (
        f"{cls.__name__}'s LM head has layers of its own before the output embedding ({', '.join(extra)}), "
        "which the generic path does not run (it would give wrong logits); this architecture needs a "
        "native hallm model"
    )


def _config_refusal(config: Any, class_name: str) -> str | None:
    """Why a config the generic path could build would not run exactly, or None (config alone)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    if getattr(config, "kv_lora_rank", None) is not None:
        qk = (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0)
        v = getattr(config, "v_head_dim", None)
        if v is not None and v != qk:
            return (
                f"multi-head latent attention with value head size {v} != query/key head size {qk} "
                "(DeepSeek MLA) needs a native hallm model"
            )
    model_type = getattr(config, "model_type", "")
    transforms = get_checkpoint_conversion_mapping(class_name) or get_checkpoint_conversion_mapping(
        model_type
    )
    converters = [t for t in transforms or [] if not isinstance(t, WeightRenaming)]
    if converters:
        return (
            f"{class_name} checkpoints need transformers' weight conversion (fused mixture-of-experts "
            "weights), which the generic path does not do; this architecture needs a native hallm model"
        )
    layer_types = getattr(config, "layer_types", None) or []
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and (not layer_types or "chunked_attention" in layer_types):
        return (
            f"chunked attention (attention_chunk_size={chunk}, as in Llama-4) is not supported by hallm's "
            "attention backends; serving it with full attention would give wrong output past the chunk size"
        )
    unsupported = sorted(set(layer_types) - _LAYER_TYPES)
    if unsupported:
        return (
            f"attention layer types {unsupported} (config.layer_types) are not supported by the generic "
            f"path (supported: {sorted(_LAYER_TYPES)})"
        )
    return None


#: config.layer_types the generic path binds exactly (per-layer sliding windows).
_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

#: HF attention classes that multiply q by the softmax scale themselves and pass scaling=1.0.
_PRESCALED_Q = frozenset({"OPTAttention"})


def generic_unsupported_reason(config: Any) -> str | None:
    """Why the generic path cannot run `config`, or None if it can (checked before building)."""
    return _hf_class(config)[1]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and isinstance(getattr(m, "scaling", None), float)
        and getattr(m, "is_causal", False)
    ]


class GenericCausalLM(ModelBase):
    """Any transformers causal LM, its attention routed to hallm's paged attention.

    Same interface as the native models; parameters live under `hf_model.` (HF's own names).
    """

    # HF computes real buffers (rotary inv_freq, ...) at init, on whatever device is current.
    supports_meta_init: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        cls, reason = _hf_class(config)
        if cls is None:
            raise ConfigError(f"the generic transformers path cannot run this model: {reason}")
        _register()
        config = copy.deepcopy(config)  # from_config writes dtype and attn implementation into it
        self.config = config
        self.hf_model = cls._from_config(
            config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.get_default_dtype()
        )
        self.hf_model.eval()
        modules = _attention_modules(self.hf_model)
        expected = getattr(config, "num_hidden_layers", None)
        if not modules or (expected is not None and len(modules) != expected):
            raise ConfigError(
                f"the generic path found {len(modules)} attention modules in {cls.__name__}, expected "
                f"{expected}; this architecture needs a native hallm model"
            )
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        soft_cap = getattr(config, "attn_logit_softcapping", None)
        for module in modules:
            module = cast(Any, module)  # an HF attention module; attributes checked above
            head_size = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
            head_size = head_size or config.hidden_size // num_heads
            # Pre-scaled q: the scale is already in q, the softmax takes 1.0 (as the module passes).
            scale = 1.0 if type(module).__name__ in _PRESCALED_Q else module.scaling
            module.hallm_attn = Attention(
                num_heads,
                head_size,
                scale,
                num_kv_heads,
                module.layer_idx,
                sliding_window=layer_sliding_window(config, module.layer_idx),
                logits_soft_cap=soft_cap,
                # gpt-oss's attention modules own their sink logits and pass them as `s_aux`.
                sinks=isinstance(getattr(module, "sinks", None), nn.Parameter),
            )
        # HF's long-rope picks its factors once per forward, i.e. for the whole packed step:
        # replace it with hallm's per-request choice.
        for parent in list(self.hf_model.modules()):
            for child_name, child in list(parent.named_children()):
                if is_hf_longrope_rotary(child):
                    setattr(parent, child_name, LongRopeCosSin(child))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] -> final hidden states [T, hidden] (batch of one inside)."""
        out = self._decoder()(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False, return_dict=True
        )
        return out.last_hidden_state[0]

    def _decoder(self) -> Any:
        """The decoder stack: `.model` where it is one (Llama-4's base_model_prefix,
        "language_model", names no attribute, so `base_model` is the whole causal LM), else
        `base_model`."""
        from transformers import PreTrainedModel

        inner = getattr(self.hf_model, "model", None)
        return inner if isinstance(inner, PreTrainedModel) else self.hf_model.base_model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], with the model's logit post-processing."""
        logits = self.hf_model.get_output_embeddings()(hidden).float()
        cfg = self.config
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere multiplies
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite divides
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF checkpoint weights into the wrapped model.

        Checkpoint names go through transformers' own renamings for the model (e.g. GPT-NeoX's
        `embed_out` -> `lm_head`); checkpoints that need tensor conversions (fused MoE experts,
        ...) are refused with CheckpointMismatchError.
        """
        all_names = {n for n, _ in self.hf_model.named_parameters(remove_duplicate=False)}
        tied = frozenset(all_names - {n for n, _ in self.hf_model.named_parameters()})
        loaded = load_checkpoint_weights(
            self.hf_model,
            self._renamed(weights),
            ignore_suffixes=("rotary_emb.inv_freq",),
            ignore_names=tied,
        )
        return {_PREFIX + n for n in loaded | tied}

    def _renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(self.hf_model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters: list[Any] = [t for t in transforms if not isinstance(t, WeightRenaming)]
        # rename_source_key adds/strips the base-model prefix by looking names up here.
        model_names = dict.fromkeys(self.hf_model.state_dict(), True)
        prefix = self.hf_model.base_model_prefix
        text_prefixes: dict[str, str] | None = getattr(self.config, TEXT_WEIGHT_PREFIXES, None)
        for name, tensor in weights:
            if text_prefixes is not None:  # a multimodal checkpoint's language model alone
                head = next((p for p in text_prefixes if name.startswith(p)), None)
                if head is None:
                    continue  # vision tower, projector: not part of the text model
                name = text_prefixes[head] + name[len(head) :]
            new, converter = rename_source_key(name, renamings, converters, prefix, model_names)
            if converter is not None:
                raise CheckpointMismatchError(
                    f"checkpoint tensor {name} needs transformers' weight conversion ({converter}), which "
                    "hallm's generic path does not do; this architecture needs a native hallm model"
                )
            yield new, tensor
