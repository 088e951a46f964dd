"""hallm.ops.reference against plain dense causal attention.

Every batch has shuffled block tables (block 0 never assigned), NaN in every unused cache slot,
and mixes fresh prefills, chunked prefills (context + several new tokens), decodes and short
multi-token steps, so both the per-request and the batched paths run in one call.
"""

from __future__ import annotations

import math

import pytest
import torch

from hallm.ops import reference, reference_plan
from hallm.ops.reference import (
    dense_causal_attention,
    paged_attention,
    paged_attention_with_plan,
    plan_paged_attention,
    write_kv,
)
from hallm.ops.testing import PagedBatch, cache_slot_view, expected_attention, make_paged_batch

# (context_len, query_len): fresh prefill, decode, chunked prefill, decode, a short multi-token
# step (batched with the decodes, padded), a one-token prefill, a decode at a block boundary.
MIXED = [(0, 13), (21, 1), (17, 12), (5, 1), (40, 3), (0, 1), (31, 1)]

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _batch(dtype: torch.dtype, heads: tuple[int, int], head_size: int, block_size: int, **kw) -> PagedBatch:
    ctx, qlens = zip(*kw.pop("requests", MIXED), strict=True)
    return make_paged_batch(
        list(qlens),
        list(ctx),
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        **kw,
    )


def _run(batch: PagedBatch, scale: float, **kw) -> torch.Tensor:
    t = batch.layout.tensors
    assert t is not None
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    return paged_attention(
        batch.query,
        batch.kv_cache,
        t.query_start_loc,
        t.seq_lens,
        t.context_lens,
        t.block_tables,
        scale,
        num_kv_heads=batch.kv_cache.shape[3],
        **kw,
    )


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    assert not torch.isnan(got).any(), "NaN leaked from unused cache slots"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads", [(4, 1), (8, 2), (4, 4), (8, 4)], ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
@pytest.mark.parametrize("head_size", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_batch_matches_dense(dtype, head_size, block_size, heads):
    batch = _batch(dtype, heads, head_size, block_size, seed=head_size + block_size)
    scale = head_size**-0.5
    _check(_run(batch, scale), expected_attention(batch, scale), dtype)


@pytest.mark.parametrize("soft_cap", [None, 5.0])
@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sliding_window_and_soft_cap(dtype, window, soft_cap):
    batch = _batch(dtype, (8, 2), 64, 8, seed=window)
    scale = 0.5  # large logits, so the cap bites
    got = _run(batch, scale, sliding_window=window, logits_soft_cap=soft_cap)
    _check(got, expected_attention(batch, scale, window, soft_cap), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_cap_alone(dtype):
    batch = _batch(dtype, (4, 1), 32, 16, seed=7)
    got = _run(batch, 1.0, logits_soft_cap=3.0)
    want = expected_attention(batch, 1.0, logits_soft_cap=3.0)
    _check(got, want, dtype)
    # The cap matters at this scale: uncapped attention is clearly different.
    assert (want - expected_attention(batch, 1.0)).abs().max() > 0.1


def test_float64_is_exact():
    batch = _batch(torch.float64, (8, 2), 32, 4, seed=3)
    got = _run(batch, 0.3, sliding_window=9, logits_soft_cap=4.0)
    torch.testing.assert_close(got, expected_attention(batch, 0.3, 9, 4.0), atol=1e-12, rtol=1e-12)


def test_split_groups_and_query_chunks(monkeypatch):
    """Tiny budgets force several batched groups and chunked score matrices: same answer."""
    monkeypatch.setattr(reference_plan, "_MAX_GROUP_KEY_POSITIONS", 40)
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMENTS", 2000)
    requests = [*MIXED, (3, 1), (9, 2), (60, 1), (0, 4), (14, 8), (2, 9)]
    for soft_cap in (None, 6.0):
        batch = _batch(torch.float32, (8, 2), 32, 8, requests=requests, seed=11)
        plan = plan_paged_attention(
            batch.layout.query_start_loc,
            batch.layout.seq_lens,
            batch.layout.context_lens,
            torch.from_numpy(batch.layout.block_tables),
            8,
        )
        assert len(plan.groups) > 4
        write_kv(batch.key, batch.value, batch.kv_cache, torch.from_numpy(batch.layout.slot_mapping))
        got = paged_attention_with_plan(
            batch.query, batch.kv_cache, plan, 0.2, 2, sliding_window=20, logits_soft_cap=soft_cap
        )
        _check(got, expected_attention(batch, 0.2, 20, soft_cap), torch.float32)


def test_plan_reused_across_layers():
    """One plan serves every layer (different caches and queries, same layout)."""
    batches = [_batch(torch.float32, (4, 2), 32, 16, seed=s) for s in (1, 1)]
    layout = batches[0].layout
    plan = plan_paged_attention(
        layout.query_start_loc,
        layout.seq_lens,
        layout.context_lens,
        torch.from_numpy(layout.block_tables),
        16,
    )
    for layer, batch in enumerate(batches):
        batch.query = batch.query + layer  # a different layer sees different queries
        write_kv(batch.key, batch.value, batch.kv_cache, torch.from_numpy(layout.slot_mapping))
        got = paged_attention_with_plan(batch.query, batch.kv_cache, plan, 0.2, 2)
        _check(got, expected_attention(batch, 0.2), torch.float32)


def test_padding_tokens_are_not_written_and_get_zero_output():
    batch = _batch(torch.float32, (4, 2), 32, 8, num_padding_tokens=3, seed=5)
    out = torch.full_like(batch.query, 7.0)
    got = _run(batch, 0.2, out=out)
    assert got is out
    real = batch.num_real_tokens
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))
    _check(out, expected_attention(batch, 0.2), torch.float32)
    # Exactly the requests' tokens (context + new) hold data; padding tokens wrote nowhere.
    filled = ~torch.isnan(cache_slot_view(batch.kv_cache)).any(dim=(0, 2, 3))  # [num_slots]
    assert int(filled.sum()) == int(batch.layout.seq_lens.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_round_trip(dtype):
    num_blocks, block_size, kv_heads, head_size = 6, 4, 2, 8
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_size), math.nan, dtype=dtype)
    key = torch.randn(5, kv_heads, head_size, dtype=torch.float32)  # cast on write
    value = torch.randn(5, kv_heads, head_size, dtype=torch.float32)
    slots = torch.tensor([13, -1, 0, 23, -5])
    write_kv(key, value, cache, slots)
    flat = cache_slot_view(cache)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[0, s], key[t].to(dtype))
            assert torch.equal(flat[1, s], value[t].to(dtype))
            assert torch.equal(cache[0, s // block_size, s % block_size], key[t].to(dtype))
    assert torch.isnan(flat[:, [s for s in range(num_blocks * block_size) if s not in (0, 13, 23)]]).all()


def test_write_kv_rejects_bad_shapes():
    cache = torch.zeros(2, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="key/value"):
        write_kv(torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), cache[0], torch.zeros(3, dtype=torch.long))


def test_sliding_window_never_reads_blocks_outside_the_window():
    """Blocks wholly outside every query's window may be the poisoned null block."""
    block_size, window = 4, 5
    batch = _batch(torch.float32, (4, 2), 32, block_size, requests=[(30, 1), (20, 3), (0, 12)], seed=9)
    t = batch.layout.tensors
    assert t is not None
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    tables = t.block_tables.clone()
    for i in range(batch.layout.num_reqs):
        first_pos = int(batch.layout.context_lens[i]) - window + 1  # earliest position any query reads
        for blk in range(max(0, first_pos) // block_size):
            tables[i, blk] = 0
    got = paged_attention(
        batch.query,
        batch.kv_cache,
        t.query_start_loc,
        t.seq_lens,
        t.context_lens,
        tables,
        0.2,
        2,
        sliding_window=window,
    )
    _check(got, expected_attention(batch, 0.2, window), torch.float32)


def test_inconsistent_layout_is_a_value_error():
    bt = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_len == context_len"):
        plan_paged_attention([0, 2, 3], [5, 4], [3, 2], bt, 4)
    with pytest.raises(ValueError, match="columns"):
        plan_paged_attention([0, 2, 3], [5, 20], [3, 19], bt, 4)
    with pytest.raises(ValueError, match="num_reqs"):
        plan_paged_attention([0, 2], [5, 4], [3, 3], bt, 4)
    cache = torch.zeros(2, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(torch.zeros(1, 4, 8), cache, [0, 1], [1], [0], bt[:1], 1.0, 2, sliding_window=0)
    with pytest.raises(ValueError, match="KV heads"):
        paged_attention(torch.zeros(1, 4, 8), cache, [0, 1], [1], [0], bt[:1], 1.0, 4)


@pytest.mark.parametrize("heads", [(4, 1), (6, 3), (2, 2)])
def test_dense_oracle_matches_naive_loops(heads):
    """The oracle's oracle against the definition, one query and one head at a time."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads[0], 8, generator=gen, dtype=torch.float64)
    k = torch.randn(7, heads[1], 8, generator=gen, dtype=torch.float64)
    v = torch.randn(7, heads[1], 8, generator=gen, dtype=torch.float64)
    got = dense_causal_attention(q, k, v, 0.4, sliding_window=3, logits_soft_cap=2.0)
    group = heads[0] // heads[1]
    for j in range(3):
        pos = 4 + j
        keys = range(max(0, pos - 3 + 1), pos + 1)
        for h in range(heads[0]):
            logits = torch.stack([2.0 * torch.tanh((q[j, h] @ k[s, h // group]) * 0.4 / 2.0) for s in keys])
            probs = torch.softmax(logits, 0)
            want = sum(p * v[s, h // group] for p, s in zip(probs, keys, strict=True))
            torch.testing.assert_close(got[j, h], want)


def test_empty_step_and_requests_without_new_tokens():
    cache = torch.zeros(2, 4, 4, 2, 8)
    out = torch.full((2, 4, 8), 3.0)
    # No requests at all: every row is padding.
    paged_attention(torch.ones(2, 4, 8), cache, [0], [], [], torch.zeros(0, 1), 1.0, 2, out=out)
    assert torch.equal(out, torch.zeros_like(out))
    # A request with no new token this step is skipped; the other one is attended.
    cache[:, 1, 0] = 1.0
    got = paged_attention(torch.ones(1, 4, 8), cache, [0, 0, 1], [3, 1], [3, 0], torch.ones(2, 1), 1.0, 2)
    torch.testing.assert_close(got, torch.ones(1, 4, 8))
