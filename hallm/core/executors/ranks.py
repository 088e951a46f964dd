"""What the multi-process executors (`mp`, `ray`) share: the error a dead rank raises, the setup
calls that go to every rank and combine their answers, and the step protocol.

Steps: each step carries an id. A rank launches a step (the runner's async path) and then
resolves the one launched before it, so rank 0 answers step N once step N+1 is under way (or at
once when the engine runs synchronously, or when asked with a flush). `execute_async` sends the
step and returns a `RankStep` at once; `RankStep.get()` reads the ranks' answers, in launch order,
up to its own, and flushes the ranks first when nothing was launched after it.

Rank 0 answers each step with its output. For a step with KV connector instructions the other
ranks answer their connector reports too, and the step's output is ready once all have come:
`kv_reports.KVReportMerger` folds them into rank 0's output (a load counts only where every
rank loaded it).
"""

from __future__ import annotations

import time
import weakref
from abc import abstractmethod
from typing import Any

from hallm.core.executors.kv_reports import KVReport, KVReportMerger
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.scheduler_output import SchedulerOutput
from hallm.platforms import Executor, Platform


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited, failed or stopped answering."""


class RankStep:
    """A step launched on the ranks; `get()` waits for its output (rank 0's, with every rank's
    KV connector results merged in when `has_kv`)."""

    def __init__(self, executor: RanksExecutor, step_id: int, has_kv: bool) -> None:
        self.executor = executor
        self.step_id = step_id
        self.has_kv = has_kv
        self.launched_at = time.monotonic()
        #: Rank 0's output once it has come; `done` once the other ranks' reports are in too.
        self.output: ModelRunnerOutput | None = None
        self.done = False

    def get(self) -> ModelRunnerOutput:
        if not self.done:
            self.executor._wait_for(self)
        assert self.output is not None
        return self.output


class RanksExecutor(Executor):
    """An executor whose setup calls run on every rank (`_call_all`, answers in rank order) and
    whose steps follow the protocol above (`_send_launch`, `_send_flush`, `_next_answers`)."""

    #: A step still unanswered after this long is a hung worker.
    step_timeout_s: float = 600.0

    def __init__(self, config: Any, platform: Platform) -> None:
        super().__init__(config, platform)
        worker_cls = platform.worker_class()
        # A platform's own worker may leave out execute_async (see Platform.worker_class).
        self.supports_async = worker_cls is None or callable(getattr(worker_cls, "execute_async", None))
        self._next_step_id = 0
        #: The newest step the ranks were told to answer (launched after, flushed or sync).
        self._answer_due = -1
        #: Launched steps whose output has not come yet; a step nobody holds drops out, and its
        #: output is discarded when it comes.
        self._waiting: weakref.WeakValueDictionary[int, RankStep] = weakref.WeakValueDictionary()
        self._kv = KVReportMerger(int(config.parallel.tensor_parallel_size))

    def rank_config(self) -> Any:
        """The engine config as the ranks get it: the model config as plain values where that
        builds the same model (`plain_config`), so that a rank does not import transformers."""
        from hallm.core.model_loader.plain_config import with_plain_model_config

        return with_plain_model_config(self.config)

    @abstractmethod
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` of every rank's worker; their results in rank order."""

    @abstractmethod
    def _send_launch(self, step_id: int, step: SchedulerOutput, resolve_now: bool) -> None:
        """Send one step to every rank (serialized once)."""

    @abstractmethod
    def _send_flush(self) -> None:
        """Ask every rank to resolve its newest step."""

    @abstractmethod
    def _next_answers(self, deadline: float) -> list[tuple[int, int, Any]]:
        """The next (rank, step id, answer) step answers, each rank's oldest first (rank 0:
        outputs; other ranks: KV connector reports); raises WorkerDiedError when a rank dies
        or fails, or nothing comes by `deadline` (`time.monotonic()`)."""

    def available_kv_cache_bytes(self) -> int:
        # Every rank holds the same number of blocks: the budget is the smallest rank's.
        return min(int(b) for b in self._call_all("available_kv_cache_bytes"))

    def kv_cache_bytes_per_block(self) -> int:
        return max(int(b) for b in self._call_all("bytes_per_block"))

    def init_kv_cache(self, num_blocks: int) -> None:
        self._call_all("init_kv_cache", num_blocks)

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        return self._launch(step, resolve_now=True).get()

    def execute_async(self, step: SchedulerOutput) -> RankStep:
        return self._launch(step, resolve_now=False)

    def _oldest_unanswered(self) -> float | None:
        """When the oldest step still awaited was launched (None: none is)."""
        return min((h.launched_at for h in self._waiting.values()), default=None)

    def _launch(self, step: SchedulerOutput, resolve_now: bool) -> RankStep:
        step_id = self._next_step_id
        self._next_step_id += 1
        self._send_launch(step_id, step, resolve_now)
        # The ranks answer the step before this one now that this one is launched.
        self._answer_due = step_id if resolve_now else step_id - 1
        handle = RankStep(self, step_id, step.kv_connector_meta is not None)
        self._waiting[step_id] = handle
        return handle

    def _wait_for(self, handle: RankStep) -> None:
        """Read the ranks' answers, in launch order, until `handle`'s output is complete."""
        if handle.step_id > self._answer_due:
            # Nothing was launched after it: the ranks resolve it when asked.
            self._send_flush()
            self._answer_due = handle.step_id
        deadline = time.monotonic() + self.step_timeout_s
        while not handle.done:
            for rank, step_id, answer in self._next_answers(deadline):
                self._take_answer(rank, step_id, answer)

    def _take_answer(self, rank: int, step_id: int, answer: Any) -> None:
        step = self._waiting.get(step_id)
        if rank == 0:
            if step is not None:
                step.output = answer
            # A step nobody waits for still passes on its finished sends (see KVReportMerger).
            if step.has_kv if step is not None else bool(answer.kv_finished_sending):
                self._kv.add(step_id, KVReport.of(answer))
        else:
            self._kv.add(step_id, answer)
        if step is None or step.output is None:
            return
        if step.has_kv:
            if not self._kv.complete(step_id):
                return
            self._kv.merge(step_id, step.output)
        step.done = True
        del self._waiting[step_id]
