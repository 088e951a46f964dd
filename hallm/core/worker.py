"""A worker: one device, its model runner, and the memory accounting that sizes the KV cache."""

from __future__ import annotations

import gc
import logging

from hallm.core.config import EngineConfig
from hallm.core.model_runner import ModelRunner
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.scheduler_output import SchedulerOutput
from hallm.core.step_handle import StepHandle
from hallm.platforms import Platform

logger = logging.getLogger("hallm.worker")


class Worker:
    def __init__(self, config: EngineConfig, platform: Platform, local_rank: int = 0) -> None:
        self.config = config
        self.platform = platform
        self.local_rank = local_rank
        self.runner: ModelRunner | None = None

    def init_device(self) -> None:
        self.platform.set_device(self.local_rank)
        self.device = self.platform.device(self.local_rank)
        self.platform.manual_seed(self.config.model.seed)

    def load_model(self) -> None:
        self.runner = ModelRunner(self.config, self.platform, self.device)
        self.runner.load_model()

    def available_kv_cache_bytes(self) -> int:
        """Device memory left for the KV cache under `gpu_memory_utilization`.

        budget = total * utilization - (memory in use after loading the model) - (the activation
        peak of a worst-case step, where the platform can measure it).

        The worst-case step runs only where the platform measures peaks: elsewhere (the host's
        memory on the CPU) it would measure nothing, and a full step of `max_num_batched_tokens`
        prompt tokens is the slowest step a model takes on such a device, paid at every start.
        """
        assert self.runner is not None
        self.platform.empty_cache()
        self.platform.reset_peak_memory()
        activation_peak = 0
        if self.platform.peak_memory_bytes() is not None:
            self.runner.profile_run()
            gc.collect()
            self.platform.empty_cache()
            peak = self.platform.peak_memory_bytes()
            allocated = self.platform.allocated_memory_bytes()
            if peak is not None and allocated is not None:
                activation_peak = max(0, peak - allocated)
        free, total = self.platform.memory_info(self.local_rank)
        budget = int(total * self.config.cache.gpu_memory_utilization) - (total - free) - activation_peak
        logger.info(
            "memory: total %.2f GiB, in use %.2f GiB, activation peak %.2f GiB -> KV budget %.2f GiB",
            total / 2**30,
            (total - free) / 2**30,
            activation_peak / 2**30,
            budget / 2**30,
        )
        return max(0, budget)

    def bytes_per_block(self) -> int:
        assert self.runner is not None
        return self.runner.bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        assert self.runner is not None
        self.runner.init_kv_cache(num_blocks)
        self.runner.start_kv_connector()
        self.runner.capture_graphs()

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.stop_kv_connector()

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        assert self.runner is not None
        return self.runner.execute(step)

    def execute_async(self, step: SchedulerOutput) -> StepHandle:
        """Launch a step; `.get()` on the result waits for it (see ModelRunner.execute_async)."""
        assert self.runner is not None
        return self.runner.execute_async(step)
