"""Paged attention as a Pallas kernel, with the same signature as `paged_attention_jax`.

Grid `(token, kv_head, block)`: program (t, h, j) reads block j of token t's request (the
block table, the tokens' request rows and positions, the layer and the window are prefetched
scalars, so the K/V BlockSpecs fetch exactly that cache block) and folds it into an online
softmax held in scratch; the last block of the row writes the output. Blocks a token does not
see (past its position, or wholly before its sliding window) skip the arithmetic. The query
block is the G query heads that share KV head h (GQA).

Where there is no TPU the kernel runs in Pallas' interpret mode (`interpret=True`: the same
kernel lowered to plain XLA loops), which is how it is tested here; it has not run on a TPU.
"""

from __future__ import annotations

import functools
from typing import Any

_MASKED = -1e30


def _kernel(
    token_req_ref: Any,
    positions_ref: Any,
    tables_ref: Any,
    scalars_ref: Any,
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    o_ref: Any,
    m_ref: Any,
    l_ref: Any,
    acc_ref: Any,
    *,
    scale: float,
    block_size: int,
    num_table_blocks: int,
) -> None:
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    t, j = pl.program_id(0), pl.program_id(2)
    position, window = positions_ref[t], scalars_ref[1]
    start = j * block_size

    @pl.when(j == 0)
    def _init() -> None:
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((start <= position) & (start + block_size > position - window))
    def _fold() -> None:
        key_pos = start + jnp.arange(block_size)[None, :]  # [1, BS]
        visible = (key_pos <= position) & (key_pos > position - window)
        q = q_ref[...].astype(jnp.float32) * scale  # [G, D]
        # Unused slots may hold anything (NaN too): zero what no query attends.
        k = jnp.where(visible.T, k_ref[...].astype(jnp.float32), 0.0)  # [BS, D]
        v = jnp.where(visible.T, v_ref[...].astype(jnp.float32), 0.0)
        s = jnp.where(visible, jnp.dot(q, k.T), _MASKED)  # [G, BS]
        m_old = m_ref[...]  # [G, 1]
        m_new = jnp.maximum(m_old, s.max(axis=-1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_old - m_new)
        l_ref[...] = l_ref[...] * alpha + probs.sum(axis=-1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(probs, v)
        m_ref[...] = m_new

    @pl.when(j == num_table_blocks - 1)
    def _store() -> None:
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)


def paged_attention_pallas(
    query: Any,
    cache: Any,
    layer: Any,
    block_tables: Any,
    token_req: Any,
    positions: Any,
    num_chunks: Any,
    scale: float,
    window: Any,
    *,
    interpret: bool | None = None,
) -> Any:
    """See `hallm_tpu.attention.paged_attention_jax` for the arguments. `num_chunks` is unused:
    the grid covers the whole block table and skips invisible blocks. `interpret`: None runs the
    compiled kernel on a TPU and the interpreter elsewhere."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    del num_chunks
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    num_tokens, num_heads, head_size = query.shape
    block_size, num_kv_heads = cache.shape[3], cache.shape[4]
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    q = query.reshape(num_tokens, num_kv_heads, group, head_size)
    scalars = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])

    def kv_map(which: int) -> Any:
        def index(t: Any, h: Any, j: Any, token_req: Any, positions: Any, tables: Any, scalars: Any) -> Any:
            return (scalars[0], which, tables[token_req[t] * width + j], 0, h, 0)

        return index

    def q_map(t: Any, h: Any, j: Any, *prefetched: Any) -> Any:
        return (t, h, 0, 0)

    squeezed = None
    kv_block = (squeezed, squeezed, squeezed, block_size, squeezed, head_size)
    q_block = (squeezed, squeezed, group, head_size)
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_size=block_size, num_table_blocks=width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_tokens, num_kv_heads, width),
            in_specs=[
                pl.BlockSpec(q_block, q_map),
                pl.BlockSpec(kv_block, kv_map(0)),
                pl.BlockSpec(kv_block, kv_map(1)),
            ],
            out_specs=pl.BlockSpec(q_block, q_map),
            scratch_shapes=[
                pltpu.VMEM((group, 1), jnp.float32),
                pltpu.VMEM((group, 1), jnp.float32),
                pltpu.VMEM((group, head_size), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, query.dtype),
        interpret=interpret,
    )(token_req, positions, block_tables.reshape(-1), scalars, q, cache, cache)
    return out.reshape(num_tokens, num_heads, head_size)
