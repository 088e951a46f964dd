"""The kernels behind the core's torch AttentionBackend contract (`hallm_tpu.backends`): from a
BatchLayout with padding tokens (slot -1), the cache and output tensors are written in place as
the core's oracle writes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hallm_tpu.backends import JaxPagedAttention, PallasPagedAttention

from hallm.ops import reference
from hallm.platforms import AttentionSpec, BatchLayout

BLOCK, HEADS, KV_HEADS, DIM, NUM_BLOCKS = 4, 4, 2, 8, 16
QUERY_LENS, CONTEXT_LENS = [3, 1], [2, 9]


@pytest.mark.parametrize("backend_cls", [JaxPagedAttention, PallasPagedAttention])
def test_backend_matches_reference(backend_cls: type) -> None:
    torch.manual_seed(0)
    num_reqs, real = len(QUERY_LENS), sum(QUERY_LENS)
    num_tokens = real + 2  # two padding tokens
    seq_lens = np.add(CONTEXT_LENS, QUERY_LENS).astype(np.int32)
    tables = np.array([[5, 11, 0], [2, 14, 7]], np.int32)
    qsl = np.array([0, 3, 4], np.int32)
    positions = np.arange(real) - np.repeat(qsl[:-1] - CONTEXT_LENS, QUERY_LENS)
    req = np.repeat(np.arange(num_reqs), QUERY_LENS)
    slots = np.full(num_tokens, -1, np.int64)
    slots[:real] = tables[req, positions // BLOCK] * BLOCK + positions % BLOCK
    layout = BatchLayout(
        num_reqs=num_reqs,
        num_tokens=num_tokens,
        num_prefill_reqs=1,
        max_query_len=3,
        max_seq_len=int(seq_lens.max()),
        query_start_loc=qsl,
        seq_lens=seq_lens,
        context_lens=np.array(CONTEXT_LENS, np.int32),
        block_tables=tables,
        slot_mapping=slots,
        block_size=BLOCK,
    )
    spec = AttentionSpec(HEADS, KV_HEADS, DIM, scale=0.3, dtype="float32", block_size=BLOCK, sliding_window=5)
    assert backend_cls.validate(spec) == []
    cache = torch.randn(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    expected_cache = cache.clone()
    q = torch.randn(num_tokens, HEADS, DIM)
    k, v = torch.randn(num_tokens, KV_HEADS, DIM), torch.randn(num_tokens, KV_HEADS, DIM)
    out = torch.full_like(q, float("nan"))

    backend = backend_cls(spec)
    backend.forward(q, k, v, cache, backend_cls.build_metadata(layout), out)

    reference.write_kv(k, v, expected_cache, torch.from_numpy(slots))
    expected = reference.paged_attention(
        q,
        expected_cache,
        torch.from_numpy(qsl),
        torch.from_numpy(seq_lens),
        torch.tensor(CONTEXT_LENS, dtype=torch.int32),
        torch.from_numpy(tables),
        0.3,
        KV_HEADS,
        sliding_window=5,
    )
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
