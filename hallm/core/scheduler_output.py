"""What the scheduler hands the workers each step (plain data, cheap to send to a process)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hallm.core.sampling_params import SamplingParams


@dataclasses.dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty for a request resumed after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: frozenset[int]


@dataclasses.dataclass
class CachedRequestData:
    """A request already on the workers: its new blocks this step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclasses.dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # in batch order: new requests first, then cached
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # finished or preempted since the last step: workers drop them
    # The KV connector's instructions for this step (its `build_step_meta()`), None without one.
    kv_connector_meta: Any = None
    # Requests whose external KV this step loads (they compute nothing this step).
    kv_load_req_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0 and not self.kv_load_req_ids
