"""Block hashes for the prefix cache.

A block's hash chains its parent block's hash, its token ids, and extra keys that change its
content (adapters, multimodal inputs). xxh3-128: 128 bits make a collision (which would hand one
request another's KV) negligible, it is fast, and unlike Python's `hash` it is the same in
every process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

NONE_HASH = b"\x00" * 16


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: bytes = b"") -> bytes:
    h = xxhash.xxh3_128()
    h.update(parent if parent is not None else NONE_HASH)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_keys:
        h.update(len(extra_keys).to_bytes(8, "little"))
        h.update(extra_keys)
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    num_tokens: int | None = None,
    extra_keys: bytes = b"",
) -> None:
    """Append the hashes of the full blocks of `token_ids[:num_tokens]` not in `hashes` yet."""
    num_full = (len(token_ids) if num_tokens is None else num_tokens) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys))
