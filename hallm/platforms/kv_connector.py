"""The KVConnector contract: move KV blocks between an engine and something outside it.

Two roles, two instances that share no state: the scheduler side lives with the scheduler and
decides what to load and save; the worker side lives next to the KV tensors and moves the
bytes. The scheduler side's `build_step_meta()` travels to the workers with each step.
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
    """One side of a KV transfer. `request` arguments are the engine's `Request` objects."""

    name: ClassVar[str]

    def __init__(self, config: Any, role: KVConnectorRole) -> None:
        self.config = config
        self.role = role

    # ---- scheduler side ---------------------------------------------------------------------

    @abstractmethod
    def num_external_tokens(self, request: Any, num_computed: int) -> int:
        """Prompt tokens beyond `num_computed` that can be loaded from outside (0 if none)."""

    @abstractmethod
    def on_blocks_allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        """Learn which blocks will receive the `num_external` loaded tokens."""

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
