"""hallm.ops.triton kernels in Triton's interpreter (TRITON_INTERPRET=1) against the reference.

Every batch comes from `hallm.ops.testing.make_paged_batch`: shuffled block tables (block 0, the
null block, never assigned), NaN in every unused cache slot and in table padding, padding tokens
with slot -1. Shapes are tiny because each interpreted launch costs ~0.1 s per few programs.
The same checks run compiled on a real GPU in tests/gpu/test_triton_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hallm.ops import reference
from hallm.ops.testing import PagedBatch, cache_slot_view, expected_attention, make_paged_batch

# (context_len, query_len): fresh prefill, decode, chunked prefill, decode, short multi-token
# step, one-token prefill, decode at a block boundary.
MIXED = [(0, 13), (21, 1), (17, 12), (5, 1), (40, 3), (0, 1), (31, 1)]
DECODE = [(21, 1), (70, 1), (5, 1), (0, 1), (16, 1)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _batch(requests, heads, head_size, block_size, dtype=torch.float32, **kw) -> PagedBatch:  # type: ignore[no-untyped-def]
    ctx, qlens = zip(*requests, strict=True)
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


def _run(batch: PagedBatch, scale: float, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from hallm.ops.triton import paged_attention, write_kv

    t = batch.layout.tensors
    assert t is not None
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    out = torch.full_like(batch.query, float("nan"))  # poisoned: every row must be written
    return paged_attention(
        batch.query,
        batch.kv_cache,
        t.query_start_loc,
        t.seq_lens,
        t.block_tables,
        max_query_len=batch.layout.max_query_len,
        scale=scale,
        out=out,
        num_real_tokens=batch.num_real_tokens,
        **kw,
    )


def _check(out: torch.Tensor, batch: PagedBatch, scale: float, dtype: torch.dtype, **kw) -> None:  # type: ignore[no-untyped-def]
    expected = expected_attention(batch, scale, **kw)
    assert not out.isnan().any(), "NaN in the output (a poisoned slot leaked, or a row was not written)"
    err = (out.double().cpu() - expected).norm() / expected.norm()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("dtype", "heads", "head_size", "block_size"),
    [
        (torch.float32, (4, 2), 16, 4),  # GQA 2, tiny pages (positions of a tile span pages)
        (torch.bfloat16, (6, 2), 24, 16),  # head size not a power of two, GQA 3
        (torch.float16, (4, 4), 32, 5),  # MHA, a page size that is not a power of two
    ],
)
def test_mixed_prefill_and_decode(dtype, heads, head_size, block_size) -> None:  # type: ignore[no-untyped-def]
    batch = _batch(MIXED, heads, head_size, block_size, dtype, num_padding_tokens=2, seed=1)
    out = _run(batch, head_size**-0.5)
    _check(out, batch, head_size**-0.5, dtype)
    assert out[batch.num_real_tokens :].abs().max() == 0  # padding rows zeroed


@pytest.mark.parametrize("split", [False, True])
def test_decode_gqa_group_of_seven(split: bool) -> None:
    """Qwen2.5-0.5B's grouping (14 query heads on 2 KV heads): 16-row tiles hold 2 tokens x 7 heads."""
    batch = _batch(DECODE, (14, 2), 16, 4, seed=2)
    out = _run(batch, 0.25, split_kv=split, num_segments=4)
    _check(out, batch, 0.25, torch.float32)


@pytest.mark.parametrize(
    ("min_tiles", "merge_tile"),
    [
        (2, None),  # two tiles per segment: most requests fit one segment and skip the merge
        (1, 512),  # one tile per segment: up to 5 segments, merged 2 at a time (a ragged last chunk)
    ],
)
def test_split_kv_merged_in_kernel_or_by_reduce_and_counters_left_zero(
    min_tiles, merge_tile, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Both ways of merging split-KV partials match the reference, for requests that use 1 to 5
    of the 8 segments; the in-kernel merge's counters are zero after every launch, so a second
    launch on the same workspace (as a CUDA graph replays) merges again."""
    from hallm.ops.triton import launch_config

    if merge_tile is not None:
        monkeypatch.setattr(launch_config, "MERGE_TILE_ELEMENTS", merge_tile)
    batch = _batch(DECODE, (14, 2), 16, 4)
    config = launch_config.KernelConfig(block_m=16, tile_n=16)  # 16-position tiles: up to 5 per request
    for merge in (True, False):
        workspace: dict = {}
        for _ in range(2):
            out = _run(
                batch,
                0.25,
                split_kv=True,
                num_segments=8,
                workspace=workspace,
                merge_in_kernel=merge,
                config=config,
                min_segment_tiles=min_tiles,
            )
            _check(out, batch, 0.25, torch.float32)
        counters = [v for k, v in workspace.items() if k[0] == "split_kv_counters"]
        assert len(counters) == (1 if merge else 0)
        assert all(int(c.abs().sum()) == 0 for c in counters)


def test_decode_only_launch_has_one_program_per_request() -> None:
    """A decode-only step (max_query_len 1) maps program i to request i; requests with no new
    token (query length 0) and padding tokens owned by no request are left alone."""
    batch = _batch([(21, 1), (9, 0), (40, 1), (3, 1)], (4, 2), 16, 4, num_padding_tokens=2, seed=7)
    out = _run(batch, 0.25)
    _check(out, batch, 0.25, torch.float32)
    assert out[batch.num_real_tokens :].abs().max() == 0


def test_split_kv_with_window_and_soft_cap() -> None:
    batch = _batch(DECODE, (4, 2), 16, 4, num_padding_tokens=1, seed=3)
    out = _run(batch, 0.25, split_kv=True, num_segments=4, sliding_window=9, logits_soft_cap=3.0)
    _check(out, batch, 0.25, torch.float32, sliding_window=9, logits_soft_cap=3.0)


def test_prefill_sliding_window_and_soft_cap() -> None:
    batch = _batch(MIXED, (4, 2), 16, 4, seed=4)
    out = _run(batch, 0.25, sliding_window=5, logits_soft_cap=2.0)
    _check(out, batch, 0.25, torch.float32, sliding_window=5, logits_soft_cap=2.0)


def _sinks(heads: int, seed: int) -> torch.Tensor:
    """Sink logits from far below the scores to far above them (the output then vanishes)."""
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(seed)) * 2.0
    sinks[0], sinks[-1] = -30.0, 30.0
    return sinks


def test_prefill_with_sinks_and_sliding_window() -> None:
    batch = _batch(MIXED, (4, 2), 16, 4, num_padding_tokens=2, seed=12)
    sinks = _sinks(4, 12)
    for window in (None, 5):
        out = _run(batch, 0.25, sliding_window=window, sinks=sinks)
        _check(out, batch, 0.25, torch.float32, sliding_window=window, sinks=sinks)
        assert out[batch.num_real_tokens :].abs().max() == 0


@pytest.mark.parametrize("merge_in_kernel", [True, False])
def test_split_kv_counts_the_sink_once(merge_in_kernel: bool) -> None:
    """Split-KV partials are merged with the sink in segment 0 only (once per row)."""
    from hallm.ops.triton import launch_config

    batch = _batch(DECODE, (14, 2), 16, 4, seed=13)
    sinks = _sinks(14, 13)
    config = launch_config.KernelConfig(block_m=16, tile_n=16)
    out = _run(
        batch,
        0.25,
        split_kv=True,
        num_segments=8,
        merge_in_kernel=merge_in_kernel,
        config=config,
        min_segment_tiles=1,
        sinks=sinks,
    )
    _check(out, batch, 0.25, torch.float32, sinks=sinks)


def test_sliding_window_never_reads_blocks_outside_every_window() -> None:
    """Blocks wholly before every query's window may be the null block (NaN): never read."""
    batch = _batch([(40, 2), (33, 1)], (4, 2), 16, 4, seed=5)
    tables = batch.layout.block_tables
    tables[0, :8] = 0  # positions 0..31 of request 0: outside the window of positions 40, 41
    tables[1, :6] = 0  # positions 0..23 of request 1 (query at 33)
    batch.layout.tensors.block_tables.copy_(torch.from_numpy(tables))  # type: ignore[union-attr]
    out = _run(batch, 0.25, sliding_window=8)
    _check(out, batch, 0.25, torch.float32, sliding_window=8)


def test_multi_query_attention_wider_than_a_tile() -> None:
    """32 query heads on one KV head: the row tile grows to 32, one token per tile."""
    batch = _batch([(9, 3), (30, 1)], (32, 1), 16, 16, seed=6)
    out = _run(batch, 0.25)
    _check(out, batch, 0.25, torch.float32)


def test_write_kv_matches_reference_and_skips_padding() -> None:
    from hallm.ops.triton import write_kv

    batch = _batch(MIXED, (4, 2), 16, 4, torch.bfloat16, num_padding_tokens=3, seed=7)
    t = batch.layout.tensors
    assert t is not None
    # value as a strided view (like the split of a fused qkv projection)
    fused = torch.cat([batch.key, batch.value], dim=-1)
    value = fused[..., 16:]
    got = batch.kv_cache.clone()
    want = batch.kv_cache.clone()
    write_kv(batch.key, value, got, t.slot_mapping)
    reference.write_kv(batch.key, batch.value, want, t.slot_mapping)
    assert torch.equal(cache_slot_view(got).nan_to_num(7.0), cache_slot_view(want).nan_to_num(7.0))


def test_backend_end_to_end() -> None:
    """TritonPagedAttention through the AttentionBackend contract (metadata once, forward)."""
    from hallm.ops.triton.backend import TritonPagedAttention
    from hallm.platforms import AttentionSpec

    spec = AttentionSpec(num_heads=6, num_kv_heads=2, head_size=16, scale=0.3, dtype="float32", block_size=4)
    assert TritonPagedAttention.validate(spec) == []
    assert TritonPagedAttention.validate(
        AttentionSpec(num_heads=2, num_kv_heads=1, head_size=512, scale=1.0, dtype="float32")
    ) == ["head size 512 > 256"]
    batch = _batch(MIXED, (6, 2), 16, 4, num_padding_tokens=2, seed=8)
    backend = TritonPagedAttention(spec)
    metadata = TritonPagedAttention.build_metadata(batch.layout)
    out = torch.full_like(batch.query, float("nan"))
    backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, metadata, out)
    _check(out, batch, 0.3, torch.float32)


def test_a_mixed_graphs_padded_launch_writes_the_real_rows_alone_and_equal() -> None:
    """The launch a mixed-step CUDA graph bakes in (hallm.ops.torch_graphs.MixedGraphs): every
    request row of the buffers, rows past the step's requests empty (query range [t, t), stale
    lengths and tables), tokens past t owned by no request, and the largest bounds as host
    values. The step's rows equal the exact launch's, bit for bit; no other row is written."""
    from hallm.ops.triton import write_kv

    batch = _batch(MIXED, (4, 2), 16, 4, num_padding_tokens=5, seed=11)
    t = batch.layout.tensors
    assert t is not None
    n, num_real = batch.layout.num_reqs, batch.num_real_tokens
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    exact = _run_launch(batch, t.query_start_loc, t.seq_lens, t.block_tables, batch.layout.max_query_len)
    rows = n + 6
    qsl = torch.full((rows + 1,), num_real, dtype=torch.int32)
    qsl[: n + 1] = t.query_start_loc
    seq_lens = torch.full((rows,), 57, dtype=torch.int32)  # stale: an empty request reads none
    seq_lens[:n] = t.seq_lens
    tables = torch.randint(1, batch.kv_cache.shape[1], (rows, t.block_tables.shape[1]), dtype=torch.int32)
    tables[:n] = t.block_tables
    padded = _run_launch(batch, qsl, seq_lens, tables, batch.query.shape[0])
    assert torch.equal(padded[:num_real], exact[:num_real])
    assert (padded[num_real:] == SENTINEL).all(), "a token of no request was written"


def _run_launch(batch, qsl, seq_lens, tables, max_query_len) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from hallm.ops.triton import paged_attention

    out = torch.full_like(batch.query, SENTINEL)
    return paged_attention(
        batch.query, batch.kv_cache, qsl, seq_lens, tables, max_query_len=max_query_len, scale=0.25, out=out
    )


SENTINEL = 1234.5  # no attention output is this
