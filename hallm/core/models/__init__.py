"""hallm's model implementations and the class registry.

Every model class follows the interface in `hallm.core.models.interface` (constructor from an
HF config, `forward(input_ids, positions)` over packed tokens, `compute_logits`, `load_weights`
with HF names, `attention_layers()`). `resolve_model_class` picks the class for a config:
plugin-contributed models first, then the native Llama family (`llama.py`), then the generic
path (`generic.py`) that runs any transformers causal LM through hallm's paged attention.
"""

from __future__ import annotations

from hallm.core.models.interface import (
    CausalLM,
    CheckpointMismatchError,
    ModelBase,
    find_attention_layers,
    layer_sliding_window,
)
from hallm.core.models.registry import (
    NATIVE_MODELS,
    architecture_of,
    resolve_model_class,
    supported_architectures,
)

__all__ = [
    "NATIVE_MODELS",
    "CausalLM",
    "CheckpointMismatchError",
    "ModelBase",
    "architecture_of",
    "find_attention_layers",
    "layer_sliding_window",
    "resolve_model_class",
    "supported_architectures",
]
