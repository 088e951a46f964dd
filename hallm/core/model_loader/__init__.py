"""Model loading: HF directories (safetensors), GGUF files (converted once into a cache), and
dummy weights; dtype resolution; tokenizers; the default packaged model."""

from __future__ import annotations

from hallm.core.model_loader.dtype import dtype_name, resolve_dtype
from hallm.core.model_loader.gguf import convert_gguf, gguf_cache_dir
from hallm.core.model_loader.loader import LOAD_FORMATS, LoadedModel, build_model, load_model
from hallm.core.model_loader.resolve import ResolvedModel, resolve_model
from hallm.core.model_loader.source import (
    ModelSource,
    default_model_path,
    resolve_source,
    resolve_tokenizer_source,
)
from hallm.core.model_loader.tokenizer import load_tokenizer
from hallm.platforms.paths import cache_root

__all__ = [
    "LOAD_FORMATS",
    "LoadedModel",
    "ModelSource",
    "ResolvedModel",
    "build_model",
    "cache_root",
    "convert_gguf",
    "default_model_path",
    "dtype_name",
    "gguf_cache_dir",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model",
    "resolve_source",
    "resolve_tokenizer_source",
]
