"""Model dtype resolution: `auto` or an explicit name, checked against what the platform supports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hallm.platforms import DTYPE_NAMES, ConfigError

#: Accepted spellings -> canonical name (the canonical names are `DTYPE_NAMES`).
_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def dtype_name(dtype: Any) -> str | None:
    """Canonical name of a torch dtype or dtype string (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return _ALIASES.get(str(dtype).removeprefix("torch.").lower(), str(dtype))


def resolve_dtype(
    requested: str, checkpoint_dtype: Any, supported: Sequence[str] = DTYPE_NAMES
) -> torch.dtype:
    """The torch dtype to run the model in.

    requested: "auto" or one of float32|bfloat16|float16 (aliases fp32/float, bf16, fp16/half).
    checkpoint_dtype: the config's `dtype`/`torch_dtype` (torch dtype, string or None = float32).
    supported: the platform's dtype names, its default first.
    `auto` takes the checkpoint's dtype when the platform supports it, else the platform default.
    """
    if not supported:
        raise ConfigError("the platform declares no supported dtypes")
    req = str(requested).lower()
    if req == "auto":
        ckpt = dtype_name(checkpoint_dtype) or "float32"
        name = ckpt if ckpt in supported else supported[0]
        return getattr(torch, name)  # type: ignore[no-any-return]
    canonical = _ALIASES.get(req)
    if canonical is None:
        raise ConfigError(
            f"unknown dtype {requested!r}; valid: auto, {', '.join(DTYPE_NAMES)} "
            "(aliases: fp32, float, bf16, fp16, half)"
        )
    if canonical not in supported:
        raise ConfigError(
            f"dtype {canonical} is not supported on this platform; supported: {', '.join(supported)} "
            "(or pass --dtype auto)"
        )
    return getattr(torch, canonical)  # type: ignore[no-any-return]
