"""What the multi-process executors (`mp`, `ray`) share: the error a dead rank raises, and the
setup calls that go to every rank and combine their answers."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from hallm.platforms import Executor


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited, failed or stopped answering."""


class RanksExecutor(Executor):
    """An executor whose setup calls run on every rank (`_call_all`, answers in rank order)."""

    @abstractmethod
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` of every rank's worker; their results in rank order."""

    def available_kv_cache_bytes(self) -> int:
        # Every rank holds the same number of blocks: the budget is the smallest rank's.
        return min(int(b) for b in self._call_all("available_kv_cache_bytes"))

    def kv_cache_bytes_per_block(self) -> int:
        return max(int(b) for b in self._call_all("bytes_per_block"))

    def init_kv_cache(self, num_blocks: int) -> None:
        self._call_all("init_kv_cache", num_blocks)
