"""hallm.ops.triton compiled and run on a real GPU, against the reference (tests/gpu/run_all.sh).

Skipped without a CUDA device (CI). Covers every dtype the CUDA platform declares, the head
shapes of the target models (Qwen2.5-0.5B 14/2x64, Llama-3-8B 32/8x128, MHA, MQA), page sizes
16 and 32, mixed prefill + decode, decode with and without split-KV, long contexts, sliding
window and soft cap; every batch has shuffled block tables and NaN in unused cache slots. The
last test captures the kernels in a CUDA graph and replays it with new lengths and tables.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

from hallm.ops.testing import PagedBatch, expected_attention, make_paged_batch  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
SHAPES = [(14, 2, 64), (32, 8, 128), (8, 8, 128), (16, 1, 64)]
MIXED = [(0, 130), (700, 1), (300, 77), (45, 1), (1000, 5), (0, 1), (511, 1), (16, 16)]
DECODE = [(1023, 1), (17, 1), (400, 1), (2500, 1), (0, 1), (64, 1)]


def declared_dtypes() -> list[str]:
    from hallm_cuda.platform import CudaPlatform

    return list(CudaPlatform().capabilities().dtypes)


def _batch(requests, shape, block_size, dtype, seed, **kw) -> PagedBatch:  # type: ignore[no-untyped-def]
    ctx, qlens = zip(*requests, strict=True)
    heads, kv_heads, head_size = shape
    return make_paged_batch(
        list(qlens),
        list(ctx),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
        seed=seed,
        **kw,
    )


def _run_and_check(batch: PagedBatch, dtype: torch.dtype, **kw) -> float:  # type: ignore[no-untyped-def]
    from hallm.ops.triton import paged_attention, write_kv

    t = batch.layout.tensors
    assert t is not None
    head_size = batch.query.shape[-1]
    scale = head_size**-0.5
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    out = torch.full_like(batch.query, float("nan"))
    paged_attention(
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
    torch.cuda.synchronize()
    return _compare(out, expected_attention(batch, scale), dtype)


def _compare(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    assert not out.isnan().any(), "NaN in the output"
    err = float((out.double().cpu() - expected).norm() / expected.norm())
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    return err


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}-kv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_mixed_batch(dtype_name: str, shape, block_size: int) -> None:  # type: ignore[no-untyped-def]
    if dtype_name not in declared_dtypes():
        pytest.skip(f"{dtype_name} not declared on this GPU")
    dtype = DTYPES[dtype_name]
    batch = _batch(MIXED, shape, block_size, dtype, seed=1, num_padding_tokens=3)
    _run_and_check(batch, dtype)


@pytest.mark.parametrize("split", ["off", "merged-in-kernel", "merged-by-reduce"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}-kv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_decode_batch(dtype_name: str, shape, split: str) -> None:  # type: ignore[no-untyped-def]
    if dtype_name not in declared_dtypes():
        pytest.skip(f"{dtype_name} not declared on this GPU")
    dtype = DTYPES[dtype_name]
    batch = _batch(DECODE, shape, 16, dtype, seed=2)
    workspace: dict = {}
    for _ in range(3):  # the in-kernel merge's counters must be back at zero after each launch
        _run_and_check(
            batch,
            dtype,
            split_kv=split != "off",
            merge_in_kernel=split != "merged-by-reduce",
            workspace=workspace,
        )


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("decode", [False, True])
def test_window_and_soft_cap(dtype_name: str, decode: bool) -> None:
    from hallm.ops.triton import paged_attention, write_kv

    dtype = DTYPES[dtype_name]
    batch = _batch(DECODE if decode else MIXED, (8, 2, 128), 16, dtype, seed=3)
    t = batch.layout.tensors
    assert t is not None
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    out = paged_attention(
        batch.query,
        batch.kv_cache,
        t.query_start_loc,
        t.seq_lens,
        t.block_tables,
        max_query_len=batch.layout.max_query_len,
        scale=0.09,
        sliding_window=100,
        logits_soft_cap=5.0,
    )
    torch.cuda.synchronize()
    _compare(out, expected_attention(batch, 0.09, sliding_window=100, logits_soft_cap=5.0), dtype)


@pytest.mark.parametrize("split", ["off", "merged-in-kernel", "merged-by-reduce"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("decode", [False, True])
def test_sinks(dtype_name: str, decode: bool, split: str) -> None:
    """gpt-oss's attention sinks (64 heads on 8 KV heads, head size 64), with and without its
    128-token sliding window; split-KV must count each sink once."""
    from hallm.ops.triton import paged_attention, write_kv

    if split != "off" and not decode:
        pytest.skip("split-KV is a decode-only path")
    dtype = DTYPES[dtype_name]
    batch = _batch(DECODE if decode else MIXED, (64, 8, 64), 16, dtype, seed=4)
    sinks = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 2.0
    sinks[0], sinks[-1] = -30.0, 30.0
    t = batch.layout.tensors
    assert t is not None
    write_kv(batch.key, batch.value, batch.kv_cache, t.slot_mapping)
    for window in (None, 128):
        out = paged_attention(
            batch.query,
            batch.kv_cache,
            t.query_start_loc,
            t.seq_lens,
            t.block_tables,
            max_query_len=batch.layout.max_query_len,
            scale=0.125,
            sliding_window=window,
            sinks=sinks.cuda(),
            split_kv=None if split == "off" and not decode else split != "off",
            merge_in_kernel=split != "merged-by-reduce",
        )
        torch.cuda.synchronize()
        _compare(out, expected_attention(batch, 0.125, sliding_window=window, sinks=sinks), dtype)


@pytest.mark.parametrize("merge_in_kernel", [False, True])
def test_cuda_graph_replay_with_new_lengths(merge_in_kernel: bool) -> None:
    """Capture write + attention on static buffers, then replay with other lengths and tables
    (split-KV: 4 requests x 2 KV heads; its partials merged by the reduce kernel or in-kernel)."""
    from hallm.ops.triton import paged_attention, write_kv

    dtype = torch.bfloat16
    first = _batch([(100, 1), (5, 1), (900, 1), (33, 1)], (14, 2, 64), 16, dtype, seed=4, spare_blocks=200)
    t = first.layout.tensors
    assert t is not None
    q, k, v, cache = first.query.clone(), first.key.clone(), first.value.clone(), first.kv_cache
    qsl, seq_lens, slots = t.query_start_loc.clone(), t.seq_lens.clone(), t.slot_mapping.clone()
    tables = torch.zeros((4, 128), dtype=torch.int32, device="cuda")
    tables[:, : t.block_tables.shape[1]] = t.block_tables
    out = torch.empty_like(q)
    workspace: dict = {}

    def step() -> None:
        write_kv(k, v, cache, slots)
        paged_attention(
            q,
            cache,
            qsl,
            seq_lens,
            tables,
            max_query_len=1,
            scale=0.125,
            out=out,
            workspace=workspace,
            merge_in_kernel=merge_in_kernel,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seed, reqs in [
        (5, [(700, 1), (1, 1), (64, 1), (1500, 1)]),
        (6, [(3, 1), (2000, 1), (15, 1), (16, 1)]),
    ]:
        nxt = _batch(reqs, (14, 2, 64), 16, dtype, seed=seed, spare_blocks=10)
        assert nxt.kv_cache.shape[1] <= cache.shape[1]
        nt = nxt.layout.tensors
        assert nt is not None
        cache[:, : nxt.kv_cache.shape[1]].copy_(nxt.kv_cache)
        q.copy_(nxt.query)
        k.copy_(nxt.key)
        v.copy_(nxt.value)
        qsl.copy_(nt.query_start_loc)
        seq_lens.copy_(nt.seq_lens)
        slots.copy_(nt.slot_mapping)
        tables.zero_()
        tables[:, : nt.block_tables.shape[1]] = nt.block_tables
        graph.replay()
        torch.cuda.synchronize()
        _compare(out, expected_attention(nxt, 0.125), dtype)
