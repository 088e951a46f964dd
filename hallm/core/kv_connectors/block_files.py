"""Loading block files (blocks.encode_block) into the KV caches with few host copies.

Each file's payload is read straight into a slot of a host staging buffer (one copy, from the
page cache or the disk) and checksummed there. A chunk of slots goes to the device in one copy
(page-locked staging makes it a DMA that needs no CPU) and is scattered into every layer's cache
on the device. Files are read on a small thread pool (file reads and xxhash release the GIL), and
the next chunk is read while the previous one's copy runs, into the other of two staging buffers.
Host and device temporaries are bounded by the chunk size, whatever the number of blocks.

With the caches on the host there is no device copy: each layer is scattered from the staging
buffer itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from hallm.core.kv_connectors.blocks import block_layout, read_block_file

# Bytes of block payloads per chunk: large enough that a copy reaches the link's bandwidth
# (tens of MB), small enough that the two host buffers and the device buffer stay modest.
CHUNK_BYTES = 32 << 20
MAX_READERS = 8

#: A read's outcome: True (intact), False (short, corrupt or of another layout) or the OSError
#: that kept the file from being read.
ReadResult = bool | OSError


def _read(path: Path, out: memoryview, layout: Any) -> ReadResult:
    try:
        return read_block_file(path, out, layout)
    except OSError as e:
        return e


class BlockFileLoader:
    """Reads block files into `caches` (every layer's [2, num_blocks, block_size, ...] tensor)."""

    def __init__(
        self,
        caches: list[torch.Tensor],
        pin: bool,
        chunk_bytes: int = CHUNK_BYTES,
        readers: int | None = None,
    ) -> None:
        self.caches = caches
        self.layout = block_layout(caches)
        self.device = caches[0].device
        self.on_host = self.device.type == "cpu"
        payload = self.layout.payload_bytes
        self.chunk_blocks = max(1, chunk_bytes // payload)
        # Asynchronous copies only from page-locked memory, and only where an event can say when
        # the copy is done (before the buffer is refilled); else copies are synchronous.
        self.events = pin and not self.on_host and _has_events(self.device)
        self.staging = [
            torch.empty(self.chunk_blocks * payload, dtype=torch.uint8, pin_memory=pin and not self.on_host)
            for _ in range(2)
        ]
        self.views = [memoryview(s.numpy()) for s in self.staging]  # type: ignore[arg-type]
        self.copied: list[Any] = [None, None]  # per buffer: event after its last device copy
        self.pool = ThreadPoolExecutor(
            max_workers=readers or min(MAX_READERS, os.cpu_count() or 1), thread_name_prefix="hallm-kv-read"
        )

    def load(self, jobs: list[tuple[int, Path]], accept: Callable[[int, ReadResult], bool]) -> None:
        """Read every job's (block id, file); `accept(i, result)` is called for the jobs in order,
        and job i's block is copied into the caches when it returns True."""
        if not jobs:
            return
        payload = self.layout.payload_bytes
        n = self.chunk_blocks
        chunks = [jobs[i : i + n] for i in range(0, len(jobs), n)]
        # Every destination at once: one small host-to-device copy per load, not one per chunk
        # (each would wait for the chunks already queued).
        block_ids = torch.tensor([b for b, _ in jobs], dtype=torch.long, device=self.device)
        device_buf = None
        if not self.on_host:
            device_buf = torch.empty((min(n, len(jobs)), payload), dtype=torch.uint8, device=self.device)
        pending = self._submit(chunks[0], 0)
        following: list[Future[ReadResult]] = []
        try:
            for c, chunk in enumerate(chunks):
                buf = c % 2
                # Read the next chunk into the other buffer while this one is checked and copied.
                following = self._submit(chunks[c + 1], 1 - buf) if c + 1 < len(chunks) else []
                keep: list[int] = []  # slots of this chunk to copy
                for slot, future in enumerate(pending):
                    if accept(c * n + slot, future.result()):
                        keep.append(slot)
                if keep:
                    self._scatter(buf, keep, block_ids[c * n : c * n + len(chunk)], device_buf)
                pending, following = following, []
        finally:
            # On an error, no read may still be writing into a buffer the next load refills.
            for future in pending + following:
                if not future.cancel():
                    future.exception()

    def _submit(self, chunk: list[tuple[int, Path]], buf: int) -> list[Future[ReadResult]]:
        if self.copied[buf] is not None:
            self.copied[buf].synchronize()  # its last chunk has left for the device
            self.copied[buf] = None
        payload = self.layout.payload_bytes
        view = self.views[buf]
        return [
            self.pool.submit(_read, path, view[i * payload : (i + 1) * payload], self.layout)
            for i, (_, path) in enumerate(chunk)
        ]

    def _scatter(self, buf: int, keep: list[int], dst: torch.Tensor, device_buf: torch.Tensor | None) -> None:
        """Copy slots `keep` of staging buffer `buf` (holding len(dst) blocks) to blocks `dst`."""
        payload = self.layout.payload_bytes
        filled = len(dst)
        src = self.staging[buf][: filled * payload].view(filled, payload)
        if device_buf is not None:
            # The whole chunk in one copy (a skipped slot costs its bytes, not an extra copy).
            device_buf[:filled].copy_(src, non_blocking=self.events)
            if self.events:
                event = torch.Event(device=self.device)
                event.record()
                self.copied[buf] = event
            src = device_buf[:filled]
        if len(keep) < filled:  # a block refused: rare, so an index per chunk is fine here
            slots = torch.tensor(keep, dtype=torch.long, device=self.device)
            src, dst = src.index_select(0, slots), dst.index_select(0, slots)
        offset = 0
        for cache, shape, nbytes in zip(
            self.caches, self.layout.shapes, self.layout.layer_bytes, strict=True
        ):
            # [blocks, 2, block_size, ...] of this layer, strided over the chunk: no copy.
            part = src[:, offset : offset + nbytes].view(cache.dtype).view(len(keep), *shape)
            cache.index_copy_(1, dst, part.transpose(0, 1))
            offset += nbytes

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _has_events(device: torch.device) -> bool:
    try:
        torch.Event(device=device)
    except Exception:  # a device type without events: copies stay synchronous
        return False
    return True
