"""Linear layers over few rows (decode steps): `y = x @ W.T + b` in one Triton kernel, with an
optional RMSNorm prologue and rotary epilogue.

Why: a decode step multiplies a handful of activation rows by each weight matrix, so it is a
weight stream. cuBLAS picks tiles for big GEMMs: at one row it spends several times a small
projection's byte time on it (Qwen2.5-0.5B's 2 MB qkv) and adds a split-K reduce kernel to the
down projection (benchmarks/results/gpu.md: the skinny GEMM against cuBLAS). Here each program
owns BLOCK_N output columns and streams those weight rows once, with all (<= BLOCK_M)
activation rows in a tensor-core dot; a matrix whose columns are too few to fill the GPU also
splits K, and the last program of a column block to finish sums the fp32 partials (an atomic
counter, reset for the next launch, so a CUDA graph replays it).

At that size a kernel's launch and dependency wait, not its bytes, set its time, so the decoder
layer's neighbours of its qkv projection fold into it (`hallm.ops.triton.fused_decoder.FusedDecoderStack`):
- `RMSNormPrologue`: normalize the rows (after adding the residual, whose sum the first column
  block writes out) before the product, in place of an RMSNorm kernel;
- `RotaryEpilogue`: NeoX rotate-half of the q and k heads of a fused qkv projection, in place
  of the rotary kernel. A program owns dims d and d + head_size/2 of one head.
Each rounds where the module it replaces rounds: the residual sum, the normalized and the
weighted rows, the projection, the cos/sin tables.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.skinny_launch import (
    MAX_ROWS,
    PLAIN,
    ROTARY,
    RMSNormPrologue,
    RotaryEpilogue,
    SkinnyConfig,
    counters_for,
    launch_constexprs,
    pointer_args,
    skinny_config,
    split_k_of,
)
from hallm.ops.triton.target import TritonTarget

# the launch's configuration lives in skinny_launch; these names are this module's API too
__all__ = [
    "MAX_ROWS",
    "PLAIN",
    "ROTARY",
    "RMSNormPrologue",
    "RotaryEpilogue",
    "SkinnyConfig",
    "counters_for",
    "jit_kernels",
    "skinny_config",
    "skinny_linear",
]


def _skinny_gemm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    res_ptr,
    res_out_ptr,
    norm_w_ptr,
    pos_ptr,
    inv_freq_ptr,
    M,
    N,
    K,
    x_stride,
    out_stride,
    res_stride,
    K_PER_SPLIT,
    eps,
    rope_scaling,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM_TILES: tl.constexpr = 1,
    HEAD_SIZE: tl.constexpr = 32,
    ROTATED_HEADS: tl.constexpr = 0,
    USE_PDL: tl.constexpr = False,
):
    # x [M, K] (row stride x_stride); w [N, K] contiguous; out [M, N] (row stride out_stride);
    # part fp32 [SPLIT_K, BLOCK_M, N], counter int32 [programs along N] (SPLIT_K > 1 only).
    # NORM: res [M, K] (row stride res_stride, RESIDUAL only), res_out contiguous [M, K],
    # norm_w [K]. ROTARY: pos [M], inv_freq fp32 [HEAD_SIZE / 2].
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    # Columns: a plain program owns rn; a rotary one owns rn and rn2, dims d and d + HEAD_SIZE/2
    # of one head (the rotate-half pairs), which its epilogue combines.
    col = tl.arange(0, BLOCK_N)
    head = 0
    if EPILOGUE == ROTARY:
        head = pid_n // (HEAD_SIZE // 2 // BLOCK_N)
        col = (pid_n % (HEAD_SIZE // 2 // BLOCK_N)) * BLOCK_N + col  # rotary frequency index
        rn = head * HEAD_SIZE + col
        rn2 = rn + HEAD_SIZE // 2
    else:
        rn = pid_n * BLOCK_N + col
        rn2 = rn  # no second column
    n_mask = rn < N
    w_rows = rn.to(tl.int64) * K
    w2_rows = rn2.to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    # The first weight tile is loaded before waiting on the previous kernel (weights are
    # constant); each iteration then loads the next one while it multiplies this one.
    k = k_begin + rk
    w_mask = n_mask[:, None] & (k < k_end)[None, :]
    w = tl.load(w_ptr + w_rows[:, None] + k[None, :], mask=w_mask, other=0.0)
    w2 = w
    if EPILOGUE != PLAIN:
        w2 = tl.load(w_ptr + w2_rows[:, None] + k[None, :], mask=w_mask, other=0.0)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    act_dtype = x_ptr.dtype.element_ty
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM:
        # RMSNorm needs the whole row's sum of squares before the first product: every
        # program reads the (few, L2-resident) rows once more; the tiles are unrolled so their
        # loads are in flight together. (Scaling the merged sum by 1/rms instead, each program
        # summing squares over its own K range, measured slower: benchmarks/results/gpu.md.)
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for i in tl.static_range(NORM_TILES):
            kk = i * BLOCK_K + rk
            hm = m_mask[:, None] & (kk < K)[None, :]
            h = tl.load(x_ptr + rm[:, None] * x_stride + kk[None, :], mask=hm, other=0.0)
            if RESIDUAL:
                r = tl.load(res_ptr + rm[:, None] * res_stride + kk[None, :], mask=hm, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(act_dtype)  # rounded like `x + residual`
            hf = h.to(tl.float32)
            sum_sq += tl.sum(hf * hf, axis=1)
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_begin + k0 + rk
        x_mask = m_mask[:, None] & (k < k_end)[None, :]
        x = tl.load(x_ptr + rm[:, None] * x_stride + k[None, :], mask=x_mask, other=0.0)
        if NORM:
            if RESIDUAL:
                r = tl.load(res_ptr + rm[:, None] * res_stride + k[None, :], mask=x_mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(act_dtype)
                if pid_n == 0:  # the first column block writes the residual stream, each split its K range
                    tl.store(res_out_ptr + rm[:, None] * K + k[None, :], x, mask=x_mask)
            nw = tl.load(norm_w_ptr + k, mask=k < k_end, other=0.0).to(tl.float32)
            # rounded where RMSNorm rounds: the normalized row, then the weighted one
            x = ((x.to(tl.float32) * rstd[:, None]).to(act_dtype).to(tl.float32) * nw[None, :]).to(act_dtype)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if EPILOGUE != PLAIN:
            if DOT_F32:
                acc2 = tl.dot(x.to(tl.float32), tl.trans(w2.to(tl.float32)), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(x, tl.trans(w2), acc2)
        k = k + BLOCK_K  # the next tile; masked off (no traffic) after this split's last one
        w_mask = n_mask[:, None] & (k < k_end)[None, :]
        w = tl.load(w_ptr + w_rows[:, None] + k[None, :], mask=w_mask, other=0.0)
        if EPILOGUE != PLAIN:
            w2 = tl.load(w_ptr + w2_rows[:, None] + k[None, :], mask=w_mask, other=0.0)

    out_mask = m_mask[:, None] & n_mask[None, :]  # rows past M are never stored: no traffic
    if SPLIT_K > 1:
        # The last of the SPLIT_K programs of this column block sums the partials: the barrier
        # orders every thread's stores before the counter's release, the acquire orders the
        # loads (through L2: .cg) after the other programs' stores; it resets the counter.
        part = part_ptr + rm[:, None] * N + rn[None, :]
        part2 = part_ptr + rm[:, None] * N + rn2[None, :]
        tl.store(part + pid_k * BLOCK_M * N, acc, mask=out_mask)
        if EPILOGUE != PLAIN:
            tl.store(part2 + pid_k * BLOCK_M * N, acc2, mask=out_mask)
        tl.debug_barrier()
        is_last = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if is_last:
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                offset = s * BLOCK_M * N
                acc += tl.load(part + offset, mask=out_mask, other=0.0, cache_modifier=".cg")
                if EPILOGUE != PLAIN:
                    acc2 += tl.load(part2 + offset, mask=out_mask, other=0.0, cache_modifier=".cg")
        # only the last program stores (broadcast by hand: the interpreter rejects a mask & a scalar)
        out_mask = out_mask & ((tl.zeros([BLOCK_M, BLOCK_N], tl.int32) + is_last.to(tl.int32)) != 0)

    dtype = out_ptr.dtype.element_ty
    out = out_ptr + rm[:, None] * out_stride + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE != PLAIN:
            acc2 += tl.load(bias_ptr + rn2, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == ROTARY:
        # NeoX rotate-half of the q and k heads (the first ROTATED_HEADS), the projection
        # rounded first and cos/sin rounded to the activation dtype, as the rotary kernel does
        x1 = acc.to(dtype).to(tl.float32)
        x2 = acc2.to(dtype).to(tl.float32)
        pos = tl.load(pos_ptr + rm, mask=m_mask, other=0).to(tl.float32)
        freq = pos[:, None] * tl.load(inv_freq_ptr + col)[None, :]
        cos = (tl.cos(freq) * rope_scaling).to(dtype).to(tl.float32)
        sin = (tl.sin(freq) * rope_scaling).to(dtype).to(tl.float32)
        rotate = head < ROTATED_HEADS
        y1 = tl.where(rotate, x1 * cos - x2 * sin, x1)
        y2 = tl.where(rotate, x2 * cos + x1 * sin, x2)
        tl.store(out, y1.to(dtype), mask=out_mask)
        tl.store(out + HEAD_SIZE // 2, y2.to(dtype), mask=out_mask)
    else:
        tl.store(out, acc.to(dtype), mask=out_mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    return SimpleNamespace(skinny_gemm=decorate(_skinny_gemm_kernel, interpret))


def jit_kernels() -> SimpleNamespace:
    return _kernels(False)


def _check_rotary(rotary: RotaryEpilogue, n: int, m: int, block_n: int) -> None:
    d = rotary.head_size
    if d % (2 * block_n) or n % d:
        raise ValueError(
            f"the rotary epilogue needs head_size a multiple of {2 * block_n} dividing the {n} "
            f"outputs, got head_size {d}; use the rotary kernel (hallm.ops.triton.fused.rotary)"
        )
    if rotary.inv_freq.shape != (d // 2,) or rotary.inv_freq.dtype != torch.float32:
        raise ValueError(
            f"inv_freq must be float32 [{d // 2}] (full rotary), got {rotary.inv_freq.dtype} "
            f"{tuple(rotary.inv_freq.shape)}"
        )
    if rotary.positions.shape != (m,):
        raise ValueError(f"positions must be [{m}] (one per row), got {tuple(rotary.positions.shape)}")
    if not 0 <= rotary.rotated_heads <= n // d:
        raise ValueError(f"rotated_heads {rotary.rotated_heads} outside [0, {n // d}] heads")


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: RMSNormPrologue | None = None,
    rotary: RotaryEpilogue | None = None,
    counters: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
    target: TritonTarget | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`F.linear(x, weight, bias)` for x [M, K] with M <= MAX_ROWS (last dim contiguous) and a
    contiguous weight [N, K]. `norm` multiplies RMSNorm(x) (or of x + norm.residual) instead of
    x; `rotary` rotates the output's q/k heads. counters: from `counters_for(N)`, kept by the
    caller so a captured graph reuses them (allocated here when None). Returns the output, and
    with `norm.residual` also x + residual [M, K]."""
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}; use F.linear")
    if weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"weight {tuple(weight.shape)} must be contiguous with {k} columns")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    residual = norm.residual if norm is not None else None
    res_out = out
    if residual is not None:
        if residual.shape != (m, k):
            raise ValueError(f"residual {tuple(residual.shape)} must match x {(m, k)}")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        res_out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if norm is not None and norm.weight.shape != (k,):
        raise ValueError(f"norm weight {tuple(norm.weight.shape)} must be [{k}]")
    if m == 0:
        return (out, res_out) if residual is not None else out
    cfg = config or skinny_config(m, n, k, target, paired=rotary is not None)
    if cfg.block_m < m or cfg.block_n < 16:
        raise ValueError(f"{cfg} must tile {m} rows (block_m >= rows) with block_n >= 16")
    if rotary is not None:
        _check_rotary(rotary, n, m, cfg.block_n)
    k_per_split, split_k = split_k_of(cfg, k)
    if rotary is not None:
        epilogue, col_blocks = ROTARY, n // (2 * cfg.block_n)
    else:
        epilogue, col_blocks = PLAIN, triton.cdiv(n, cfg.block_n)
    grid = (col_blocks, split_k)
    present = {"x_ptr": x, "w_ptr": weight, "out_ptr": out}
    if bias is not None:
        present["bias_ptr"] = bias
    if split_k > 1:
        present["part_ptr"] = torch.empty((split_k, cfg.block_m, n), dtype=torch.float32, device=x.device)
        present["counter_ptr"] = counters if counters is not None else counters_for(n, x.device)
    if norm is not None:
        present["norm_w_ptr"] = norm.weight
    if residual is not None:
        present["res_ptr"], present["res_out_ptr"] = residual, res_out
    if rotary is not None:
        present["pos_ptr"], present["inv_freq_ptr"] = rotary.positions, rotary.inv_freq
    _kernels(interpreting()).skinny_gemm[grid](
        *pointer_args(present),
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        k_per_split,
        float(norm.eps) if norm is not None else 0.0,
        float(rotary.scaling) if rotary is not None else 1.0,
        **launch_constexprs(
            cfg,
            k,
            bias=bias is not None,
            epilogue=epilogue,
            norm=norm is not None,
            residual=residual is not None,
            split_k=split_k,
            # The interpreter's 16-bit dot is broken (triton 3.9 reinterprets the bits): fp32 there.
            dot_f32=x.dtype == torch.float32 or interpreting(),
            rotary=rotary,
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(target),
    )
    return (out, res_out) if residual is not None else out
