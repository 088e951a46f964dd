"""The CUDA platform's attention backends, most preferred first.

`TritonPagedAttention` (hallm.ops.triton) serves every layer the engine supports: any head size
up to 256, any block size, bf16/fp16/fp32, sliding window and soft cap. Importing this module
imports triton.
"""

from __future__ import annotations

from collections.abc import Callable

from hallm.ops.triton.backend import TritonAttentionMetadata, TritonPagedAttention
from hallm.ops.triton.target import TritonTarget
from hallm.platforms import AttentionBackend

__all__ = ["TritonAttentionMetadata", "TritonPagedAttention", "backends"]


def backends(target: Callable[[], TritonTarget]) -> list[type[AttentionBackend]]:
    """Backends in order of preference, launching for the target `target()` describes (asked
    when a layer's backend is made; flash-attn/flashinfer backends are not written yet)."""
    return [TritonPagedAttention.for_target(target)]
