"""Where hallm keeps files it derives at run time (converted GGUF models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

from hallm.platforms.env import CACHE_DIR

CACHE_ENV = CACHE_DIR


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else `$HALLM_CACHE_DIR`, else `~/.cache/hallm`; plugins put build artifacts under it."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "hallm"
