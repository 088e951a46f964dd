"""`shared_storage`: KV blocks saved to and loaded from a directory (local disk or a shared
filesystem), so a prefill instance can hand a prompt's KV to a decode instance, and any instance
finds any other's prefixes.

One file per full block, named by its prefix-cache block hash (which chains the whole prefix)
under a directory named by the model identity (blocks.model_identity). A file holds every
layer's KV of the block: header (magic, payload length, xxh3-64 of the payload, a JSON
description of dtype and per-layer shapes) then the payload. Writers write a temporary file and
rename it over the final name, so readers never see a partial file and concurrent writers of one
block are harmless (both write the same bytes). (The format: blocks.encode_block.) A file that
is short, fails its checksum or describes another layout is ignored (counted as
"corrupt_blocks", deleted where possible) and its request recomputes. Loads read each file
straight into a host staging buffer on a few threads, check it there and move it to the device
a chunk of blocks at a time (block_files). With `max_storage_bytes`, the oldest files (by mtime;
a load refreshes a file's mtime) are deleted once the directory grows past the cap. A directory
that cannot be written (read-only, full) costs the save, counted as "save_failures", never the
request.

With tensor parallelism each rank saves and loads its own shard of the KV heads, one file per
block and rank, named `<hash>.tp<size>-<rank>.kvb` (one rank: `<hash>.kvb`): ranks write and
read in parallel with no traffic between them, and an instance of another tensor-parallel size
never reads a shard of another split (it looks for other names). A block is offered only when
every rank's file is there; a rank whose file is gone or corrupt by the time it loads fails the
request's load, which the engine then recomputes on every rank. `max_storage_bytes` caps the
whole directory (every rank's files; each rank's worker evicts the oldest files it finds).

kv_connector_extra_config: shared_storage_path (required), max_storage_bytes (optional).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from hallm.core.kv_connectors.block_files import BlockFileLoader, ReadResult
from hallm.core.kv_connectors.blocks import (
    block_hashes,
    check_layout,
    encode_block_parts,
    loadable_tokens,
    model_identity,
)
from hallm.platforms import BatchLayout, ConfigError, KVConnector, KVConnectorRole

logger = logging.getLogger("hallm.kv_connector")

SUFFIX = ".kvb"


@dataclasses.dataclass
class StorageStepMeta:
    loads: dict[str, list[tuple[int, bytes]]]  # request id -> [(block id, block hash)] in order
    saves: list[tuple[int, bytes]]  # (block id, block hash) to write after the forward


def storage_settings(config: Any) -> tuple[Path, int | None, bool, bool]:
    """(directory, byte cap, produces, consumes) from the engine config's kv_transfer."""
    kv = config.kv_transfer
    extra = kv.kv_connector_extra_config if kv is not None else {}
    path = extra.get("shared_storage_path")
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "the shared_storage KV connector needs kv_connector_extra_config "
            '{"shared_storage_path": DIR} (a directory every instance can reach)'
        )
    cap = extra.get("max_storage_bytes")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        raise ConfigError(f"max_storage_bytes must be a positive integer (bytes), got {cap!r}")
    produces = kv is None or kv.is_producer
    consumes = kv is None or kv.is_consumer
    return Path(path) / model_identity(config), cap, produces, consumes


class SharedStorageConnector(KVConnector):
    name = "shared_storage"

    def __init__(self, config: Any, role: KVConnectorRole) -> None:
        super().__init__(config, role)
        self.dir, self.max_bytes, self.produces, self.consumes = storage_settings(config)
        self.block_size = int(config.cache.block_size)
        # scheduler side
        self._loads: dict[str, list[tuple[int, bytes]]] = {}
        self._saves: list[tuple[int, bytes]] = []
        # worker side
        self._caches: dict[str, torch.Tensor] = {}
        self._meta: StorageStepMeta | None = None
        self._failed: set[str] = set()
        self._gathered: dict[str, torch.Tensor] = {}  # layer -> [n, 2, block_size, ...] on the host
        self._save_idx: torch.Tensor | None = None  # this step's saved block ids, on the device
        self._stats: dict[str, int] = {}
        self._dir_bytes: int | None = None  # running estimate of the directory's size
        self._loader: BlockFileLoader | None = None

    def path(self, block_hash: bytes, rank: int | None = None) -> Path:
        """The file of `rank`'s shard of a block (default: this instance's rank)."""
        if self.tp_size == 1:
            return self.dir / (block_hash.hex() + SUFFIX)
        rank = self.tp_rank if rank is None else rank
        return self.dir / f"{block_hash.hex()}.tp{self.tp_size}-{rank}{SUFFIX}"

    def _held(self, block_hash: bytes) -> bool:
        """Every rank's shard of the block is saved."""
        return all(self.path(block_hash, r).is_file() for r in range(self.tp_size))

    # ---- scheduler side ---------------------------------------------------------------------

    def num_external_tokens(self, request: Any, num_computed: int) -> int:
        if not self.consumes:
            return 0
        return loadable_tokens(request, num_computed, self.block_size, self._held)

    def on_blocks_allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        hashes = block_hashes(request, self.block_size)
        if num_external > 0:
            start = request.num_computed_tokens // self.block_size
            end = start + num_external // self.block_size
            self._loads[request.request_id] = [(block_ids[i], hashes[i]) for i in range(start, end)]
        elif self.produces:
            full = min(request.num_prompt_tokens // self.block_size, len(block_ids))
            # Each rank skips the shards it finds saved (see _write).
            self._saves += [(block_ids[i], hashes[i]) for i in range(full) if not self._held(hashes[i])]

    def build_step_meta(self) -> StorageStepMeta:
        meta = StorageStepMeta(self._loads, self._saves)
        self._loads, self._saves = {}, []
        return meta

    # ---- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, caches: dict[str, torch.Tensor]) -> None:
        check_layout(caches, self.block_size, self.name)
        self._caches = caches
        if self.consumes:  # page-locked staging is slow to allocate: not in the first load
            self._loader = self._new_loader()

    def _new_loader(self) -> BlockFileLoader:
        first = next(iter(self._caches.values()))
        return BlockFileLoader(
            list(self._caches.values()), self.pin_host_memory and first.device.type != "cpu"
        )

    def _count(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    def take_stats(self) -> dict[str, int]:
        stats, self._stats = self._stats, {}
        return stats

    def failed_loads(self) -> set[str]:
        return set(self._failed)

    def start_load(self, meta: StorageStepMeta) -> None:
        self._meta, self._failed, self._gathered, self._save_idx = meta, set(), {}, None
        jobs = [
            (req_id, block_id, self.path(h))
            for req_id, blocks in meta.loads.items()
            for block_id, h in blocks
        ]
        if not jobs:
            return
        if self._loader is None:
            self._loader = self._new_loader()
        self._loader.load(
            [(b, path) for _, b, path in jobs], lambda i, result: self._accept(*jobs[i], result)
        )

    def _accept(self, req_id: str, block_id: int, path: Path, result: ReadResult) -> bool:
        """Whether a block read (in request order) is copied into the cache. A request with a
        missing or corrupt block is recomputed whole, so its later blocks are ignored (neither
        counted nor deleted); its earlier blocks may have been copied already (verified KV of
        those very positions, which the recompute writes again)."""
        if req_id in self._failed:
            return False
        if isinstance(result, OSError):  # evicted, or deleted by another instance, since the scheduler looked
            self._count("missing_blocks")
            logger.warning("KV block %s could not be read (%s); recomputing", path.name, result)
        elif not result:
            self._count("corrupt_blocks")
            logger.warning("KV block file %s is truncated or corrupt; ignoring it and recomputing", path)
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last to be evicted
            return True
        self._failed.add(req_id)
        return False

    def save_layer(self, layer_name: str, kv_cache: torch.Tensor, layout: BatchLayout) -> None:
        if self._meta is None or not self._meta.saves:
            return
        if self._save_idx is None:  # once per step: each host-to-device copy waits for the device
            ids = [b for b, _ in self._meta.saves]
            self._save_idx = torch.tensor(ids, dtype=torch.long, device=kv_cache.device)
        # Block-major ([n, 2, block_size, ...]), arranged where the cache is: each block's layer
        # is then one contiguous host range that goes to its file with no further copy.
        gathered = kv_cache.index_select(1, self._save_idx).transpose(0, 1).contiguous()
        self._gathered[layer_name] = gathered.cpu()

    def wait_save(self) -> None:
        if self._meta is None or not self._meta.saves or not self._gathered:
            return
        layers = [self._gathered[name] for name in self._caches]
        for j, (_, block_hash) in enumerate(self._meta.saves):
            self._write(block_hash, [layer[j] for layer in layers])
        self._gathered, self._save_idx = {}, None
        if self.max_bytes is not None and self._dir_bytes is not None and self._dir_bytes > self.max_bytes:
            self._evict()

    # ---- files ------------------------------------------------------------------------------

    def _write(self, block_hash: bytes, layers: list[torch.Tensor]) -> None:
        path = self.path(block_hash)
        if path.is_file():
            return  # another instance (or an earlier step) saved it
        parts = encode_block_parts(layers)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.writelines(parts)
            os.replace(tmp, path)
        except OSError as e:
            self._count("save_failures")
            logger.warning("could not save KV block to %s (%s); the prompt is not shared", path, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._count("tokens_saved", self.block_size)
        if self._dir_bytes is None:
            self._dir_bytes = self._scan_bytes()
        else:
            self._dir_bytes += sum(len(part) for part in parts)

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return []
        for entry in entries:
            if entry.name.endswith(SUFFIX):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def _scan_bytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _evict(self) -> None:
        """Delete the oldest files until the directory is under the cap (other instances' files
        count too: the directory is scanned)."""
        assert self.max_bytes is not None
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
                self._count("evicted_blocks")
            except FileNotFoundError:
                pass  # another instance evicted it
            except OSError as e:
                logger.warning("could not evict KV block %s (%s)", path, e)
                break
            total -= size
        self._dir_bytes = total
