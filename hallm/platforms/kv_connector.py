"""The KVConnector contract: move KV blocks between an engine and something outside it.

Two roles, two instances that share no state: the scheduler side lives with the scheduler and
decides what to load and save; the worker side lives next to the KV tensors and moves the
bytes. The scheduler side's `build_step_meta()` travels to the workers with each step.

How the engine drives it (hallm.core.scheduler, hallm.core.model_runner):

- Admission: after the local prefix-cache hit (`num_computed` tokens, whole blocks), the
  scheduler asks `num_external_tokens`. When it is > 0 the request gets blocks for the hit plus
  the external tokens, `request.num_computed_tokens` is set to the hit, and
  `on_blocks_allocated(request, block_ids, num_external)` says where positions
  [num_computed, num_computed + num_external) go (block_ids: the request's whole block table).
  That step only loads: the request computes nothing until the workers report the load done.
  A load that fails (`failed_loads`) makes the request recompute those tokens instead.
- Save: in the step where a request's prompt is fully computed, the scheduler calls
  `on_blocks_allocated(request, block_ids, 0)`; the worker side saves after that step's forward
  (`save_layer` for every layer, then `wait_save`).
- Per step on the worker side: `start_load(meta)` before the forward; after it,
  `wait_layer_load` for every layer, `save_layer` for every layer, `wait_save`, then
  `failed_loads()`, `finished()` and `take_stats()`.
- Finish: `on_request_finished` returning True keeps the request's blocks until a later step's
  `finished()` names it among the sent requests.
- Tensor parallelism: `tp_size` ranks each run a worker-side instance over their own KV cache
  (the rank's shard of the KV heads; `tp_rank` says which), all given the same step meta; the
  one scheduler-side instance decides for all of them (a prefix is worth offering only when
  every rank can load its shard). The engine combines the ranks' worker-side results: a load
  counts as done only when no rank names it in `failed_loads` (else every rank recomputes it), a
  send is finished once every rank's `finished()` has named it, and `take_stats` counters are
  summed over the ranks.
- Async scheduling: the scheduler side builds step N+1 (`num_external_tokens`,
  `on_blocks_allocated`, `build_step_meta`) before the engine has step N's output, and
  `on_request_finished` may come while step N+1 runs. The worker side still runs the steps in
  order, one at a time, so what step N saved can be loaded by step N+1. A request is never
  scheduled to compute before its load step's output (`failed_loads`) is known.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from hallm.platforms.attention import BatchLayout


class KVConnectorRole(enum.Enum):
    SCHEDULER = "scheduler"
    WORKER = "worker"


class KVConnector(ABC):
    """One side of a KV transfer. `request` arguments are the engine's `Request` objects.

    `config` is the engine's `EngineConfig`; `config.kv_transfer` (a `KVTransferConfig`: role,
    extra config) is None when the connector is built outside an engine (the conformance kit).
    """

    name: ClassVar[str]

    def __init__(self, config: Any, role: KVConnectorRole) -> None:
        self.config = config
        self.role = role
        #: Set by the engine before `register_kv_caches`: the platform can page-lock host memory
        #: for faster device copies (`Capabilities.pinned_host_memory`).
        self.pin_host_memory = False
        parallel = getattr(config, "parallel", None)
        #: The engine's tensor-parallel ranks (API 1.4): each holds a shard of the KV heads.
        self.tp_size = int(getattr(parallel, "tensor_parallel_size", 1))
        #: Worker side: this instance's rank, set by the engine before `register_kv_caches`
        #: (API 1.4). The scheduler side acts for every rank and keeps 0.
        self.tp_rank = 0

    # ---- scheduler side ---------------------------------------------------------------------

    @abstractmethod
    def num_external_tokens(self, request: Any, num_computed: int) -> int:
        """Prompt tokens beyond `num_computed` that can be loaded from outside (0 if none)."""

    @abstractmethod
    def on_blocks_allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        """Learn where the `num_external` loaded tokens go (from `request.num_computed_tokens`
        on), or, with `num_external == 0`, that the request's prompt is computed and may be
        saved from these blocks."""

    @abstractmethod
    def build_step_meta(self) -> Any:
        """This step's instructions for the worker side; resets the per-step state."""

    def on_request_finished(self, request: Any, block_ids: list[int]) -> bool:
        """Return True to keep the blocks until a save completes. Default: False."""
        return False

    # ---- worker side ------------------------------------------------------------------------

    @abstractmethod
    def register_kv_caches(self, caches: dict[str, torch.Tensor]) -> None:
        """Receive every layer's KV-cache tensor, by layer name."""

    @abstractmethod
    def start_load(self, meta: Any) -> None:
        """Start loading this step's external KV (may be asynchronous)."""

    def wait_layer_load(self, layer_name: str) -> None:
        """Block until `layer_name`'s KV is loaded. Default: nothing (loads are synchronous)."""

    @abstractmethod
    def save_layer(self, layer_name: str, kv_cache: torch.Tensor, layout: BatchLayout) -> None:
        """Save `layer_name`'s KV for this step's requests that must be saved."""

    def wait_save(self) -> None:
        """Block until this step's saves are done. Default: nothing."""

    def finished(self) -> tuple[set[str], set[str]]:
        """(request ids whose sends finished, request ids whose loads finished). Default: none."""
        return set(), set()

    def failed_loads(self) -> set[str]:
        """Request ids of the last `start_load` whose KV could not be loaded (a missing or corrupt
        source): the engine recomputes their tokens. Default: none."""
        return set()

    # ---- both sides -------------------------------------------------------------------------

    def take_stats(self) -> dict[str, int]:
        """Counters since the last call (e.g. "tokens_saved", "save_failures"); the engine
        adds them up and exports them. Default: none."""
        return {}

    def shutdown(self) -> None:
        """Release sockets, threads and buffers (the engine shuts down). Default: nothing."""
