"""Pure-torch paged attention: the oracle every backend is checked against, on any torch device.

It is also the CPU platform's default kernel, so it is vectorized: requests with few new tokens
(decode, short speculative chunks) are attended together in one batched call, padded to the
longest sequence of their group; longer ones (prefill, chunked prefill) one request at a time,
unpadded. The gather indices depend only on the step, not on the layer, so a backend computes
them once per step with `plan_paged_attention` and reuses the plan in every layer with
`paged_attention_with_plan`; `paged_attention` does both in one call.

KV-cache layout (the default `AttentionBackend.kv_cache_shape`):
`[2, num_blocks, block_size, num_kv_heads, head_size]`, index 0 keys, 1 values. A token's flat
slot is `block_id * block_size + offset`.

Unused cache slots may hold anything, NaN included: a gathered key/value position that no query
attends (padding, or outside the sliding window) is replaced with zero before any arithmetic
(masking its score alone would not do: NaN * 0 is NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hallm.ops.reference_plan import IntArray, PagedAttentionPlan, plan_paged_attention

__all__ = [
    "IntArray",
    "PagedAttentionPlan",
    "dense_causal_attention",
    "paged_attention",
    "paged_attention_with_plan",
    "plan_paged_attention",
    "write_kv",
]

# A bound on one call's temporaries, in elements: it changes speed and peak memory only.
_MAX_SCORE_ELEMENTS = 1 << 24  # batch x heads x query rows x keys of one score matrix


# ---- writing the cache --------------------------------------------------------------------------


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write one step's keys and values into the paged cache, in place.

    key, value: [num_tokens, num_kv_heads, head_size], any float dtype (cast to the cache's).
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size], contiguous.
    slot_mapping: integer [num_tokens]; token t goes to flat slot `slot_mapping[t]`
        (`block_id * block_size + offset`). A slot < 0 marks a padding token: not written.
    """
    _check_cache(kv_cache)
    num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
    if key.dim() != 3 or key.shape != value.shape or tuple(key.shape[1:]) != (num_kv_heads, head_size):
        raise ValueError(
            f"key/value must both be [num_tokens, {num_kv_heads}, {head_size}] to match the cache, "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, Hkv, D], shares storage
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.long)
    real = slots >= 0
    # Dropping padding tokens by boolean index costs one host sync on an accelerator: fine for
    # the oracle, and free on the host.
    if not bool(real.all()):
        slots, key, value = slots[real], key[real], value[real]
    flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: IntArray,
    seq_lens: IntArray,
    context_lens: IntArray,
    block_tables: torch.Tensor,
    scale: float,
    num_kv_heads: int,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one step's new tokens over the paged KV cache; returns `out`.

    query: [num_tokens, num_heads, head_size]. Request i owns the tokens
        `query_start_loc[i]:query_start_loc[i+1]` (query_start_loc: [num_reqs + 1]); token j of
        request i sits at position `context_lens[i] + j` and attends to positions 0..itself.
        Tokens past `query_start_loc[-1]` are padding: their rows of `out` are zeroed.
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size], already holding this step's
        keys/values (see `write_kv`).
    seq_lens, context_lens: [num_reqs]; seq_lens[i] == context_lens[i] + query_len_i.
    block_tables: [num_reqs, max_blocks_per_req]; entry k of request i holds positions
        `k*block_size ..`; entries past a request's last block are never read. With a sliding
        window, blocks wholly outside every query's window may be any valid block id (the null
        block, say): their contents never reach the result.
    scale: softmax scale applied to q.k. num_kv_heads: must match the cache; query head h
        reads KV head `h // (num_heads // num_kv_heads)`.
    sliding_window: position p attends to positions (p - sliding_window, p] only.
    logits_soft_cap: scaled logits become `cap * tanh(logits / cap)` before the softmax.
    out: [num_tokens, num_heads, head_size] written in place; allocated in query's dtype if None.
    sinks: None, or float [num_heads]: head h's sink logit joins every softmax denominator of
        that head (a logit with no value; see `AttentionSpec.sinks`).

    Scores and softmax are computed in float32 (float64 for a float64 query).
    """
    _check_cache(kv_cache)
    plan = plan_paged_attention(
        query_start_loc, seq_lens, context_lens, block_tables, block_size=int(kv_cache.shape[2])
    )
    return paged_attention_with_plan(
        query, kv_cache, plan, scale, num_kv_heads, sliding_window, logits_soft_cap, out, sinks
    )


def paged_attention_with_plan(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: PagedAttentionPlan,
    scale: float,
    num_kv_heads: int,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` with the step's gather indices computed beforehand (once per step)."""
    _check_cache(kv_cache)
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_size], got {tuple(query.shape)}")
    num_tokens, num_heads, head_size = query.shape
    if tuple(kv_cache.shape[3:]) != (num_kv_heads, head_size):
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} does not hold {num_kv_heads} KV heads of size {head_size}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if kv_cache.shape[2] != plan.block_size:
        raise ValueError(f"plan was made for block size {plan.block_size}, cache has {kv_cache.shape[2]}")
    if plan.num_tokens > num_tokens:
        raise ValueError(f"plan covers {plan.num_tokens} tokens, query has {num_tokens}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks must be [num_heads={num_heads}], got {tuple(sinks.shape)}")
    if out is None:
        out = torch.empty_like(query)
    elif tuple(out.shape) != tuple(query.shape):
        raise ValueError(f"out must have query's shape {tuple(query.shape)}, got {tuple(out.shape)}")

    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    sink_logits = None if sinks is None else sinks.to(device=query.device, dtype=compute_dtype)
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, Hkv, D]
    if plan.num_tokens < num_tokens:
        out[plan.num_tokens :].zero_()
    for group in plan.groups:
        batch, num_rows = group.q_index.shape
        seq = group.kv_slots.shape[1]
        kv_pos = torch.arange(seq, device=kv_cache.device)  # [S]
        q_pos = group.q_pos[:, :, None]  # [B, Q, 1]
        mask = kv_pos <= q_pos  # [B, Q, S]: causal
        if group.kv_valid is not None:
            mask &= group.kv_valid[:, None, :]
        if sliding_window is not None:
            mask &= kv_pos > q_pos - sliding_window
        # index_select copies whole [Hkv, D] rows: about twice as fast as advanced indexing.
        slots = group.kv_slots.flatten()
        k = flat[0].index_select(0, slots).view(batch, seq, num_kv_heads, head_size)  # [B, S, Hkv, D]
        v = flat[1].index_select(0, slots).view(batch, seq, num_kv_heads, head_size)
        if group.kv_valid is not None or sliding_window is not None:
            # Zero every key position no query of the request attends: padding slots may hold
            # NaN, and a masked score alone does not stop NaN (NaN * 0 is NaN). k and v are
            # fresh copies, so in place is safe.
            unused = ~mask.any(dim=1)[:, :, None, None]  # [B, S, 1, 1]
            k.masked_fill_(unused, 0)
            v.masked_fill_(unused, 0)
        q = query[group.q_index].to(compute_dtype)  # [B, Q, H, D]
        result = _attend(
            q, k.to(compute_dtype), v.to(compute_dtype), mask, scale, logits_soft_cap, sink_logits
        )
        result = result.reshape(batch * num_rows, num_heads, head_size)
        if group.rows is not None:
            result = result[group.rows]
        out.index_copy_(0, group.out_index, result.to(out.dtype))
    return out


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    soft_cap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention of a padded batch.

    q [B, Q, H, D]; k, v [B, S, Hkv, D], free of NaN; mask bool [B, Q, S], True = attend;
    sinks None or [H] in q's dtype.
    Returns [B, Q, H, D]. Rows with no True in `mask` come out undefined (only padded rows).
    """
    batch, num_rows, num_heads, head_size = q.shape
    seq, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qh = q.transpose(1, 2)  # [B, H, Q, D]
    kh = k.transpose(1, 2)  # [B, Hkv, S, D]
    vh = v.transpose(1, 2)
    out = q.new_empty(batch, num_heads, num_rows, head_size)
    # Query rows in chunks, so that one score matrix stays within _MAX_SCORE_ELEMENTS.
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * num_heads * seq))
    for lo in range(0, num_rows, chunk):
        hi = min(num_rows, lo + chunk)
        rows = hi - lo
        allowed = mask[:, None, lo:hi]  # [B, 1, rows, S]
        if soft_cap is None and sinks is None:
            out[:, :, lo:hi] = F.scaled_dot_product_attention(
                qh[:, :, lo:hi], kh, vh, attn_mask=allowed, scale=scale, enable_gqa=group > 1
            )
            continue
        # Soft-capping and sinks sit between q.k and the softmax, where SDPA has no hook: spell
        # it out. Query head h = kv_head * group + g, so heads of one KV head are adjacent.
        qg = qh[:, :, lo:hi].reshape(batch, num_kv_heads, group * rows, head_size)
        scores = torch.matmul(qg, kh.transpose(-1, -2)) * scale  # [B, Hkv, G*rows, S]
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        scores = scores.view(batch, num_kv_heads, group, rows, seq)
        scores = scores.masked_fill(~allowed[:, :, None], -math.inf)
        if sinks is not None:
            # One more logit per row, with no value: softmax over S + 1, the sink's share dropped.
            sink = sinks.view(1, num_kv_heads, group, 1, 1).expand(batch, -1, -1, rows, 1)
            scores = torch.cat((scores, sink), dim=-1)
            probs = torch.softmax(scores, dim=-1)[..., :seq].reshape(batch, num_kv_heads, group * rows, seq)
        else:
            probs = torch.softmax(scores, dim=-1).view(batch, num_kv_heads, group * rows, seq)
        out[:, :, lo:hi] = torch.matmul(probs, vh).view(batch, num_heads, rows, head_size)
    return out.transpose(1, 2)


# ---- the oracle's oracle -----------------------------------------------------------------------


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Plain causal attention of one sequence, written for obviousness rather than speed.

    q: [num_queries, num_heads, head_size], the LAST num_queries positions of the sequence;
    k, v: [seq_len, num_kv_heads, head_size], every position 0..seq_len-1 (seq_len >= num_queries).
    Query j sits at position `seq_len - num_queries + j`. Query head h reads KV head
    `h // (num_heads // num_kv_heads)`. sinks: None or [num_heads], a logit per head with no
    value in every softmax. Returns [num_queries, num_heads, head_size] in
    `compute_dtype` (float64 by default, so a test compares at full precision).
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"need q [Q, H, D] and k, v [S, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}")
    num_queries, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    if seq_len < num_queries or num_heads % num_kv_heads:
        raise ValueError(f"need seq_len >= num_queries and heads divisible; got {q.shape}, {k.shape}")
    group = num_heads // num_kv_heads
    qf = q.to(compute_dtype)
    kf = k.to(compute_dtype).repeat_interleave(group, dim=1)  # [S, H, D]: head h reads h // group
    vf = v.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", qf, kf) * scale  # [H, Q, S]
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    q_pos = torch.arange(seq_len - num_queries, seq_len, device=q.device)[:, None]  # [Q, 1]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, S]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink = sinks.to(compute_dtype)[:, None, None].expand(num_heads, num_queries, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :seq_len]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqs,shd->qhd", probs, vf)


# ---- helpers -----------------------------------------------------------------------------------


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_size], "
            f"got {tuple(kv_cache.shape)}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (its slots are addressed as one flat axis)")
