"""The tpu device's attention kernels behind the core's AttentionBackend contract.

The JAX worker calls its kernels (`hallm_tpu.attention.ATTENTION_IMPLS`) directly on device
arrays. These classes put the same kernels behind the contract the core and the conformance kit
speak, torch tensors in and out, so `hallm plugins` lists what the device runs, `--attention-backend`
names it, and the kit's attention cases test the kernels: each call imports the torch tensors
through DLPack, writes the step's keys/values and attends in one jit-compiled JAX call, and
copies the new cache and the output back into the caller's tensors. That round trip makes a
call slow; the worker never takes it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import numpy as np

from hallm.platforms import FEATURE_SLIDING_WINDOW, AttentionBackend, BatchLayout
from hallm_tpu.attention import ATTENTION_IMPLS, CHUNK_BLOCKS, NO_WINDOW, padded_table_width, write_kv


@dataclasses.dataclass(frozen=True)
class JaxAttentionMetadata:
    """One step in the kernels' terms (host arrays): token_req, positions int32 [T] (padding
    tokens: request row 0, position 0); block_tables int32 [R, W], W a whole number of key chunks;
    slots int64 [T] (< 0: padding); num_chunks, the key chunks the longest sequence needs;
    num_real_tokens, the tokens before the padding."""

    token_req: np.ndarray
    positions: np.ndarray
    block_tables: np.ndarray
    slots: np.ndarray
    num_chunks: int
    num_real_tokens: int


class JaxPagedAttention(AttentionBackend):
    """`jax_paged`: the pure-JAX paged attention (the worker's default). Subclasses name
    another kernel of `ATTENTION_IMPLS`."""

    name: ClassVar[str] = "jax_paged"
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "bfloat16"})
    features: ClassVar[frozenset[str]] = frozenset({FEATURE_SLIDING_WINDOW})

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> JaxAttentionMetadata:
        qsl = np.asarray(layout.query_start_loc)
        query_lens = np.diff(qsl)
        real = int(qsl[-1])
        token_req = np.zeros(layout.num_tokens, np.int32)
        token_req[:real] = np.repeat(np.arange(layout.num_reqs, dtype=np.int32), query_lens)
        positions = np.zeros(layout.num_tokens, np.int32)
        positions[:real] = np.arange(real) - np.repeat(qsl[:-1] - layout.context_lens, query_lens)
        tables = np.asarray(layout.block_tables)
        padded = np.zeros((layout.num_reqs, padded_table_width(max(1, tables.shape[1]))), np.int32)
        padded[:, : tables.shape[1]] = tables
        longest = int(np.max(layout.seq_lens)) if layout.num_reqs else 0
        return JaxAttentionMetadata(
            token_req=token_req,
            positions=positions,
            block_tables=padded,
            slots=np.asarray(layout.slot_mapping, dtype=np.int64),
            num_chunks=-(-longest // (CHUNK_BLOCKS * layout.block_size)),
            num_real_tokens=real,
        )

    def forward(self, query: Any, key: Any, value: Any, kv_cache: Any, metadata: Any, out: Any) -> Any:
        """query, out [T, Hq, D]; key, value [T, Hkv, D]; kv_cache [2, NB, BS, Hkv, D] (torch)."""
        import jax.numpy as jnp
        import torch

        m: JaxAttentionMetadata = metadata
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        slots = np.where(m.slots < 0, num_slots, m.slots).astype(np.int32)  # padding: dropped
        window = self.spec.sliding_window or NO_WINDOW
        new_cache, result = _write_and_attend(self.name, float(self.spec.scale))(
            jnp.from_dlpack(query.contiguous()),
            jnp.from_dlpack(key.contiguous()),
            jnp.from_dlpack(value.contiguous()),
            jnp.from_dlpack(kv_cache.contiguous())[None],
            slots,
            m.block_tables,
            m.token_req,
            m.positions,
            np.int32(m.num_chunks),
            np.int32(window),
        )
        kv_cache.copy_(torch.from_dlpack(new_cache)[0])
        out[: m.num_real_tokens].copy_(torch.from_dlpack(result)[: m.num_real_tokens])
        out[m.num_real_tokens :].zero_()
        return out


@functools.cache
def _write_and_attend(impl: str, scale: float) -> Any:
    import jax

    attend = ATTENTION_IMPLS[impl]

    def run(
        q: Any,
        k: Any,
        v: Any,
        cache: Any,
        slots: Any,
        tables: Any,
        token_req: Any,
        positions: Any,
        num_chunks: Any,
        window: Any,
    ) -> Any:
        cache = write_kv(cache, 0, k, v, slots)
        return cache, attend(q, cache, 0, tables, token_req, positions, num_chunks, scale, window)

    return jax.jit(run)


class PallasPagedAttention(JaxPagedAttention):
    """`pallas_paged`: the Pallas kernel (interpret mode where there is no TPU)."""

    name: ClassVar[str] = "pallas_paged"
