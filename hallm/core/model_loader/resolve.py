"""`resolve_model`: turn the user's --model/--tokenizer into local HF directories, once, in the
parent process, so workers only ever load an HF directory (or dummy weights)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from hallm.core.model_loader.hf import load_config
from hallm.core.model_loader.source import default_model_path, resolve_source, resolve_tokenizer_source
from hallm.platforms import ConfigError

_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """model_dir: HF directory to load (a GGUF's converted cache directory); tokenizer_dir: where
    the tokenizer lives; load_format: "safetensors" or "dummy" (what `load_model` should do with
    model_dir); hf_config: the transformers config; display_name: a short name for logs and the
    server's model id; gguf_path: the original GGUF file, if any."""

    model_dir: str
    tokenizer_dir: str
    load_format: str
    hf_config: Any
    display_name: str
    gguf_path: str | None = None


def resolve_model(
    model: str | os.PathLike[str] | None,
    load_format: str = "auto",
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ResolvedModel:
    """Resolve `model` (None: the default SmolLM2 GGUF) and `tokenizer` (None: the model's).

    A GGUF file is converted into hallm's cache here (once per file), so the result always
    names HF directories.
    """
    if load_format not in _FORMATS:
        raise ConfigError(f"unknown load format {load_format!r}; valid: {', '.join(_FORMATS)}")
    given = model
    if model is None:
        model = default_model_path()
    source = resolve_source(model, gguf_file)
    if load_format == "gguf" and source.gguf_path is None:
        raise ConfigError(f"load_format='gguf' but {model} is not a GGUF file")
    if load_format == "safetensors" and source.hf_dir is None:
        raise ConfigError(f"load_format='safetensors' but {model} is a GGUF file")
    model_dir = source.local_dir(cache_dir)
    if source.gguf_path is not None:
        name = source.gguf_path.stem
    else:
        name = str(given) if given is not None else model_dir.name
    tokenizer_dir = model_dir
    if tokenizer is not None:
        tokenizer_dir = resolve_tokenizer_source(tokenizer).local_dir(cache_dir)
    return ResolvedModel(
        model_dir=str(model_dir),
        tokenizer_dir=str(tokenizer_dir),
        load_format="dummy" if load_format == "dummy" else "safetensors",
        hf_config=load_config(model_dir),
        display_name=name,
        gguf_path=str(source.gguf_path) if source.gguf_path is not None else None,
    )
