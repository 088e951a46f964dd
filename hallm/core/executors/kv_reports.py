"""KV connector results over tensor-parallel ranks.

Every rank runs its own worker-side connector over its shard of the KV heads, so a step's
connector results are per rank, while only rank 0 answers the step's sampled tokens. For a step
that carries connector instructions (`SchedulerOutput.kv_connector_meta`), every other rank
answers a `KVReport` too, and the engine-side executor merges them into rank 0's output before
the scheduler sees it:

- a load is done only where every rank loaded it (one rank's missing or corrupt shard makes the
  request recompute on all ranks: a rank never computes over KV another rank lacks);
- a send is finished once every rank has reported it, in whichever steps they did;
- the worker-side counters are summed over the ranks (a block each rank saves its shard of
  counts once per rank in "tokens_saved").
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from hallm.core.outputs import ModelRunnerOutput


@dataclasses.dataclass
class KVReport:
    """One rank's connector results of one step (the KV fields of its ModelRunnerOutput)."""

    loaded: set[str]
    finished_sending: set[str]
    stats: dict[str, int]

    @classmethod
    def of(cls, output: Any) -> KVReport:
        return cls(set(output.kv_loaded), set(output.kv_finished_sending), dict(output.kv_connector_stats))


class KVReportMerger:
    """Combines the ranks' reports of each step into rank 0's output (see the module doc)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        #: How many ranks have reported each request's send finished; emitted at world_size.
        self._sent_by: Counter[str] = Counter()
        #: The reports of steps not merged yet, by step id (rank 0's output included).
        self._reports: dict[int, list[KVReport]] = {}

    def add(self, step_id: int, report: KVReport) -> None:
        """One rank's report of step `step_id` (rank 0's too, as `KVReport.of(output)`)."""
        self._reports.setdefault(step_id, []).append(report)
        # Counted as they come, so a send reported in a step nobody waits for is not lost.
        self._sent_by.update(report.finished_sending)

    def complete(self, step_id: int) -> bool:
        """Whether every rank's report of `step_id` has come."""
        return len(self._reports.get(step_id, ())) >= self.world_size

    def merge(self, step_id: int, output: ModelRunnerOutput) -> None:
        """Replace `output`'s KV fields with every rank's combined results for `step_id`."""
        reports = self._reports.pop(step_id, [])
        # Steps resolve in launch order: reports of older steps belong to handles dropped unread.
        for old in [s for s in self._reports if s < step_id]:
            del self._reports[old]
        loaded = set(output.kv_loaded)
        stats: Counter[str] = Counter()
        for report in reports:
            loaded &= report.loaded
            stats.update(report.stats)
        output.kv_loaded = loaded
        output.kv_connector_stats = dict(stats)
        done = {r for r, n in self._sent_by.items() if n >= self.world_size}
        for r in done:
            del self._sent_by[r]
        output.kv_finished_sending = done
