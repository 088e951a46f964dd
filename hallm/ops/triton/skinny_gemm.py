"""Linear layers over few rows (decode steps): `y = x @ W.T + b`, with an optional SiLU-gated
epilogue, in one Triton kernel.

Why: a decode step multiplies a handful of activation rows by each weight matrix, so it is a
weight stream. cuBLAS picks tiles for big GEMMs; on an H200 at one row it spends 4.4 us on
Qwen2.5-0.5B's 2 MB qkv projection (0.5 us of bytes) and adds a split-K reduce kernel to the
down projection (benchmarks/results/gpu.md, run 11). Here each program owns BLOCK_N output
columns and streams those weight rows once, with all (<= BLOCK_M) activation rows in a
tensor-core dot; a matrix whose columns are too few to fill the GPU also splits K, and the last
program of a column block to finish sums the fp32 partials (an atomic counter, reset for the
next launch, so a CUDA graph replays it).

The gated form computes `silu(x @ Wg.T + bg) * (x @ Wu.T + bu)` for a weight stacked as
[gate; up] ([2I, K], the layout of `GatedMLP.gate_up_proj`), rounding where the reference
module rounds: the projection, the SiLU output, the product.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch

#: Most activation rows the kernel takes; larger steps are GEMMs (use cuBLAS).
MAX_ROWS = 64
#: Programs per SM a launch aims for before it splits K.
_PROGRAMS_PER_SM = 2
_MAX_SPLIT_K = 8


def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    x_stride,
    out_stride,
    K_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    # x [M, K] (row stride x_stride), w [N or 2N, K] contiguous, out [M, N] (row stride out_stride);
    # part fp32 [SPLIT_K, BLOCK_M, N], counter int32 [cdiv(N, BLOCK_N)] (SPLIT_K > 1 only).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    w_rows = rn.to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    # The first weight tile is loaded before waiting on the previous kernel (weights are
    # constant); each iteration then loads the next one while it multiplies this one.
    k = k_begin + rk
    w_mask = n_mask[:, None] & (k < k_end)[None, :]
    w = tl.load(w_ptr + w_rows[:, None] + k[None, :], mask=w_mask, other=0.0)
    u = w
    if GATED:
        u = tl.load(w_ptr + (w_rows + N * K)[:, None] + k[None, :], mask=w_mask, other=0.0)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_begin + k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * x_stride + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0
        )
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            if DOT_F32:
                acc_up = tl.dot(x.to(tl.float32), tl.trans(u.to(tl.float32)), acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(x, tl.trans(u), acc_up)
        k = k + BLOCK_K  # the next tile; masked off (no traffic) after this split's last one
        w_mask = n_mask[:, None] & (k < k_end)[None, :]
        w = tl.load(w_ptr + w_rows[:, None] + k[None, :], mask=w_mask, other=0.0)
        if GATED:
            u = tl.load(w_ptr + (w_rows + N * K)[:, None] + k[None, :], mask=w_mask, other=0.0)

    dtype = out_ptr.dtype.element_ty
    out = out_ptr + rm[:, None] * out_stride + rn[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros([1, BLOCK_N], tl.float32)
    if SPLIT_K > 1:
        # The last of the SPLIT_K programs of this column block sums the partials: the barrier
        # orders every thread's stores before the counter's release, the acquire orders the
        # loads (through L2: .cg) after the other programs' stores; it resets the counter.
        part = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(part + pid_k * BLOCK_M * N, acc, mask=n_mask[None, :])
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(part + s * BLOCK_M * N, mask=n_mask[None, :], other=0.0, cache_modifier=".cg")
            tl.store(out, (acc + bias).to(dtype), mask=out_mask)
    elif GATED:
        if HAS_BIAS:
            acc_up += tl.load(bias_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        gate = (acc + bias).to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # silu, rounded like F.silu's output
        tl.store(out, (act.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype), mask=out_mask)
    else:
        tl.store(out, (acc + bias).to(dtype), mask=out_mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    return SimpleNamespace(skinny_gemm=decorate(_skinny_gemm_kernel, interpret))


def jit_kernels() -> SimpleNamespace:
    return _kernels(False)


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """Tile shape and K split of one skinny-GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132  # an H100/H200: what the interpreter and compile checks assume
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def skinny_config(m: int, n: int, k: int, num_sms: int = 132, gated: bool = False) -> SkinnyConfig:
    """Tiles for M rows x N outputs x K inputs; a K split when the column blocks leave SMs idle
    (never for the gated form, whose epilogue needs the whole sum of both halves).

    Decided from shapes only (host ints fixed for a captured batch size)."""
    block_m = max(16, triton.next_power_of_2(m))
    block_k = 256 if block_m <= 16 else 128  # (BLOCK_M + BLOCK_N) x BLOCK_K x 3 stages < 99 KB
    block_n = 16
    col_blocks = triton.cdiv(n, block_n)
    split = 1
    target = _PROGRAMS_PER_SM * num_sms
    while (
        not gated and split < _MAX_SPLIT_K and col_blocks * split < target and k // (2 * split * block_k) >= 2
    ):
        split *= 2
    return SkinnyConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split)


def counters_for(n: int, device: torch.device | str) -> torch.Tensor:
    """The zeroed int32 counters a split-K launch over N outputs needs (one per column block
    of the narrowest tile); every launch leaves them zero again, so a caller keeps one."""
    return torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=device)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    counters: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K] with M <= MAX_ROWS (last dim contiguous) and a
    contiguous weight [N, K]; gated=True takes weight [2I, K] (gate rows, then up rows) and
    returns `silu(gate) * up` [M, I]. counters: from `counters_for(N)`, kept by the caller so a
    captured graph reuses them (allocated here when None)."""
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}; use F.linear")
    if weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"weight {tuple(weight.shape)} must be contiguous with {k} columns")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    index = x.device.index if x.device.type == "cuda" else 0
    cfg = config or skinny_config(m, n, k, _num_sms(index or 0), gated=gated)
    if gated and cfg.split_k > 1:
        raise ValueError("the gated skinny GEMM does not split K")
    if cfg.block_m < m or cfg.block_n < 16:
        raise ValueError(f"{cfg} must tile {m} rows (block_m >= rows) with block_n >= 16")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    part = out
    if cfg.split_k > 1:
        part = torch.empty((cfg.split_k, cfg.block_m, n), dtype=torch.float32, device=x.device)
        if counters is None:
            counters = counters_for(n, x.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    _kernels(interpreting()).skinny_gemm[grid](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        part,
        counters if counters is not None else out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        k_per_split,
        HAS_BIAS=bias is not None,
        GATED=gated,
        SPLIT_K=cfg.split_k,
        # The interpreter's 16-bit dot is broken (triton 3.9 reinterprets the bits): fp32 there.
        DOT_F32=x.dtype == torch.float32 or interpreting(),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(x.device),
    )
    return out
