"""How hallm's Triton kernels are launched: compiled, or in Triton's interpreter.

A kernel is written as a plain function and decorated per mode when first launched, so one
process can hold both (CI runs the interpreter; `compile_check` compiles the same functions for
GPU targets without a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (TRITON_INTERPRET=1), read at each launch."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def decorate(fn: Callable[..., Any], interpret: bool, **jit_options: Any) -> Any:
    """`fn` as a launchable kernel: interpreted, or JIT-compiled with `jit_options`
    (e.g. do_not_specialize, which the interpreter does not take)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn, **jit_options)
