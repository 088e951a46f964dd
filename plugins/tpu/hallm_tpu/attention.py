"""Paged attention in JAX over a stacked KV cache, for mixed prefill + decode steps.

Cache layout (one array for the whole model, so a `lax.scan` over layers carries it):
`[num_layers, 2 (key, value), num_blocks, block_size, num_kv_heads, head_size]`. A token's slot is
`block_id * block_size + offset`, exactly the core's slot mapping; a slot of `num_blocks *
block_size` or more marks a padding token, whose write is dropped.

`paged_attention_jax` is the pure-JAX implementation: every token reads its request's blocks
through the block table, a chunk of blocks at a time, with an online softmax, for as many chunks
as the longest sequence of the step needs (a traced loop bound: no recompilation per length).
`hallm_tpu.pallas_attention` holds the Pallas kernel (`--attention-backend pallas_paged`), tested
against the same oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Blocks read per iteration of the key loop.
CHUNK_BLOCKS = 8
#: A window "wider than any sequence": layers without a sliding window use it.
NO_WINDOW = 1 << 30
# A finite stand-in for -inf: a chunk whose keys are all masked keeps exp(m_old - m_new) finite.
_MASKED = -1e30


def write_kv(cache: Any, layer: Any, key: Any, value: Any, slots: Any) -> Any:
    """Write this step's keys/values of `layer` at `slots`; padding slots are dropped.

    cache [L, 2, NB, BS, Hkv, D]; key, value [T, Hkv, D]; slots int32 [T]. Returns the new cache
    (in place under buffer donation).
    """
    import jax.numpy as jnp
    from jax import lax

    block_size = cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    # Scatter the bit patterns: a float scatter may rewrite the other slots of the blocks it
    # touches (XLA's CPU backend widens bfloat16, turning NaN payloads canonical), and the
    # cache must hold exact copies.
    bits = jnp.uint16 if cache.dtype.itemsize == 2 else jnp.uint32
    raw = lax.bitcast_convert_type(cache, bits)
    raw = raw.at[layer, 0, blocks, offsets].set(
        lax.bitcast_convert_type(key.astype(cache.dtype), bits), mode="drop"
    )
    raw = raw.at[layer, 1, blocks, offsets].set(
        lax.bitcast_convert_type(value.astype(cache.dtype), bits), mode="drop"
    )
    return lax.bitcast_convert_type(raw, cache.dtype)


def padded_table_width(max_blocks_per_req: int) -> int:
    """Block-table columns the kernels read: a whole number of key chunks."""
    return -(-max_blocks_per_req // CHUNK_BLOCKS) * CHUNK_BLOCKS


def paged_attention_jax(
    query: Any,
    cache: Any,
    layer: Any,
    block_tables: Any,
    token_req: Any,
    positions: Any,
    num_chunks: Any,
    scale: float,
    window: Any,
) -> Any:
    """Causal attention of each token over its request's cached keys (this step's included).

    query [T, Hq, D]; cache as `write_kv`'s, already holding this step's keys/values;
    block_tables int32 [R, W] (W a multiple of CHUNK_BLOCKS; rows past a request's blocks may
    hold any block id); token_req int32 [T], the request row of each token; positions int32 [T];
    num_chunks int32 scalar, chunks of CHUNK_BLOCKS blocks to read (covering the longest
    sequence); window int32 scalar, position p attends to (p - window, p]. Returns [T, Hq, D]
    in query's dtype; scores and softmax in float32.
    """
    import jax
    import jax.numpy as jnp

    num_tokens, num_heads, head_size = query.shape
    block_size, num_kv_heads = cache.shape[3], cache.shape[4]
    group = num_heads // num_kv_heads
    span = CHUNK_BLOCKS * block_size
    q = (query.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_size)
    tables = block_tables[token_req]  # [T, W]: each token's block-table row

    def chunk(j: Any, carry: Any) -> Any:
        m, denom, acc = carry  # m, denom [T, Hkv, G]; acc [T, Hkv, G, D]
        blocks = jax.lax.dynamic_slice_in_dim(tables, j * CHUNK_BLOCKS, CHUNK_BLOCKS, axis=1)  # [T, C]
        key_pos = j * span + jnp.arange(span)  # [S]
        p = positions[:, None]
        visible = (key_pos[None, :] <= p) & (key_pos[None, :] > p - window)  # [T, S]
        # Unused slots may hold anything (NaN too): zero what no query attends before any math.
        keep = visible[:, :, None, None]
        k = cache[layer, 0, blocks].reshape(num_tokens, span, num_kv_heads, head_size)
        v = cache[layer, 1, blocks].reshape(num_tokens, span, num_kv_heads, head_size)
        k = jnp.where(keep, k.astype(jnp.float32), 0.0)
        v = jnp.where(keep, v.astype(jnp.float32), 0.0)
        s = jnp.einsum("tkgd,tskd->tkgs", q, k)
        mask = visible[:, None, None, :]
        s = jnp.where(mask, s, _MASKED)
        m_new = jnp.maximum(m, s.max(axis=-1))
        probs = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        denom = denom * alpha + probs.sum(axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("tkgs,tskd->tkgd", probs, v)
        return m_new, denom, acc

    init = (
        jnp.full((num_tokens, num_kv_heads, group), _MASKED, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_size), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_chunks, chunk, init)
    # Padding tokens (position 0 of row 0) still see one key, so denom > 0 everywhere.
    out = acc / denom[..., None]
    return out.reshape(num_tokens, num_heads, head_size).astype(query.dtype)


def _pallas(*args: Any) -> Any:
    from hallm_tpu.pallas_attention import paged_attention_pallas

    return paged_attention_pallas(*args)


#: `--attention-backend` names of the tpu device -> implementation (same signature).
ATTENTION_IMPLS: dict[str, Callable[..., Any]] = {
    "jax_paged": paged_attention_jax,
    "pallas_paged": _pallas,
}
#: The implementation used when the user names none.
DEFAULT_ATTENTION = "jax_paged"
