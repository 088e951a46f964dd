"""The `decode-gemm` engine variant's linear entry: decode batches' projections through
`hallm.ops.triton.decode_gemm` instead of cuBLAS, for an end-to-end A/B (benchmarks/variants.py).

A projection call of M rows goes
- to the skinny GEMM where the shipped table sends it (M <= SKINNY_ROWS, a small weight);
- to `decode_linear` for SKINNY_ROWS < M <= MAX_ROWS, 16-bit operands on the GPU, with the
  configuration the tuning record chose for the shape (below), or the shipped one
  (`decode_gemm_config`) for a shape the record lacks;
- to F.linear (cuBLAS) otherwise, and where the record shows cuBLAS faster at that shape.

The tuning record is the newest record of `decode-gemm.jsonl` (benchmarks/gpu_decode_gemm.py's
output) found first in `$HALLM_GPU_RESULTS` (the GPU run's results folder) and then
benchmarks/results/raw. For each (N, K) it holds the fastest configuration at a few row counts;
a call takes the row count nearest its own and that configuration with its pipeline stages cut
to what its rows leave of the shared memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hallm.platforms.ops import LinearKernel, LinearOp, LinearWeights

RECORD_NAME = "decode-gemm.jsonl"


@dataclasses.dataclass(frozen=True)
class Measured:
    """One shape at one row count: the fastest configuration and cuBLAS's time over its."""

    rows: int
    config: Any  # DecodeGemmConfig
    cublas_over_best: float


def record_paths() -> list[Path]:
    """Where the tuning record is looked for, in order."""
    here = Path(__file__).resolve().parent
    found = [Path(os.environ["HALLM_GPU_RESULTS"])] if os.environ.get("HALLM_GPU_RESULTS") else []
    return [p / RECORD_NAME for p in [*found, here / "results" / "raw"]]


def load_tuning(paths: list[Path] | None = None) -> dict[tuple[int, int], list[Measured]]:
    """(N, K) -> what the newest record measured, by row count; empty without a record."""
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig

    fields = {f.name for f in dataclasses.fields(DecodeGemmConfig)}
    for path in paths if paths is not None else record_paths():
        if not path.is_file():
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        out: dict[tuple[int, int], list[Measured]] = {}
        for row in json.loads(lines[-1])["rows"]:
            timed = [e for e in row["configs"] if "us" in e and "wrong" not in e]
            if not timed or not row.get("cublas_us"):
                continue
            best = min(timed, key=lambda e: e["us"])
            config = DecodeGemmConfig(**{k: v for k, v in best.items() if k in fields})
            measured = Measured(int(row["m"]), config, row["cublas_us"] / best["us"])
            out.setdefault((int(row["n"]), int(row["k"])), []).append(measured)
        return out
    return {}


def plan_for(
    rows: int, n: int, k: int, tuning: dict[tuple[int, int], list[Measured]], target: Any
) -> Any | None:
    """The configuration a call of `rows` rows takes, or None for cuBLAS."""
    from benchmarks.gpu_decode_gemm import refit
    from hallm.ops.triton.decode_gemm import decode_gemm_config

    measured = tuning.get((n, k))
    if not measured:
        return decode_gemm_config(rows, n, k, target)
    nearest = min(measured, key=lambda m: (abs(m.rows - rows), m.rows))
    if nearest.cublas_over_best <= 1.0:
        return None
    # the measured configuration with its stages cut to these rows; the shipped one where no room
    return refit(nearest.config, rows, target) or decode_gemm_config(rows, n, k, target)


class DecodeGemmLinear(LinearKernel):
    """`F.linear` with decode batches through the decode GEMM (see the module doc)."""

    def __init__(self, weights: LinearWeights, target: Any, tuning: dict[tuple[int, int], list[Measured]]):
        from hallm.ops.triton.decode_gemm import counters_for
        from hallm.ops.triton.skinny_linear import SkinnyLinear, skinny_fits

        self.weight, self.bias = weights.weight, weights.bias
        self.out_features, self.in_features = self.weight.shape
        self.target, self.tuning = target, tuning
        self.skinny = SkinnyLinear(weights, target) if skinny_fits(self.weight) else None
        self.counters = counters_for(self.out_features, self.weight.device)
        self.plans: dict[int, Any] = {}  # rows -> configuration or None, fixed per batch size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from hallm.ops.triton.decode_gemm import MAX_ROWS, decode_linear
        from hallm.ops.triton.skinny_linear import SKINNY_ROWS, skinny_input_rows

        rows = skinny_input_rows(x, self.weight, MAX_ROWS)
        if rows and rows <= SKINNY_ROWS and self.skinny is not None:
            return self.skinny(x)
        if rows <= SKINNY_ROWS:
            return F.linear(x, self.weight, self.bias)
        if rows not in self.plans:
            self.plans[rows] = plan_for(rows, self.out_features, self.in_features, self.tuning, self.target)
        cfg = self.plans[rows]
        if cfg is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        out = decode_linear(
            flat, self.weight, self.bias, config=cfg, counters=self.counters, target=self.target
        )
        return out.view(*x.shape[:-1], self.out_features)


def decode_gemm_linear_op(
    target: Any, tuning: dict[tuple[int, int], list[Measured]] | None = None
) -> LinearOp:
    """The variant's `linear` entry for `target` (16-bit contiguous weights; others: cuBLAS)."""
    table = load_tuning() if tuning is None else tuning

    def make(weights: LinearWeights) -> DecodeGemmLinear | None:
        w = weights.weight
        if w is None or w.dtype not in (torch.float16, torch.bfloat16) or not w.is_contiguous():
            return None
        return DecodeGemmLinear(weights, target, table)

    return make
