"""Per-step state the attention layers read during one model forward.

The model runner sets it around each forward, so model code keeps the plain
`forward(input_ids, positions)` signature of a torch module and stays device-neutral. Public so
a plugin's fused model code (e.g. hallm_cpu.decoder) can read its backend's step metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from hallm.platforms.attention import BatchLayout


@dataclasses.dataclass
class ForwardContext:
    """layout: the step's BatchLayout; metadata: each backend class's metadata for this step."""

    layout: BatchLayout
    metadata: dict[type, Any]


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    """The context of the forward in progress; RuntimeError outside one."""
    if _current is None:
        raise RuntimeError("attention layer called outside set_forward_context(); the model runner sets it")
    return _current


def peek_forward_context() -> ForwardContext | None:
    """The context of the forward in progress, or None outside one."""
    return _current


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Make `ctx` current for the duration of the block (nests)."""
    global _current
    prev, _current = _current, ctx
    try:
        yield
    finally:
        _current = prev
