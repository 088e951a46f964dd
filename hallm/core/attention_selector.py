"""Choosing the attention backend for a layer. The core selects, not the platform.

Candidates are the platform's own backends in its order of preference, then those plugins
contribute (`hallm_attention_backends`). The user's `--attention-backend` wins if it can serve
the layer; otherwise the first candidate whose `validate(spec)` finds nothing wrong. Every
refusal names each candidate with its reasons, so the user can see what to change.
"""

from __future__ import annotations

from typing import Any

from hallm.platforms import AttentionBackend, AttentionSpec, BackendSelectionError, Platform
from hallm.platforms.registry import attention_candidates


def describe_spec(spec: AttentionSpec) -> str:
    """A one-line summary of what a layer needs, for error messages."""
    parts = [
        f"dtype={spec.dtype}",
        f"kv_cache_dtype={spec.kv_cache_dtype}",
        f"head_size={spec.head_size}",
        f"block_size={spec.block_size}",
    ]
    if spec.features:
        parts.append(f"features={sorted(spec.features)}")
    return ", ".join(parts)


def select_attention_backend(
    platform: Platform, spec: AttentionSpec, requested: str | None = None
) -> type[AttentionBackend]:
    """The backend class to serve a layer with `spec` on `platform`.

    `requested` (the user's `--attention-backend`) must name a candidate that can serve the
    layer. Raises `BackendSelectionError` listing the available names (unknown request), the
    requested backend's reasons (it cannot serve), or every candidate with its reasons (none
    can serve).
    """
    candidates = attention_candidates(platform)
    if requested is not None:
        by_name = {cls.name: cls for cls in candidates}
        if requested not in by_name:
            available = ", ".join(by_name) or "none"
            raise BackendSelectionError(
                f"attention backend '{requested}' is not available on device '{platform.name}'; "
                f"available: {available} (choose one with --attention-backend)"
            )
        reasons = by_name[requested].validate(spec)
        if reasons:
            raise BackendSelectionError(
                f"attention backend '{requested}' on device '{platform.name}' cannot serve a layer with "
                f"{describe_spec(spec)}: {'; '.join(reasons)}. Drop --attention-backend to let hallm choose, "
                "or change the setting named above"
            )
        return by_name[requested]
    refusals: list[str] = []
    for cls in candidates:
        reasons = cls.validate(spec)
        if not reasons:
            return cls
        refusals.append(f"  {cls.name}: {'; '.join(reasons)}")
    if not candidates:
        raise BackendSelectionError(
            f"device '{platform.name}' has no attention backend: its plugin declares none and no "
            "extension contributes one; reinstall the device plugin"
        )
    raise BackendSelectionError(
        f"no attention backend on device '{platform.name}' can serve a layer with {describe_spec(spec)}:\n"
        + "\n".join(refusals)
        + "\nChange the setting the reasons name (e.g. --dtype, --block-size, --kv-cache-dtype), "
        "or install an extension that provides a backend for it"
    )


def support_matrix(platform: Platform) -> list[dict[str, Any]]:
    """What each candidate backend declares it supports, as rows of plain data (for docs/reports)."""
    return [
        {
            "name": cls.name,
            "dtypes": sorted(cls.dtypes),
            "head_sizes": None if cls.head_sizes is None else sorted(cls.head_sizes),
            "block_sizes": sorted(cls.block_sizes)
            if cls.block_sizes is not None
            else f"multiple of {cls.block_size_multiple}",
            "kv_cache_dtypes": sorted(cls.kv_cache_dtypes),
            "features": sorted(cls.features),
        }
        for cls in attention_candidates(platform)
    ]
