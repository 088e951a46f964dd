"""Which op table the layers being built use (`hallm.platforms.ops`).

The loader builds a model inside `building_with(platform.op_table())`; each layer reads
`current_ops()` once, in its constructor, and calls that table for the rest of its life. Outside
`building_with` (tests, tools that build a model by hand) the layers get the references.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from hallm.ops.reference_ops import with_references
from hallm.platforms.ops import OpTable

_REFERENCES = with_references(OpTable())
_current: contextvars.ContextVar[OpTable] = contextvars.ContextVar("hallm_op_table", default=_REFERENCES)


def current_ops() -> OpTable:
    """The table of the model being built, every elementwise entry set."""
    return _current.get()


@contextlib.contextmanager
def building_with(table: OpTable | None) -> Iterator[OpTable]:
    """Build layers with `table` (None: the references), its gaps filled with the references."""
    resolved = _REFERENCES if table is None else with_references(table)
    token = _current.set(resolved)
    try:
        yield resolved
    finally:
        _current.reset(token)


@runtime_checkable
class KernelLayer(Protocol):
    """A layer that builds op-table kernels from its weights once they are loaded (a linear
    layer's prepared weight, a model's decoder stack). The loader calls `prepare_kernels()` on
    every such module, children before parents."""

    def prepare_kernels(self) -> None: ...
