"""Tokenizer loading: transformers' AutoTokenizer on the model's HF directory (local files only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hallm.core.model_loader.source import resolve_tokenizer_source
from hallm.platforms import ConfigError

#: File patterns any one of which gives transformers a vocabulary to build a tokenizer from.
TOKENIZER_FILES = ("tokenizer.json", "*.model", "*.tiktoken", "vocab.*", "merges.txt")


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
    root = Path(folder)
    if not trust_remote_code and root.is_dir() and not any(any(root.glob(p)) for p in TOKENIZER_FILES):
        raise ConfigError(
            f"{folder} has no tokenizer files (none of {list(TOKENIZER_FILES)}); copy the tokenizer files "
            "next to the model, pass --tokenizer <directory with them>, or use skip_tokenizer_init=True "
            "to send and receive token ids only"
        )
    return AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=trust_remote_code
    )
