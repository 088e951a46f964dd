"""The in-process executor: one worker, called directly."""

from __future__ import annotations

from typing import Any

from hallm.core.outputs import ModelRunnerOutput
from hallm.core.scheduler_output import SchedulerOutput
from hallm.core.worker import Worker
from hallm.platforms import Executor, Platform
from hallm.platforms.executor import FinishedStep, StepResult


class UniExecutor(Executor):
    name = "uni"

    def __init__(self, config: Any, platform: Platform) -> None:
        super().__init__(config, platform)
        worker_cls = platform.worker_class() or Worker
        self.worker = worker_cls(config, platform)
        # A platform's own worker may leave out execute_async (see Platform.worker_class).
        self.supports_async = callable(getattr(worker_cls, "execute_async", None))

    def start(self) -> None:
        self.worker.init_device()
        self.worker.load_model()

    def available_kv_cache_bytes(self) -> int:
        return int(self.worker.available_kv_cache_bytes())

    def kv_cache_bytes_per_block(self) -> int:
        return int(self.worker.bytes_per_block())

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(step)  # type: ignore[no-any-return]

    def execute_async(self, step: SchedulerOutput) -> StepResult:
        if not self.supports_async:
            return FinishedStep(self.worker.execute(step))
        return self.worker.execute_async(step)  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        stop = getattr(self.worker, "shutdown", None)  # optional for a plugin's worker
        if callable(stop):
            stop()
        self.worker = None  # type: ignore[assignment]
