"""What a platform's step-graph runner may use of the model runner (`Platform.step_graphs`).

A graph runner captures the model forward of decode steps once per padded batch size and
replays it. A replay reads the step's inputs from persistent device buffers, so the graph runner
gets exactly two things of the model runner: those buffers (`StepInputBuffers`, which the model
runner fills before each step), and a forward over them (`StepGraphTarget.forward`). Nothing
else of the runner is part of the contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from hallm.platforms.attention import AttentionBackend, BatchLayout


@dataclasses.dataclass(frozen=True)
class StepInputBuffers:
    """The model runner's persistent device inputs, sized for the largest step.

    A step of n requests and t tokens fills the first rows; rows past them keep what the graph
    runner (or an earlier step) left there. R = max requests, T = max tokens, B = max blocks
    per request.
    """

    input_ids: Tensor  # int64 [T]
    positions: Tensor  # int64 [T]
    slot_mapping: Tensor  # int64 [T]; < 0: padding, not written
    query_start_loc: Tensor  # int32 [R + 1]
    seq_lens: Tensor  # int32 [R]
    context_lens: Tensor  # int32 [R]
    block_tables: Tensor  # int32 [R, B]
    num_prompt_tokens: Tensor | None = None  # int32 [R]; not part of a captured decode step


class StepGraphTarget(Protocol):
    """The model runner as a graph runner sees it."""

    @property
    def max_num_reqs(self) -> int: ...

    @property
    def max_num_tokens(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def backends(self) -> Sequence[AttentionBackend]:
        """One per attention layer; a runner captures only when every one is `graph_safe`."""
        ...

    @property
    def inputs(self) -> StepInputBuffers | None:
        """The persistent device inputs; None on a device that runs from host memory."""
        ...

    def forward(self, layout: BatchLayout, input_ids: Tensor, positions: Tensor) -> Tensor:
        """The model forward of one step (attention metadata built from `layout`) -> hidden
        [num_tokens, hidden_size]. Reads only `input_ids`, `positions` and the layout's
        tensors, so over views of `inputs` it is capturable."""
        ...


class StepGraphRunner(Protocol):
    """What `Platform.step_graphs` returns; the model runner calls it on every step."""

    def can_replay(self, layout: BatchLayout) -> bool:
        """Whether this step has a captured graph (decided from host values)."""
        ...

    def replay(self, layout: BatchLayout, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Run the step's graph over the inputs the model runner has filled; -> hidden
        [num_tokens, hidden_size]."""
        ...
