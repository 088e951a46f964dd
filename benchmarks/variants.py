"""Engine variants a GPU benchmark builds explicitly, for an A/B against the shipped engine.

The library has no switches for these: a variant here replaces what the CUDA platform gives the
engine (its op table, its Triton launch target) in the benchmark's own process, before the
engine is built. `apply(name)` is called once, first thing, in a worker process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: name -> what it changes, for --help and the results' "variant" field.
VARIANTS: dict[str, str] = {
    "shipped": "the engine as released",
    "no-decoder-stack": "the layers one op at a time (no fused decoder stack)",
    "no-skinny": "cuBLAS for every projection (no skinny GEMM, so no fused decoder stack either)",
    "reference-ops": "every op-table entry the pure-torch reference",
    "no-pdl": "Triton kernels launched without programmatic dependent launch",
    "no-temperature-sample": "the sampler's torch path for every step (no one-pass temperature sampler)",
}


def apply(name: str) -> None:
    """Make the CUDA platform of this process give the engine variant `name`."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if name == "shipped":
        return
    from hallm_cuda.platform import CudaPlatform

    from hallm.platforms.ops import OpTable

    if name == "no-pdl":
        shipped_target = CudaPlatform.triton_target

        def no_pdl(self: Any) -> Any:
            return dataclasses.replace(shipped_target(self), pdl=False)

        CudaPlatform.triton_target = no_pdl  # type: ignore[method-assign]
        return
    edits: dict[str, Callable[[OpTable], OpTable]] = {
        "no-decoder-stack": lambda t: dataclasses.replace(t, llama_decoder_stack=None),
        "no-skinny": lambda t: dataclasses.replace(t, linear=None, llama_decoder_stack=None),
        "reference-ops": lambda t: OpTable(),
        "no-temperature-sample": lambda t: dataclasses.replace(t, temperature_sample=None),
    }
    shipped_table = CudaPlatform.op_table

    def op_table(self: Any) -> OpTable:
        return edits[name](shipped_table(self))

    CudaPlatform.op_table = op_table  # type: ignore[method-assign]
