"""How hallm's Triton kernels are launched: compiled, or in Triton's interpreter.

A kernel is written as a plain function and decorated per mode when first launched, so one
process can hold both (CI runs the interpreter; `compile_check` compiles the same functions for
GPU targets without a GPU). A kernel's parameters are annotated only with `tl.constexpr`
(Triton reads any other annotation as a Triton type), so its definition carries
`# type: ignore[no-untyped-def]`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

from hallm.ops.triton.target import TritonTarget

__all__ = ["decorate", "gdc_launch_dependents", "gdc_wait", "interpreting", "pdl_launch"]

try:  # grid dependency control (programmatic dependent launch), in kernels under USE_PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no triton, or one without it: pdl_launch says no
    gdc_launch_dependents = gdc_wait = None


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (TRITON_INTERPRET=1), read at each launch."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def decorate(fn: Callable[..., Any], interpret: bool, **jit_options: Any) -> Any:
    """`fn` as a launchable kernel: interpreted, or JIT-compiled with `jit_options`
    (e.g. do_not_specialize, which the interpreter does not take)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        _skip_dropped_overflow_checks()
        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn, **jit_options)


@functools.cache
def _skip_dropped_overflow_checks() -> None:
    """Triton's interpreter evaluates an overflow check for every 32-bit integer add, sub and mul
    of a kernel (`sanitize_overflow`), then drops it: its assertions run only with the `debug`
    option, which the interpreter never sets (a compiled kernel without debug has no check either).
    The checks are most of an interpreted attention kernel's time; with debug off they are not
    evaluated."""
    from triton.runtime import interpreter

    builder: Any = getattr(interpreter, "interpreter_builder", None)
    options: Any = getattr(builder, "options", None)
    # another Triton's interpreter may hold its options elsewhere: then it is left as it is
    checks = getattr(options, "sanitize_overflow", False) and not getattr(options, "debug", True)
    if checks and dataclasses.is_dataclass(options) and not isinstance(options, type):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


def pdl_launch(target: TritonTarget | None) -> dict[str, Any]:
    """Launch options for programmatic dependent launch (PDL) on `target`, else `USE_PDL=False`.

    With PDL (a target that declares it, compiled kernels), a kernel launched with
    `launch_pdl=True` may start while the kernel before it in the stream runs: each of hallm's
    kernels reads only weights before `gdc_wait()` (which returns once the previous kernel has
    finished and its writes are visible), everything else after it, and right after the wait
    lets its own successor launch (`gdc_launch_dependents()`). So at most one kernel waits ahead
    of the running one: its launch and first weight loads overlap the running kernel, and no
    chain of waiting kernels piles up on the SMs (signalling at the very start would let a
    whole chain of kernels wait on the SMs, which slows a split-KV attention chain). A decode
    step of a small model is a chain of ~10 short kernels per layer, so the overlap matters.
    """
    if gdc_wait is None or interpreting() or target is None or not target.pdl:
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}
