"""The KV block pool and prefix-cache bookkeeping: hashing, ref counts, eviction order."""

from __future__ import annotations

import pytest

from hallm.core.kv_cache.block_pool import BlockPool
from hallm.core.kv_cache.hashing import extend_block_hashes, hash_block
from hallm.core.kv_cache.manager import KVCacheManager
from tests.core.kv_helpers import make_request


def test_hash_chains_on_parent_tokens_and_extra_keys() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert len(a) == 16  # 128 bits
    assert hash_block(None, [1, 2, 3, 4]) == a
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], extra_keys=b"lora:1") != a
    assert hash_block(None, [1, 2, 3, 5]) != a
    hashes: list[bytes] = []
    extend_block_hashes(hashes, list(range(10)), block_size=4)
    assert len(hashes) == 2 and hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    extend_block_hashes(hashes, list(range(12)), block_size=4)
    assert len(hashes) == 3 and hashes[2] == hash_block(hashes[1], [8, 9, 10, 11])


def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.allocate(4)
    assert BlockPool.NULL_BLOCK_ID not in [b.block_id for b in blocks]
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_ref_counts_never_negative_and_shared_block_not_reused() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.cache_block(block, b"h" * 16)
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    # While referenced it is not in the free queue, so no allocation can take it.
    taken = pool.allocate(2)
    assert block not in taken
    pool.free([block])
    assert block.ref_cnt == 0
    with pytest.raises(RuntimeError):
        pool.free([block])
    assert block.ref_cnt == 0


def test_eviction_is_least_recently_freed_first_and_drops_the_hash() -> None:
    pool = BlockPool(4, enable_caching=True)
    a, b, c = pool.allocate(3)
    for i, blk in enumerate((a, b, c)):
        pool.cache_block(blk, bytes([i]) * 16)
    pool.free([b])
    pool.free([a])
    pool.free([c])
    (first,) = pool.allocate(1)
    assert first is b
    assert pool.lookup(bytes([1]) * 16) is None  # evicted
    assert pool.lookup(bytes([0]) * 16) is a  # still cached, still free
    pool.touch([a])  # a hit takes it out of the free queue
    assert [x.block_id for x in pool.allocate(1)] == [c.block_id]


def test_manager_prefix_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    r1 = make_request("a", list(range(8)))
    assert kv.allocate_slots(r1, 8) is not None
    r1.num_computed_tokens = 8
    # Same 8 tokens: both blocks are cached, but the last token must be recomputed.
    r2 = make_request("b", list(range(8)))
    blocks, n = kv.get_computed_blocks(r2)
    assert n == 4 and len(blocks) == 1
    r3 = make_request("c", list(range(9)))
    blocks, n = kv.get_computed_blocks(r3)
    assert n == 8
    assert kv.allocate_slots(r3, 1, blocks) is not None
    assert [b.ref_cnt for b in blocks] == [2, 2]
    kv.free(r1)
    kv.free(r3)
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks[1:])
    assert kv.num_free_blocks == 15


def test_manager_refuses_when_full_and_takes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_caching=False)
    r1 = make_request("a", list(range(8)))
    assert kv.allocate_slots(r1, 8) is not None
    r2 = make_request("b", [1])
    free_before = kv.num_free_blocks
    assert kv.allocate_slots(r2, 1) is None
    assert kv.num_free_blocks == free_before
