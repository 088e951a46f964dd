"""How hallm's Triton kernels are launched: compiled, or in Triton's interpreter.

A kernel is written as a plain function and decorated per mode when first launched, so one
process can hold both (CI runs the interpreter; `compile_check` compiles the same functions for
GPU targets without a GPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from hallm.platforms import env_flag

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

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn, **jit_options)


def pdl_launch(device: Any) -> dict[str, Any]:
    """Launch options for programmatic dependent launch (PDL) on `device`, else `USE_PDL=False`.

    With PDL (Hopper and later, compiled kernels, not HALLM_TRITON_PDL=0), a kernel launched
    with `launch_pdl=True` may start while the kernel before it in the stream runs: each of
    hallm's kernels reads only weights before `gdc_wait()` (which returns once the previous
    kernel has finished and its writes are visible), everything else after it, and right after
    the wait lets its own successor launch (`gdc_launch_dependents()`). So at most one kernel
    waits ahead of the running one: its launch and first weight loads overlap the running
    kernel, and no chain of waiting kernels piles up on the SMs (signalling at the very start
    let one, and slowed a split-KV attention chain by 1.5x). A decode step of a small model is
    a chain of ~10 short kernels per layer (benchmarks/results/gpu.md, run 11).
    """
    if (
        gdc_wait is None
        or interpreting()
        or not env_flag("HALLM_TRITON_PDL", True)
        or not _pdl_capable(device)
    ):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


def _pdl_capable(device: Any) -> bool:
    import torch

    if getattr(device, "type", None) != "cuda" or torch.version.cuda is None:
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)
