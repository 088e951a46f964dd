"""Shared by the KV-cache tests: requests for the manager, and the pool's invariants."""

from __future__ import annotations

from hallm.core.kv_cache.block_pool import BlockPool, KVBlock
from hallm.core.request import Request
from hallm.core.sampling_params import SamplingParams

MAX_MODEL_LEN = 1024


def make_request(
    rid: str,
    tokens: list[int],
    max_tokens: int = 4,
    extra_keys: bytes = b"",
    prompt_logprobs: int | None = None,
) -> Request:
    params = SamplingParams(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
    return Request(rid, tokens, params, frozenset(), MAX_MODEL_LEN, extra_keys=extra_keys)


def check_pool(pool: BlockPool, holders: list[list[KVBlock]]) -> None:
    """Ref counts match the holders exactly; the free queue is exactly the unreferenced blocks."""
    refs = [0] * pool.num_blocks
    refs[BlockPool.NULL_BLOCK_ID] = 1
    for blocks in holders:
        for b in blocks:
            refs[b.block_id] += 1
    assert [b.ref_cnt for b in pool.blocks] == refs
    assert min(refs) >= 0
    assert set(pool._free) == {i for i, r in enumerate(refs) if r == 0}
    for h, b in pool._cached.items():
        assert b.block_hash == h
