"""Which model class runs a checkpoint: plugin models, then native ones, then the generic path."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any

from hallm.platforms import ConfigError

#: HF architecture name -> "module:Class" of hallm's native implementation (imported lazily).
NATIVE_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "hallm.core.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "hallm.core.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "hallm.core.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "hallm.core.models.llama:Qwen3ForCausalLM",
    "MixtralForCausalLM": "hallm.core.models.moe:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "hallm.core.models.moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "hallm.core.models.moe:Qwen3MoeForCausalLM",
    "OlmoeForCausalLM": "hallm.core.models.moe:OlmoeForCausalLM",
    "GptOssForCausalLM": "hallm.core.models.gpt_oss:GptOssForCausalLM",
}

_GENERIC_NOTE = (
    "any other transformers causal LM whose attention goes through transformers' attention-function "
    "interface runs through hallm's generic path"
)


def supported_architectures(extra: Mapping[str, type] | None = None) -> list[str]:
    """Architectures with a dedicated (native or plugin-contributed) implementation."""
    return sorted({*NATIVE_MODELS, *(extra or {})})


def architecture_of(hf_config: Any) -> str:
    """`config.architectures[0]`, else the causal-LM class transformers maps `model_type` to."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return str(archs[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", ""))
    if name is None:
        raise ConfigError(
            "config.json names no architecture ('architectures' is empty) and its model_type "
            f"{getattr(hf_config, 'model_type', None)!r} has no causal-LM class; supported: "
            f"{supported_architectures()}"
        )
    return name


#: Attribute set on a multimodal checkpoint's text config (see `text_model_config`): the weight
#: name prefixes of its language model, stripped at load; other weights (vision) are skipped.
TEXT_WEIGHT_PREFIXES = "hallm_text_weight_prefixes"


def text_model_config(hf_config: Any) -> Any:
    """The config hallm runs: `hf_config` itself, or, for a multimodal checkpoint whose
    config nests a `text_config` of a causal-LM model (Gemma-3 as published:
    `Gemma3ForConditionalGeneration`), that text config alone, named as its causal-LM class and
    carrying the language model's weight prefixes (`TEXT_WEIGHT_PREFIXES`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = getattr(hf_config, "text_config", None)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text, "model_type", ""))
    if text is None or text is hf_config or name is None:
        return hf_config
    text = copy.deepcopy(text)
    text.architectures = [name]
    for key in ("dtype", "tie_word_embeddings"):
        if getattr(hf_config, key, None) is not None:
            setattr(text, key, getattr(hf_config, key))
    # Published layout first (language_model.model.*), then transformers v5's (model.language_model.*).
    setattr(
        text,
        TEXT_WEIGHT_PREFIXES,
        {
            "language_model.model.": "model.",
            "model.language_model.": "model.",
            "language_model.lm_head.": "lm_head.",
            "lm_head.": "lm_head.",
        },
    )
    return text


def _import(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def resolve_model_class(hf_config: Any, extra: Mapping[str, type] | None = None) -> type:
    """The model class for `hf_config`.

    Order: `extra` (plugin-contributed, from the `hallm_models` hook), hallm's native models,
    then `GenericCausalLM` if transformers can run the architecture through hallm's attention.
    Raises ConfigError listing the supported architectures otherwise.
    """
    arch = architecture_of(hf_config)
    if extra and arch in extra:
        return extra[arch]
    if arch in NATIVE_MODELS:
        return _import(NATIVE_MODELS[arch])
    from hallm.core.models.generic import GenericCausalLM, generic_unsupported_reason

    reason = generic_unsupported_reason(hf_config)
    if reason is None:
        return GenericCausalLM
    raise ConfigError(
        f"model architecture {arch!r} is not supported ({reason}). Natively supported: "
        f"{', '.join(supported_architectures(extra))}; {_GENERIC_NOTE}. A plugin can add an "
        "architecture through the hallm_models hook."
    )
