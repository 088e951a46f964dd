"""Tokenizer loading: transformers' AutoTokenizer on the model's HF directory (local files only)."""

from __future__ import annotations

import os
from typing import Any

from hallm.core.model_loader.source import resolve_tokenizer_source


def load_tokenizer(
    model_path: str | os.PathLike[str],
    gguf_file: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The tokenizer of an HF directory (model or tokenizer-only), or of a GGUF file (from its
    converted cache directory)."""
    from transformers import AutoTokenizer

    folder = resolve_tokenizer_source(model_path, gguf_file).local_dir(cache_dir)
    return AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=trust_remote_code
    )
