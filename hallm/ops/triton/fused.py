"""Fused elementwise kernels for the decoder layer: RMSNorm (+ residual add), rotary embedding,
SiLU-and-mul. Each replaces a chain of small PyTorch kernels with one launch.

Why: a decode step of a small model is a thousand tiny kernels; even replayed from a CUDA
graph each costs microseconds, far more than its bytes, and PyTorch's rotary embedding alone is
~22 kernels per layer, so a small model's step ran several times its memory floor
(benchmarks/results/gpu.md). Arithmetic
is float32 inside each kernel, rounding to the activation dtype where the reference modules
(hallm.core.layers, HF transformers) round: the residual sum, the normalized activations before
the weight, the rotary cos/sin tables, the SiLU output.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.target import TritonTarget, warps_for


def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_stride,
    res_stride,
    out_stride,
    res_out_stride,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if USE_PDL:  # see hallm.ops.triton.runtime.pdl_launch: only the weight before the wait
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like `x + residual`
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rotary_kernel(  # type: ignore[no-untyped-def]
    pos_ptr,
    inv_freq_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    scaling,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    REST_PAD: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One token: rotate the first 2*HALF dims of every q and k head (NeoX rotate-half layout)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    inv_freq = tl.load(inv_freq_ptr + j, mask=jm, other=0.0)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freq = pos * inv_freq
    cos = (tl.cos(freq) * scaling).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    sin = (tl.sin(freq) * scaling).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    h = tl.arange(0, H_PAD)
    for which in tl.static_range(2):
        if which == 0:
            src, dst, stride_t, stride_h, heads = q_ptr, q_out_ptr, q_stride_t, q_stride_h, NUM_Q_HEADS
        else:
            src, dst, stride_t, stride_h, heads = k_ptr, k_out_ptr, k_stride_t, k_stride_h, NUM_K_HEADS
        hm = h < heads
        m = hm[:, None] & jm[None, :]
        base = src + t * stride_t + h[:, None] * stride_h + j[None, :]
        x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
        out = dst + t * (heads * HEAD_SIZE) + h[:, None] * HEAD_SIZE + j[None, :]
        tl.store(out, (x1 * cos[None, :] - x2 * sin[None, :]).to(dst.dtype.element_ty), mask=m)
        tl.store(out + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(dst.dtype.element_ty), mask=m)
        if REST_PAD > 0:  # dims past the rotary dims pass through
            r = tl.arange(0, REST_PAD)
            rm = hm[:, None] & (r[None, :] < HEAD_SIZE - 2 * HALF)
            rest = tl.load(src + t * stride_t + h[:, None] * stride_h + 2 * HALF + r[None, :], mask=rm)
            tl.store(
                dst + t * (heads * HEAD_SIZE) + h[:, None] * HEAD_SIZE + 2 * HALF + r[None, :],
                rest,
                mask=rm,
            )


def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, out_ptr, x_stride, out_stride, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False
):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + N + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded
    tl.store(out_ptr + row * out_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    return SimpleNamespace(
        rms_norm=decorate(_rms_norm_kernel, interpret),
        rotary=decorate(_rotary_kernel, interpret),
        silu_and_mul=decorate(_silu_and_mul_kernel, interpret),
    )


def jit_kernels() -> SimpleNamespace:
    return _kernels(False)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    target: TritonTarget | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`hallm.core.layers.norm.RMSNorm.forward` in one kernel: x [rows, N] (rows contiguous in
    the last dim). With `residual`, returns (norm(x + residual), x + residual)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    res_in = residual.reshape(-1, n) if residual is not None else rows
    res_out = torch.empty_like(out) if residual is not None else out
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        _kernels(interpreting()).rms_norm[(rows.shape[0],)](
            rows,
            res_in,
            weight,
            out,
            res_out,
            rows.stride(0),
            res_in.stride(0),
            out.stride(0),
            res_out.stride(0),
            float(eps),
            N=n,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=warps_for(target, min(512, max(32, block // 8))),
            **pdl_launch(target),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    target: TritonTarget | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`RotaryEmbedding.forward` (NeoX rotate-half, no long-rope switch) in one kernel.

    positions [T]; q [T, Hq, D], k [T, Hk, D] (last dim contiguous, any token/head strides);
    inv_freq float32 [rotary_dim / 2]. Returns new contiguous (q, k)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    half = inv_freq.shape[0]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        rest = d - 2 * half
        _kernels(interpreting()).rotary[(t,)](
            positions,
            inv_freq,
            q,
            k,
            q_out,
            k_out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            float(scaling),
            NUM_Q_HEADS=hq,
            NUM_K_HEADS=hk,
            HEAD_SIZE=d,
            HALF=half,
            H_PAD=triton.next_power_of_2(max(hq, hk)),
            HALF_PAD=triton.next_power_of_2(half),
            REST_PAD=triton.next_power_of_2(rest) if rest > 0 else 0,
            num_warps=warps_for(target, 128),
            **pdl_launch(target),
        )
    return q_out, k_out


def silu_and_mul(x: torch.Tensor, target: TritonTarget | None = None) -> torch.Tensor:
    """silu(x[..., :N]) * x[..., N:] for x [T, 2N] (last dim contiguous)."""
    n = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * n)
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _kernels(interpreting()).silu_and_mul[(rows.shape[0], triton.cdiv(n, block))](
            rows,
            out,
            rows.stride(0),
            out.stride(0),
            n,
            BLOCK=block,
            num_warps=warps_for(target, 128),
            **pdl_launch(target),
        )
    return out.view(*x.shape[:-1], n)
