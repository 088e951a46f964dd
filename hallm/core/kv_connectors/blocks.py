"""What the core's connectors share: the KV-cache layout they move blocks of, the identity of a
block's content beyond its prefix hash, and the request's block hashes.

A connector moves whole blocks. With the default layout (AttentionBackend.kv_cache_shape),
layer tensor [2, num_blocks, block_size, num_kv_heads, head_size] holds block b at [:, b].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash

from hallm.core.kv_cache.hashing import extend_block_hashes
from hallm.platforms import ConfigError


def check_layout(caches: dict[str, torch.Tensor], block_size: int, connector: str) -> None:
    """Refuse a KV-cache layout whose blocks are not `cache[:, b]`."""
    for name, cache in caches.items():
        if cache.dim() < 3 or cache.shape[0] != 2 or cache.shape[2] != block_size:
            raise ConfigError(
                f"KV connector {connector!r} moves blocks of the default KV-cache layout "
                f"[2, num_blocks, block_size={block_size}, ...]; layer {name} has shape {tuple(cache.shape)} "
                "(its attention backend lays the cache out otherwise)"
            )


def block_hashes(request: Any, block_size: int) -> list[bytes]:
    """The request's prefix-cache block hashes for its full blocks (computed where missing)."""
    extend_block_hashes(
        request.block_hashes, request.all_token_ids, block_size, extra_keys=request.extra_keys
    )
    hashes: list[bytes] = request.block_hashes
    return hashes


def loadable_tokens(request: Any, num_computed: int, block_size: int, held: Callable[[bytes], bool]) -> int:
    """Prompt tokens past `num_computed` a connector can load: the full blocks, in order, whose
    hash `held` says it has, up to the block holding the last token (that one is always computed,
    so the step has a token to sample from)."""
    hashes = block_hashes(request, block_size)
    limit = min(len(hashes), (request.num_tokens - 1) // block_size)
    n = 0
    for i in range(num_computed // block_size, limit):
        if not held(hashes[i]):
            break
        n += 1
    return n * block_size


def model_identity(config: Any) -> str:
    """A short hex id of everything besides the tokens that decides a block's KV: the model (its
    resolved path and config), the dtypes and the block size. Instances share blocks only when
    they agree on all of it."""
    model = config.model
    hf = getattr(model, "hf_config", None)
    hf_dict: dict[str, Any] = {}
    if hf is not None and hasattr(hf, "to_dict"):
        hf_dict = {k: v for k, v in hf.to_dict().items() if not k.startswith("_")}
    parts = {
        "model": os.path.realpath(model.model),
        "load_format": model.load_format,
        "seed": model.seed if model.load_format == "dummy" else None,  # random weights differ by seed
        "hf_config": hf_dict,
        "dtype": model.dtype,
        "kv_cache_dtype": config.cache.kv_cache_dtype,
        "block_size": config.cache.block_size,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            pos, first, n = runs[-1]
            runs[-1] = (pos, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


def load_blocks(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """dst[:, dst_idx] = src[:, src_ids], `src` on the host (a pinned pool makes this pure DMA),
    `dst` a device cache ([2, blocks, ...] both; dst_idx long [n] on dst's device).

    Two copies (K, V) per run of consecutive source blocks, each from one contiguous host range
    into a device buffer, then one scatter on the device: no host-side gather or packing, and no
    copy per block."""
    staged = torch.empty((2, len(src_ids), *src.shape[2:]), dtype=src.dtype, device=dst.device)
    for pos, first, n in _runs(src_ids):
        # K and V apart: src[:, a:b] is two separate ranges of host memory, and a strided host
        # tensor would be packed into a pageable temporary on the CPU first.
        for kv in range(2):
            staged[kv, pos : pos + n].copy_(src[kv, first : first + n], non_blocking=True)
    dst.index_copy_(1, dst_idx, staged)


def store_blocks(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_ids: list[int]) -> None:
    """dst[:, dst_ids] = src[:, src_idx], `src` a device cache, `dst` a host pool: one gather on
    the device, then one copy per run of consecutive destination slots. Only copies read the
    pool (never the host's code), so stream order is all a later `load_blocks` needs."""
    gathered = src.index_select(1, src_idx)
    for pos, first, n in _runs(dst_ids):
        for kv in range(2):  # contiguous ranges on both sides (see load_blocks)
            dst[kv, first : first + n].copy_(gathered[kv, pos : pos + n], non_blocking=True)


def gather_blocks(cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """cache[:, block_ids] on the host: [2, len(block_ids), block_size, ...]."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    return cache.index_select(1, idx).cpu()


MAGIC = b"HALLMKV1"
HEADER = struct.Struct("<8sQQI")  # magic, payload bytes, xxh3-64 of the payload, description bytes


def encode_block(layers: list[torch.Tensor]) -> bytes:
    """One block of every layer ([2, block_size, ...] each, on the host) as bytes: header (magic,
    payload length, xxh3-64 of the payload, description length), a JSON description (dtype,
    per-layer shapes), the payload."""
    return b"".join(encode_block_parts(layers))


def encode_block_parts(layers: list[torch.Tensor]) -> list[bytes | memoryview]:
    """`encode_block`'s bytes as pieces to write one after the other: header, description, then
    each layer's bytes as a view of its tensor (no copy where the tensor is contiguous)."""
    views = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in layers]  # type: ignore[arg-type]
    hasher = xxhash.xxh3_64()  # the same digest as over the joined payload
    for v in views:
        hasher.update(v)
    size = sum(len(v) for v in views)
    desc = json.dumps({"dtype": str(layers[0].dtype), "shapes": [list(t.shape) for t in layers]}).encode()
    return [HEADER.pack(MAGIC, size, hasher.intdigest(), len(desc)), desc, *views]


def decode_block(blob: bytes, caches: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """`encode_block`'s per-layer tensors, or None unless `blob` is whole (length), intact
    (checksum) and of the layout of `caches` (dtype, per-layer block shape)."""
    if len(blob) < HEADER.size:
        return None
    magic, size, digest, desc_len = HEADER.unpack_from(blob)
    desc_end = HEADER.size + desc_len
    if magic != MAGIC or len(blob) != desc_end + size:
        return None
    payload = memoryview(blob)[desc_end:]
    if xxhash.xxh3_64_intdigest(payload) != digest:
        return None
    try:
        desc = json.loads(bytes(blob[HEADER.size : desc_end]))
    except ValueError:
        return None
    shapes = [[2, *c.shape[2:]] for c in caches]
    if desc.get("dtype") != str(caches[0].dtype) or desc.get("shapes") != shapes:
        return None
    out, offset = [], 0
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    for cache, shape in zip(caches, shapes, strict=True):
        n = cache.element_size() * int(torch.Size(shape).numel())
        out.append(raw[offset : offset + n].view(cache.dtype).view(shape))
        offset += n
    return out


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """What a block file of these caches must describe, and where each layer's bytes sit in its
    payload (layers in order, each [2, block_size, ...] of the caches' dtype)."""

    dtype: str
    shapes: list[list[int]]
    layer_bytes: list[int]
    desc: bytes  # encode_block's description of this layout, byte for byte

    @property
    def payload_bytes(self) -> int:
        return sum(self.layer_bytes)

    def describes(self, desc: bytes) -> bool:
        if desc == self.desc:
            return True  # what encode_block writes: no JSON parse per file
        try:
            parsed = json.loads(desc)
        except ValueError:
            return False
        return (
            isinstance(parsed, dict)
            and parsed.get("dtype") == self.dtype
            and parsed.get("shapes") == self.shapes
        )


def block_layout(caches: list[torch.Tensor]) -> BlockLayout:
    shapes = [[2, *c.shape[2:]] for c in caches]
    dtype = str(caches[0].dtype)
    return BlockLayout(
        dtype=dtype,
        shapes=shapes,
        layer_bytes=[
            c.element_size() * int(torch.Size(s).numel()) for c, s in zip(caches, shapes, strict=True)
        ],
        desc=json.dumps({"dtype": dtype, "shapes": shapes}).encode(),
    )


def read_block_file(path: Path, out: memoryview, layout: BlockLayout) -> bool:
    """Read an `encode_block` file's payload straight into `out` (layout.payload_bytes long): True
    when the file is whole (length), intact (checksum over `out`, no copy) and of `layout`, else
    False (then `out` holds garbage). OSError where the file cannot be opened or read."""
    with open(path, "rb", buffering=0) as f:
        file_bytes = os.fstat(f.fileno()).st_size
        head = f.read(HEADER.size)
        if head is None or len(head) < HEADER.size:
            return False
        magic, size, digest, desc_len = HEADER.unpack(head)
        if magic != MAGIC or file_bytes != HEADER.size + desc_len + size or size != len(out):
            return False
        desc = f.read(desc_len)
        if desc is None or len(desc) != desc_len or not layout.describes(desc):
            return False
        done = 0
        while done < size:
            n = f.readinto(out[done:])
            if not n:
                return False  # shorter than it said
            done += n
    return bool(xxhash.xxh3_64_intdigest(out) == digest)
