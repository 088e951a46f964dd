"""The Executor contract: runs the model on one or many devices.

The core ships `uni` (in process), `mp` (one process per rank) and `ray`; a plugin may
contribute another through the `hallm_executors` hook. The engine calls, in order:
`start()`, `available_kv_cache_bytes()`, `kv_cache_bytes_per_block()`,
`init_kv_cache(num_blocks)`, then `execute(step)` (or, with async scheduling,
`execute_async(step)`) once per step, `check_health()` at will, and `shutdown()` last.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from hallm.platforms.platform import Platform


class StepResult(Protocol):
    """A launched step: `get()` waits for it and returns what `Executor.execute` returns."""

    def get(self) -> Any: ...


class FinishedStep:
    """A step that ran to the end before it was returned."""

    def __init__(self, output: Any) -> None:
        self.output = output

    def get(self) -> Any:
        return self.output


class Executor(ABC):
    """Drives the workers that hold the model and the KV cache.

    `config` is the engine's config (`hallm.core.config.EngineConfig`); `platform` is the
    platform instance chosen in the parent process. `step` is the scheduler's per-step output
    (`hallm.core.scheduler_output.SchedulerOutput`) and `execute` returns the runner's
    `hallm.core.outputs.ModelRunnerOutput`.
    """

    name: ClassVar[str]
    #: `execute_async` returns before the step has finished, so the engine may schedule the
    #: next step while this one runs (async scheduling). Default: False.
    supports_async: bool = False

    def __init__(self, config: Any, platform: Platform) -> None:
        self.config = config
        self.platform = platform

    @abstractmethod
    def start(self) -> None:
        """Start the workers, bind their devices, and load the model."""

    @abstractmethod
    def available_kv_cache_bytes(self) -> int:
        """Bytes each rank can give the KV cache, measured after a worst-case dummy step."""

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one KV-cache block takes on each rank, over all layers."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV-cache blocks per layer on every rank."""

    @abstractmethod
    def execute(self, step: Any) -> Any:
        """Run one scheduled step and return the sampled tokens (rank 0's result)."""

    def execute_async(self, step: Any) -> StepResult:
        """Launch one step; the result's `get()` returns what `execute` returns. Steps resolve
        in launch order. Default: run the step to the end (`execute`)."""
        return FinishedStep(self.execute(step))

    def check_health(self) -> None:
        """Raise if a worker is dead or unresponsive. Default: nothing (in-process)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free their resources. Safe to call twice."""
