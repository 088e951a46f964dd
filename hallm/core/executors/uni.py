"""The in-process executor: one worker, called directly."""

from __future__ import annotations

from typing import Any

from hallm.core.outputs import ModelRunnerOutput
from hallm.core.scheduler_output import SchedulerOutput
from hallm.core.worker import Worker
from hallm.platforms import Executor, Platform


class UniExecutor(Executor):
    name = "uni"

    def __init__(self, config: Any, platform: Platform) -> None:
        super().__init__(config, platform)
        worker_cls = platform.worker_class() or Worker
        self.worker = worker_cls(config, platform)

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

    def execute_async(self, step: SchedulerOutput) -> Any:
        """Launch a step and return a handle whose `get()` gives its ModelRunnerOutput. The
        engine uses this (async scheduling) when an executor has it."""
        launch = getattr(self.worker, "execute_async", None)
        if launch is None:  # a platform's own worker class without it: run the step to the end
            return _Done(self.worker.execute(step))
        return launch(step)

    def shutdown(self) -> None:
        self.worker = None  # type: ignore[assignment]


class _Done:
    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def get(self) -> ModelRunnerOutput:
        return self.output
