"""Triton paged attention for mixed prefill + decode steps.

It reads the cache that `hallm.ops.triton.kv_write` fills (layout there); its tile shape and
split-KV choice come from `hallm.ops.triton.launch_config`.

The attention kernel ("unified", after vLLM's Triton backend): program (q_block, kv_head,
segment) owns BLOCK_M query rows = all NUM_Q_PER_KV query heads of `kv_head` for BLOCK_Q
consecutive tokens of one request (GQA: the heads that share a KV head share every K/V load and
make the tile tall enough for a matrix instruction). It finds its request by a binary search of
`query_start_loc` (request i's q-blocks start at `query_start_loc[i] // BLOCK_Q + i`, so the grid
size depends only on the number of tokens and requests), then streams the request's keys and
values in tiles of TILE_N positions (any page size: each position looks its block up in the block
table) with an online softmax in base 2. Causal masking, an optional sliding window and an
optional logit soft cap are applied per element. Attention sinks (a logit per query head with
no value, `AttentionSpec.sinks`) start the online softmax: running max = the sink, sum = 1; with
split-KV only segment 0 starts from it, so the merge counts it once. Unused cache slots may hold NaN: every key and
value position that no query of the tile may attend is masked at the load (other=0), never only
at the score.

Split-KV (flash-decoding): for decode-only steps with few (request, KV head) pairs, a third grid
axis splits each request's KV range into up to NUM_SEGMENTS contiguous parts of at least
MIN_SEGMENT_TILES tiles (a short context uses fewer; the programs past them exit); each program
writes its unnormalized partial output, running max and sum (float32); the last program of a
(q_block, kv_head) to finish (an atomic counter) merges them in the same launch, or
`hallm.ops.triton.split_kv_reduce` does in a second one (`launch_config.merges_in_kernel`
chooses). With the in-kernel merge a request whose keys fit one segment writes its output
directly. Decode-only steps (DECODE_ONLY) map program i to request i, with no search.

All launches read lengths from device tensors, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import triton.language as tl

from hallm.ops.triton.kv_write import check_cache, write_kv_kernel
from hallm.ops.triton.launch_config import (
    KernelConfig,
    attention_constexprs,
    kernel_config,
    merges_in_kernel,
    split_kv_segments,
)
from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.split_kv_reduce import merge_segments, reduce_kernel
from hallm.ops.triton.target import TritonTarget

# ---- kernels (plain functions; decorated per mode by `_kernels`) -------------------------------


def _attention_kernel(  # type: ignore[no-untyped-def]
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_sum_ptr,
    counter_ptr,
    num_seqs,
    scale,
    soft_cap,
    window,
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    cache_stride_blk,
    cache_stride_tok,
    cache_stride_h,
    bt_stride,
    NUM_HEADS: tl.constexpr,
    NUM_Q_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DECODE_ONLY: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    MERGE_IN_KERNEL: tl.constexpr,
    MIN_SEGMENT_TILES: tl.constexpr,
    SEG_CHUNK: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    sinks_ptr=None,  # float32 [NUM_HEADS] when USE_SINKS (last, defaulted: older callers omit it)
    USE_SINKS: tl.constexpr = False,
):
    if USE_PDL:  # see hallm.ops.triton.runtime.pdl_launch
        gdc_wait()
        gdc_launch_dependents()
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    if DECODE_ONLY:  # at most one token per request: program q_block is request q_block
        seq = q_block
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        q_block_local = 0
    else:
        # The request owning this q-block: the last i with query_start_loc[i] // BLOCK_Q + i <= q_block
        # (a chain of dependent loads: ~log2(requests) L2 round trips before the first KV load).
        lo: tl.int32 = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first_block = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            if first_block <= q_block:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    q_idx = q_block_local * BLOCK_Q + offs_m // NUM_Q_PER_KV  # token index within the request
    head = kv_head * NUM_Q_PER_KV + offs_m % NUM_Q_PER_KV
    row_mask = (q_idx < q_len) & (offs_m < BLOCK_Q * NUM_Q_PER_KV)
    token = q_start + q_idx
    q = tl.load(
        q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = ctx_len + q_idx  # absolute position of each row's token

    # Key positions some row of this tile may attend: [kv_start, kv_end).
    kv_end = ctx_len + tl.minimum((q_block_local + 1) * BLOCK_Q, q_len)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(ctx_len + q_block_local * BLOCK_Q - window + 1, 0)
    tile_lo = kv_start // TILE_N
    tile_hi = tl.cdiv(kv_end, TILE_N)
    n_seg = 1  # segments that hold keys for this request: each at least MIN_SEGMENT_TILES tiles
    if NUM_SEGMENTS > 1:
        per_segment = tl.maximum(tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS), MIN_SEGMENT_TILES)
        n_seg = tl.maximum(tl.cdiv(tile_hi - tile_lo, per_segment), 1)
        if MERGE_IN_KERNEL and segment >= n_seg:  # nothing to read; the merge counts the n_seg others
            return
        t_begin = tile_lo + segment * per_segment
        t_end = tl.minimum(t_begin + per_segment, tile_hi)
    else:
        t_begin = tile_lo
        t_end = tile_hi

    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if USE_SINKS:  # the sink as a first key with weight exp(sink) and a zero value (base 2)
        sink = tl.load(sinks_ptr + head, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        first = segment == 0
        m_i = tl.where(first, sink, m_i)
        l_i = tl.where(first, 1.0, l_i)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * bt_stride
    for tile in range(t_begin, t_end):
        offs_n = tile * TILE_N + tl.arange(0, TILE_N)
        n_mask = (offs_n < kv_end) & (offs_n >= kv_start)
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = blk * cache_stride_blk + (offs_n % BLOCK_SIZE) * cache_stride_tok + kv_head * cache_stride_h
        k = tl.load(
            k_cache_ptr + kv_off[None, :] + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        v = tl.load(
            v_cache_ptr + kv_off[:, None] + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if USE_SOFT_CAP:
            x = s * (2.0 * scale / soft_cap)
            s = (soft_cap * 1.4426950408889634) * (1.0 - 2.0 / (tl.exp(x) + 1.0))  # cap * tanh(logit / cap)
        else:
            s = s * qk_scale
        allowed = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    out_ptrs = out_ptr + token[:, None] * out_stride_t + head[:, None] * out_stride_h + offs_d[None, :]
    out_mask = row_mask[:, None] & d_mask[None, :]
    seg_row = (token * NUM_HEADS + head) * NUM_SEGMENTS + segment  # [M]
    # Four branches, two stores written twice: one shared tail choosing by a runtime flag
    # measured slower on Llama-3-8B's split-KV launches (benchmarks/results/gpu.md).
    if NUM_SEGMENTS == 1:
        tl.store(
            out_ptrs, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask
        )
    elif not MERGE_IN_KERNEL:  # the reduce kernel reads every segment's partial
        tl.store(segm_out_ptr + seg_row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_mask[:, None])
        tl.store(segm_max_ptr + seg_row, m_i, mask=row_mask)
        tl.store(segm_sum_ptr + seg_row, l_i, mask=row_mask)
    elif n_seg == 1:  # the request's keys fit one segment: no partials, no merge
        tl.store(
            out_ptrs, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask
        )
    else:
        tl.store(segm_out_ptr + seg_row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_mask[:, None])
        tl.store(segm_max_ptr + seg_row, m_i, mask=row_mask)
        tl.store(segm_sum_ptr + seg_row, l_i, mask=row_mask)
        # The last of the n_seg programs of this (q_block, kv_head) to finish merges them: the
        # barrier orders every thread's partial stores before the counter's release, the acquire
        # orders the loads (through L2: .cg) after the other programs' stores. It puts the counter
        # back to 0 for the next launch (a CUDA graph replays the same buffer).
        tl.debug_barrier()
        counter = counter_ptr + q_block * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_seg - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            base = (token * NUM_HEADS + head) * NUM_SEGMENTS  # [M]
            offs_s = tl.arange(0, NUM_SEGMENTS)
            m_all = tl.load(
                segm_max_ptr + base[:, None] + offs_s[None, :],
                mask=row_mask[:, None] & (offs_s[None, :] < n_seg),
                other=float("-inf"),
                cache_modifier=".cg",
            )
            g = tl.max(m_all, axis=1)  # [M]: the common scale
            g = tl.where(g > float("-inf"), g, 0.0)  # a row that saw no key: keep -inf - g finite
            denom = tl.zeros([BLOCK_M], tl.float32)
            merged = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
            offs_c = tl.arange(0, SEG_CHUNK)
            # SEG_CHUNK partials per [M, SEG_CHUNK, HEAD_PAD] load, so the loads of a
            # chunk are in flight together rather than one L2 round trip per segment.
            for c in range(0, n_seg, SEG_CHUNK):
                rows = base[:, None] + (c + offs_c)[None, :]  # [M, C]
                cm = row_mask[:, None] & ((c + offs_c)[None, :] < n_seg)
                m_s = tl.load(segm_max_ptr + rows, mask=cm, other=float("-inf"), cache_modifier=".cg")
                w = tl.where(m_s > float("-inf"), tl.exp2(m_s - g[:, None]), 0.0)  # [M, C]
                l_s = tl.load(segm_sum_ptr + rows, mask=cm, other=0.0, cache_modifier=".cg")
                denom += tl.sum(w * l_s, axis=1)
                part = tl.load(
                    segm_out_ptr + rows[:, :, None] * HEAD_PAD + offs_d[None, None, :],
                    mask=cm[:, :, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                merged += tl.sum(part * w[:, :, None], axis=1)
            res = merged / tl.where(denom > 0, denom, 1.0)[:, None]
            tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The attention and split-KV reduction kernels, interpreted or compiled."""
    return SimpleNamespace(
        attention=decorate(_attention_kernel, interpret, do_not_specialize=["num_seqs"]),
        reduce=reduce_kernel(interpret),
    )


def jit_kernels() -> SimpleNamespace:
    """The compiled (not interpreted) kernels: `write_kv`, `attention`, `reduce`."""
    return SimpleNamespace(write_kv=write_kv_kernel(False), **vars(_kernels(False)))


# ---- launcher ----------------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    num_real_tokens: int | None = None,
    split_kv: bool | None = None,
    workspace: dict[Any, Any] | None = None,
    config: KernelConfig | None = None,
    target: TritonTarget | None = None,
    num_segments: int | None = None,
    merge_in_kernel: bool | None = None,
    min_segment_tiles: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one step's tokens over the paged cache; returns `out`.

    query [num_tokens, num_heads, head_size] (last dim contiguous); kv_cache already holds the
    step's keys/values (see `write_kv`). query_start_loc int32 [num_reqs + 1], seq_lens int32
    [num_reqs], block_tables int32 [num_reqs, max_blocks] (row stride may exceed its width):
    device tensors, read by the kernel only. max_query_len: a host bound on any request's new
    tokens (1 = decode only). Token j of request i sits at position
    `seq_lens[i] - query_len_i + j`. num_real_tokens: when given (a host int, e.g.
    `query_start_loc[-1]` from the host layout), rows from it on are padding and are zeroed.
    split_kv: force split-KV on/off (default: `split_kv_segments` decides). num_segments: the
    split-KV segments (a power of two; default: `split_kv_segments`, at least 2 when forced).
    workspace: a dict the caller keeps for the step, so every layer reuses the split-KV
    buffers. config: override the tile shape (benchmarks). merge_in_kernel: split-KV partials
    are merged by the last segment program of each (q-block, KV head) to finish, counted by an
    atomic (one launch); False merges them in a second kernel; None: `launch_config.merges_in_kernel`
    decides from the number of segments. min_segment_tiles: the fewest KV tiles a segment covers
    (default `launch_config.SPLIT_KV_MIN_TILES`; tests lower it to exercise many segments).
    sinks: None, or [num_heads] sink logits on the query's device (`AttentionSpec.sinks`).
    """
    check_cache(kv_cache)
    num_tokens, num_heads, head_size = query.shape
    _, _, block_size, num_kv_heads, cache_head_size = kv_cache.shape
    if cache_head_size != head_size or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not match the cache {tuple(kv_cache.shape)}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    if num_real_tokens is not None and num_real_tokens < num_tokens:
        out[num_real_tokens:].zero_()
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    if sinks is not None:
        if tuple(sinks.shape) != (num_heads,):
            raise ValueError(f"sinks must be [num_heads={num_heads}], got {tuple(sinks.shape)}")
        sinks = sinks.to(torch.float32).contiguous()  # a no-op for the float32 [H] the layer passes
    q_per_kv = num_heads // num_kv_heads
    decode_only = max_query_len <= 1
    cfg = config or kernel_config(query.dtype, head_size, q_per_kv, decode_only, target)
    auto = split_kv_segments(num_reqs, num_kv_heads, max_query_len, target)
    if split_kv is None:
        split_kv = auto > 1
    segments = (num_segments or max(auto, 2)) if split_kv else 1
    if merge_in_kernel is None:
        merge_in_kernel = merges_in_kernel(segments)
    meta = attention_constexprs(
        cfg, q_per_kv, head_size, decode_only, segments, merge_in_kernel, min_segment_tiles
    )
    pad = meta["HEAD_PAD"]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if split_kv:
        key = ("split_kv", num_tokens, num_heads, pad, segments, query.device)
        bufs = workspace.get(key) if workspace is not None else None
        if bufs is None:
            rows = num_tokens * num_heads * segments
            bufs = (
                torch.empty(rows * pad, dtype=torch.float32, device=query.device),
                torch.empty(rows, dtype=torch.float32, device=query.device),
                torch.empty(rows, dtype=torch.float32, device=query.device),
            )
            if workspace is not None:
                workspace[key] = bufs
        segm_out, segm_max, segm_sum = bufs
    else:
        segm_out = segm_max = segm_sum = out
    q_blocks = num_reqs if decode_only else num_tokens // meta["BLOCK_Q"] + num_reqs
    grid = (q_blocks, num_kv_heads, segments)
    counters = seq_lens  # an int32 placeholder when nothing is counted
    if meta["MERGE_IN_KERNEL"]:
        counters_key = ("split_kv_counters", grid[0], num_kv_heads, query.device)
        kept = workspace.get(counters_key) if workspace is not None else None
        if kept is None:  # zeros; every launch leaves them zero again
            kept = torch.zeros(grid[0] * num_kv_heads, dtype=torch.int32, device=query.device)
            if workspace is not None:
                workspace[counters_key] = kept
        counters = kept
    kern = _kernels(interpreting())
    kern.attention[grid](
        out,
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        segm_out,
        segm_max,
        segm_sum,
        counters,
        num_reqs,
        float(scale),
        float(logits_soft_cap or 1.0),
        int(sliding_window or 0),
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        NUM_Q_PER_KV=q_per_kv,
        HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size,
        **meta,
        USE_SOFT_CAP=logits_soft_cap is not None,
        USE_WINDOW=sliding_window is not None,
        # float32: exact products (no tf32), as the reference; the interpreter's 16-bit dot is
        # broken (triton 3.9 reinterprets the bits), so it gets float32 operands too.
        DOT_F32=query.dtype == torch.float32 or interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(target),
        **({"sinks_ptr": sinks, "USE_SINKS": True} if sinks is not None else {}),
    )
    if split_kv and not meta["MERGE_IN_KERNEL"]:
        merge_segments(out, segm_out, segm_max, segm_sum, query_start_loc, num_reqs, segments, target)
    return out
