"""Portable Triton kernels for paged attention: part of hallm's public plugin API.

Importable only where triton is installed (the CUDA, ROCm and XPU plugins import it lazily, from
their attention backends; nothing imports it at plugin load). Kernels:

- `write_kv`: store one step's keys/values into the paged cache at the slot mapping
  (slot < 0 = padding token, not written).
- `paged_attention`: causal attention of a mixed prefill + decode step over the paged cache.
  One "unified" kernel serves every request of the step: a program owns a tile of query rows
  made of all query heads of one KV head (GQA) for a few consecutive tokens of one request, and
  streams that request's keys/values tile by tile with an online softmax. Decode-only steps with
  few (request, KV head) pairs split the KV sequence over extra programs ("split-KV") and merge
  the partial results with a small second kernel.

- `skinny_gemm.skinny_linear`: a linear layer over few rows (decode steps), with an optional
  RMSNorm prologue and rotary epilogue; streams the weight once for all rows.
- `decode_gemm.decode_linear`: a linear layer over a decode batch of 17-256 rows (each weight
  tile loaded once for every 64-row chunk; split-K or stream-K where column blocks leave SMs
  idle). Measured against cuBLAS by `benchmarks/gpu_decode_gemm.py` (results in
  benchmarks/results/gpu.md): cuBLAS is faster on nearly every decode shape, so no op table
  uses it.
- `fused_moe.fused_moe`: a mixture-of-experts MLP as two grouped GEMMs over the step's
  (token, expert) pairs sorted by expert (`moe_align`): gate/up with SiLU-and-mul, then down
  scaled by the routing weight; only the chosen experts' weights are read.

On sm_90+ every kernel launches with programmatic dependent launch (`runtime.pdl_launch`).

Every launch reads lengths from device tensors only (no host value of the step is baked into
the launch beyond the number of requests and tokens), so a decode step can be captured in a
CUDA graph and replayed with new lengths and block tables.

`hallm.ops.triton.compile_check` compiles every kernel variant for a GPU target without a GPU
(CI's guard that the kernels build for sm_80 and gfx942).
"""

from __future__ import annotations

from hallm.ops.triton.attention import paged_attention
from hallm.ops.triton.kv_write import write_kv
from hallm.ops.triton.launch_config import (
    SPLIT_KV_MAX_PROGRAMS,
    SPLIT_KV_SEGMENTS,
    KernelConfig,
    kernel_config,
    use_split_kv,
)

__all__ = [
    "KernelConfig",
    "SPLIT_KV_MAX_PROGRAMS",
    "SPLIT_KV_SEGMENTS",
    "kernel_config",
    "paged_attention",
    "use_split_kv",
    "write_kv",
]
