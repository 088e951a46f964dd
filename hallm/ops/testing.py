"""Random paged batches for checking an attention kernel against `hallm.ops.reference`.

`make_paged_batch` builds one step the way the engine would, made hostile on purpose: block ids
are a random permutation (block 0, the null block, is never assigned), every cache slot that
holds no token is NaN, block-table entries past a request's last block point at the null block,
and optional padding tokens carry slot -1. `expected_attention` gives the answer from
`dense_causal_attention` over each request's unpaged keys/values, in float64.

Used by the core tests, the conformance kit and plugins' own tests; part of the public plugin API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from hallm.ops.reference import dense_causal_attention
from hallm.platforms.attention import BatchLayout, LayoutTensors


@dataclasses.dataclass
class PagedBatch:
    """One random step: inputs of `AttentionBackend.forward` plus what the answer depends on.

    query: [num_tokens, num_heads, head_size]; key, value: [num_tokens, num_kv_heads, head_size],
    this step's new keys/values (padding tokens at the end, their slot -1).
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size] holding every request's
    context keys/values already; every other slot holds `poison`.
    seq_keys / seq_values: per request, [seq_len, num_kv_heads, head_size], context then new
    tokens, in position order, in the batch's dtype.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    layout: BatchLayout
    seq_keys: list[torch.Tensor]
    seq_values: list[torch.Tensor]

    @property
    def num_real_tokens(self) -> int:
        """Tokens owned by requests (the rest are padding)."""
        return int(self.layout.query_start_loc[-1])


def make_paged_batch(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_padding_tokens: int = 0,
    spare_blocks: int = 2,
    poison: float = float("nan"),
    with_tensors: bool = True,
) -> PagedBatch:
    """Build a random step of len(query_lens) requests.

    Request i has `context_lens[i]` tokens already cached and `query_lens[i]` new ones (so
    context 0 is a fresh prefill, query 1 a decode, both > 0 a chunked prefill). The cache gets
    `spare_blocks` unassigned blocks beyond the null block and the requests' blocks. With
    `with_tensors`, `layout.tensors` holds device copies of the layout's host arrays.
    """
    if len(query_lens) != len(context_lens) or not query_lens:
        raise ValueError("need one context length per query length, and at least one request")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_reqs = len(query_lens)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_req) + spare_blocks
    # Block ids 1.. in random order; 0 is the null block and stays unassigned (and poisoned).
    free_ids = iter((rng.permutation(num_blocks - 1) + 1).tolist())
    # One spare column: entries past a request's last block point at the null block.
    block_tables = np.zeros((num_reqs, max(blocks_per_req) + 1), dtype=np.int32)
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = [next(free_ids) for _ in range(n)]

    def slots_of(i: int, positions: range) -> list[int]:
        return [int(block_tables[i, p // block_size]) * block_size + p % block_size for p in positions]

    def randn(*shape: int) -> torch.Tensor:
        # Drawn in float32 then cast, so the expected answer sees exactly the kernel's inputs.
        return torch.randn(*shape, generator=gen).to(dtype)

    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), poison, dtype=dtype)
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)
    seq_keys = [randn(s, num_kv_heads, head_size) for s in seq_lens]
    seq_values = [randn(s, num_kv_heads, head_size) for s in seq_lens]
    new_keys, new_values, slot_mapping = [], [], []
    for i in range(num_reqs):
        ctx = context_lens[i]
        # The context is written by plain indexing, independent of the kernel under test.
        cached = torch.tensor(slots_of(i, range(ctx)), dtype=torch.long)
        flat[0, cached] = seq_keys[i][:ctx]
        flat[1, cached] = seq_values[i][:ctx]
        new_keys.append(seq_keys[i][ctx:])
        new_values.append(seq_values[i][ctx:])
        slot_mapping += slots_of(i, range(ctx, seq_lens[i]))
    new_keys.append(randn(num_padding_tokens, num_kv_heads, head_size))
    new_values.append(randn(num_padding_tokens, num_kv_heads, head_size))
    slot_mapping += [-1] * num_padding_tokens

    num_tokens = sum(query_lens) + num_padding_tokens
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    query_start_loc[1:] = np.cumsum(query_lens)
    layout = BatchLayout(
        num_reqs=num_reqs,
        num_tokens=num_tokens,
        num_prefill_reqs=sum(1 for q in query_lens if q > 1),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc=query_start_loc,
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        context_lens=np.asarray(context_lens, dtype=np.int32),
        block_tables=block_tables,
        slot_mapping=np.asarray(slot_mapping, dtype=np.int64),
        block_size=block_size,
    )
    if with_tensors:
        layout.tensors = layout_tensors(layout, device)
    return PagedBatch(
        query=randn(num_tokens, num_heads, head_size).to(device),
        key=torch.cat(new_keys).to(device),
        value=torch.cat(new_values).to(device),
        kv_cache=kv_cache.to(device),
        layout=layout,
        seq_keys=seq_keys,
        seq_values=seq_values,
    )


def layout_tensors(layout: BatchLayout, device: torch.device | str = "cpu") -> LayoutTensors:
    """Copies of a layout's host arrays on `device`, with the dtypes `LayoutTensors` documents."""
    return LayoutTensors(
        query_start_loc=torch.from_numpy(layout.query_start_loc).to(device, torch.int32),
        seq_lens=torch.from_numpy(layout.seq_lens).to(device, torch.int32),
        context_lens=torch.from_numpy(layout.context_lens).to(device, torch.int32),
        block_tables=torch.from_numpy(layout.block_tables).to(device, torch.int32),
        slot_mapping=torch.from_numpy(layout.slot_mapping).to(device, torch.int64),
    )


def expected_attention(
    batch: PagedBatch,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The right answer for `batch`: [num_tokens, num_heads, head_size] float64 on the host.

    Each request attends over its unpaged keys/values with `dense_causal_attention`; padding
    tokens' rows are zero.
    """
    query = batch.query.cpu()
    expected = torch.zeros(query.shape, dtype=torch.float64)
    qsl = batch.layout.query_start_loc
    for i in range(batch.layout.num_reqs):
        lo, hi = int(qsl[i]), int(qsl[i + 1])
        if hi > lo:
            expected[lo:hi] = dense_causal_attention(
                query[lo:hi],
                batch.seq_keys[i],
                batch.seq_values[i],
                scale,
                sliding_window=sliding_window,
                logits_soft_cap=logits_soft_cap,
                sinks=None if sinks is None else sinks.cpu(),
            )
    return expected


def cache_slot_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """[2, num_slots, num_kv_heads, head_size] view of a default-layout cache, by flat slot."""
    return kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
