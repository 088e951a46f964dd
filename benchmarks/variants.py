"""Engine and server variants a GPU benchmark builds explicitly, for an A/B against the shipped ones.

The library has no switches for these: a variant here replaces what the CUDA platform gives the
engine (its op table, its Triton launch target) in the benchmark's own process, before the
engine is built. `apply(name)` is called once, first thing, in a worker process. A server
variant (`SERVER_VARIANTS`, `apply_server`) changes the API process of `hallm serve`.

`python benchmarks/variants.py NAME [hallm arguments]` runs the hallm CLI as a variant of either
kind. An engine variant also reaches the engine processes the CLI spawns: a spawned child runs
this file again as `__mp_main__`, and applies the variant named in `CHILD_VARIANT_ENV`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: Set by this file's entry point for the processes the CLI spawns; nothing else reads it.
CHILD_VARIANT_ENV = "HALLM_BENCHMARK_ENGINE_VARIANT"

#: name -> what it changes, for --help and the results' "variant" field.
VARIANTS: dict[str, str] = {
    "shipped": "the engine as released",
    "no-decoder-stack": "the layers one op at a time (no fused decoder stack)",
    "no-skinny": "cuBLAS for every projection (no skinny GEMM, so no fused decoder stack either)",
    "reference-ops": "every op-table entry the pure-torch reference",
    "no-pdl": "Triton kernels launched without programmatic dependent launch",
    "no-temperature-sample": "the sampler's torch path for every step (no one-pass temperature sampler)",
    "decode-graphs": "CUDA graphs of decode steps alone (steps with prompt tokens run eagerly)",
    "interpreter-gc": "server processes keep the interpreter's young-collection threshold, any device",
    "decode-gemm": "projections of 17-256 rows through the decode GEMM where its tuning record beats cuBLAS"
    " (benchmarks/decode_gemm_variant.py)",
}


#: name -> what it changes in the API process of `hallm serve`.
SERVER_VARIANTS: dict[str, str] = {
    "shipped": "the server as released",
    "offloaded-parse": "every request body parsed on the worker pool (no inline parse of small bodies)",
}


def apply_server(name: str) -> None:
    """Make this process's `hallm serve` the server variant `name`."""
    if name not in SERVER_VARIANTS:
        raise SystemExit(f"unknown server variant {name!r}; known: {', '.join(SERVER_VARIANTS)}")
    if name == "offloaded-parse":
        from hallm.entrypoints.openai import serving

        serving.INLINE_PARSE_BYTES = -1


def apply(name: str) -> None:
    """Make this process's engine the variant `name` (through the CUDA platform, but for
    `interpreter-gc`)."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if name == "shipped":
        return
    if name == "interpreter-gc":
        import gc

        from hallm.core import server_gc

        server_gc.YOUNG_THRESHOLD = gc.get_threshold()[0]  # this interpreter's, unchanged so far
        return
    from hallm_cuda.platform import CudaPlatform

    from hallm.platforms.ops import OpTable

    if name == "decode-graphs":
        from hallm.ops.torch_graphs import capture_step_graphs

        def decode_only(self: Any, target: Any) -> Any:
            return capture_step_graphs(target)

        CudaPlatform.step_graphs = decode_only  # type: ignore[method-assign]
        return
    if name == "no-pdl":
        shipped_target = CudaPlatform.triton_target

        def no_pdl(self: Any) -> Any:
            return dataclasses.replace(shipped_target(self), pdl=False)

        CudaPlatform.triton_target = no_pdl  # type: ignore[method-assign]
        return

    def decode_gemm(table: OpTable, platform: Any) -> OpTable:
        from benchmarks.decode_gemm_variant import decode_gemm_linear_op

        return dataclasses.replace(table, linear=decode_gemm_linear_op(platform.triton_target()))

    edits: dict[str, Callable[[OpTable, Any], OpTable]] = {
        "no-decoder-stack": lambda t, _: dataclasses.replace(t, llama_decoder_stack=None),
        "no-skinny": lambda t, _: dataclasses.replace(t, linear=None, llama_decoder_stack=None),
        "reference-ops": lambda t, _: OpTable(),
        "no-temperature-sample": lambda t, _: dataclasses.replace(t, temperature_sample=None),
        "decode-gemm": decode_gemm,
    }
    shipped_table = CudaPlatform.op_table

    def op_table(self: Any) -> OpTable:
        return edits[name](shipped_table(self), self)

    CudaPlatform.op_table = op_table  # type: ignore[method-assign]


if __name__ in ("__main__", "__mp_main__"):  # run as a file: the variants' modules are benchmarks.*
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import os

    from hallm.entrypoints.cli import main

    variant = sys.argv[1] if len(sys.argv) > 1 else ""
    if variant in SERVER_VARIANTS:
        apply_server(variant)
    else:
        apply(variant)
        os.environ[CHILD_VARIANT_ENV] = variant
    raise SystemExit(main(sys.argv[2:]))
elif __name__ == "__mp_main__":
    import os

    if os.environ.get(CHILD_VARIANT_ENV):
        apply(os.environ[CHILD_VARIANT_ENV])
