"""The request-side metrics of several API server processes that serve one engine.

Several API server processes may share one listening socket and one engine. A scrape of
`/metrics` lands on any one of them, so the request-side numbers it exports (token counters,
latency histograms, finished sequences) are the sum over all of them; the engine gauges need no
sum, every process receives the same engine stats. Each process publishes a `StreamSnapshot` of
its own numbers to a file of a shared private directory (about once a second, and when scraped)
and adds up the others' latest files at scrape time. Files keep the hot path free of locks and
shared memory, and a process that dies leaves its last numbers in place, so the sums never go
backwards; each file is replaced whole with `os.replace`, so a reader sees an older or a newer
snapshot, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os

import msgspec


class StreamSnapshot(msgspec.Struct, array_like=True):
    """The request-side numbers of one API server process, totals since it started: what
    `MetricsShare` passes between processes. Histograms are their per-bucket counts (not
    cumulative, +Inf last) and the sum of their observations; `success_created` is when each
    finish reason was first counted (the counter's `_created` sample)."""

    prompt_tokens: int
    generation_tokens: int
    ttft_counts: list[int]
    ttft_sum: float
    tpot_counts: list[int]
    tpot_sum: float
    e2e_counts: list[int]
    e2e_sum: float
    success: dict[str, int]
    success_created: dict[str, float]

    def add(self, other: StreamSnapshot) -> None:
        """Add `other`'s numbers to these (in place)."""
        self.prompt_tokens += other.prompt_tokens
        self.generation_tokens += other.generation_tokens
        for mine, theirs in (
            (self.ttft_counts, other.ttft_counts),
            (self.tpot_counts, other.tpot_counts),
            (self.e2e_counts, other.e2e_counts),
        ):
            for i, count in enumerate(theirs):
                mine[i] += count
        self.ttft_sum += other.ttft_sum
        self.tpot_sum += other.tpot_sum
        self.e2e_sum += other.e2e_sum
        for reason, count in other.success.items():
            self.success[reason] = self.success.get(reason, 0) + count
        for reason, created in other.success_created.items():
            self.success_created[reason] = min(created, self.success_created.get(reason, created))


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(StreamSnapshot)


def encode_snapshot(snapshot: StreamSnapshot) -> bytes:
    return _snapshot_encoder.encode(snapshot)


def decode_snapshot(data: bytes) -> StreamSnapshot:
    """The snapshot in `data`; raises `msgspec.DecodeError` when it is not one of this build's."""
    return _snapshot_decoder.decode(data)


class MetricsShare:
    """The request-side metrics of `count` API server processes that serve one engine: process
    `index` publishes its snapshot to its own file of `directory` (private to the server, created
    and removed by it) and reads the others'."""

    def __init__(self, directory: str, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"index {index} is not in [0, {count})")
        self.directory = directory
        self.index = index
        self.count = count
        self._path = self._path_of(index)
        # one writer per index, so a fixed temporary name cannot clash
        self._tmp_path = os.path.join(directory, f".{index}.tmp")

    def _path_of(self, index: int) -> str:
        return os.path.join(self.directory, f"{index}.msgpack")

    def publish(self, snapshot: bytes) -> None:
        """Make `snapshot` this process' latest, atomically: readers see the previous one or this."""
        try:
            with open(self._tmp_path, "wb") as f:
                f.write(snapshot)
            os.replace(self._tmp_path, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_path)
            raise

    def read_others(self) -> list[bytes]:
        """The latest snapshot of every other process that has published one."""
        out = []
        for index in range(self.count):
            if index == self.index:
                continue
            try:
                with open(self._path_of(index), "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:  # not published yet
                continue
        return out
