"""The tpu device's paged attention implementations (pure JAX; the Pallas kernel in interpret
mode) and its KV write against the core's oracle (hallm.ops.reference), on a
mixed prefill + decode step with shuffled block tables, GQA, several key chunks, a sliding
window, padding tokens, and NaN-poisoned unused cache slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hallm_tpu.attention import (
    ATTENTION_IMPLS,
    CHUNK_BLOCKS,
    NO_WINDOW,
    padded_table_width,
    write_kv,
)

from hallm.ops import reference

BLOCK, HEADS, KV_HEADS, DIM, NUM_BLOCKS = 4, 4, 2, 16, 40
QUERY_LENS = [5, 1, 3, 1]
CONTEXT_LENS = [7, 40, 0, 2]  # 41 tokens: two chunks of CHUNK_BLOCKS * BLOCK = 32 keys


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("impl", sorted(ATTENTION_IMPLS))
def test_matches_reference(impl: str, window: int | None) -> None:
    rng = np.random.default_rng(0)
    num_reqs, num_tokens = len(QUERY_LENS), sum(QUERY_LENS)
    padded = num_tokens + 3  # padding tokens: slot past the cache, request row 0, position 0
    seq_lens = np.add(CONTEXT_LENS, QUERY_LENS)
    width = padded_table_width(-(-int(seq_lens.max()) // BLOCK))
    # Shuffled, disjoint block tables; block 0 is left to padding rows.
    perm = rng.permutation(np.arange(1, NUM_BLOCKS))
    tables = np.zeros((num_reqs, width), np.int32)
    start = 0
    for i, n in enumerate(-(-seq_lens // BLOCK)):
        tables[i, :n] = perm[start : start + n]
        start += n
    qsl = np.concatenate([[0], np.cumsum(QUERY_LENS)]).astype(np.int32)
    token_req = np.repeat(np.arange(num_reqs), QUERY_LENS).astype(np.int32)
    positions = (np.arange(num_tokens) - np.repeat(qsl[:-1] - CONTEXT_LENS, QUERY_LENS)).astype(np.int32)
    slots = tables[token_req, positions // BLOCK] * BLOCK + positions % BLOCK

    cache = torch.full((2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM), float("nan"))
    for i in range(num_reqs):  # the cached context of each request
        for p in range(CONTEXT_LENS[i]):
            cache[:, tables[i, p // BLOCK], p % BLOCK] = torch.randn(2, KV_HEADS, DIM)
    q = torch.randn(num_tokens, HEADS, DIM)
    k, v = torch.randn(num_tokens, KV_HEADS, DIM), torch.randn(num_tokens, KV_HEADS, DIM)

    def pad(a: np.ndarray, value: int) -> np.ndarray:
        return np.concatenate([a, np.full(padded - num_tokens, value, a.dtype)])

    jcache = jnp.asarray(cache.numpy())[None]  # one layer
    jcache = write_kv(
        jcache,
        0,
        jnp.asarray(pad_rows(k.numpy(), padded)),
        jnp.asarray(pad_rows(v.numpy(), padded)),
        jnp.asarray(pad(slots.astype(np.int32), NUM_BLOCKS * BLOCK)),
    )
    num_chunks = -(-int(seq_lens.max()) // (CHUNK_BLOCKS * BLOCK))
    assert num_chunks == 2
    out = jax.jit(ATTENTION_IMPLS[impl], static_argnums=(7,))(
        jnp.asarray(pad_rows(q.numpy(), padded)),
        jcache,
        0,
        jnp.asarray(tables),
        jnp.asarray(pad(token_req, 0)),
        jnp.asarray(pad(positions, 0)),
        num_chunks,
        DIM**-0.5,
        window or NO_WINDOW,
    )

    reference.write_kv(k, v, cache, torch.from_numpy(slots))
    assert np.array_equal(np.asarray(jcache[0]), cache.numpy(), equal_nan=True)  # the write
    expected = reference.paged_attention(
        q,
        cache,
        torch.from_numpy(qsl),
        torch.from_numpy(seq_lens.astype(np.int32)),
        torch.tensor(CONTEXT_LENS, dtype=torch.int32),
        torch.from_numpy(tables),
        DIM**-0.5,
        KV_HEADS,
        sliding_window=window,
    )
    got = np.asarray(out)[:num_tokens]
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-5, rtol=1e-5)


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])
