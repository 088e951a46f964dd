"""Prefix caching: the block pool under random operation sequences, the manager's admission and
statistics, and the engine flag. The scheduler against a fake worker is in
test_prefix_caching_scheduler.py."""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict

import pytest

from hallm.core.kv_cache.block_pool import BlockPool, KVBlock
from hallm.core.kv_cache.hashing import hash_block
from hallm.core.kv_cache.manager import KVCacheManager
from tests.core.kv_helpers import check_pool, make_request

# ---- the block pool -------------------------------------------------------------------------


def test_hash_chain_covers_the_whole_prefix() -> None:
    # Same tokens in a block, different parents: different hashes, so only whole prefixes match.
    h0 = hash_block(None, [1, 2])
    h0b = hash_block(None, [9, 2])
    assert hash_block(h0, [3, 4]) != hash_block(h0b, [3, 4])
    # Extra keys are length-prefixed: moving bytes between tokens and keys cannot collide.
    assert hash_block(None, [1], b"\x02") != hash_block(None, [1, 2])
    # The same in every process (a fixed function, not Python's salted hash): pinned digests.
    assert hash_block(None, [1, 2, 3, 4]).hex() == "3afb68a48edc578a5fa1582d43cc1351"
    assert hash_block(None, [1, 2, 3, 4], b"k").hex() == "fab1301d6377039bdc2a7b8c4264efeb"
    assert len(hash_block(None, [0], b"k")) == 16


def test_extra_keys_flow_from_the_request_into_the_hashes() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_caching=True)
    tokens = list(range(10, 30))
    a = make_request("a", tokens, extra_keys=b"adapter-1")
    assert kv.allocate_slots(a, len(tokens)) is not None
    assert a.block_hashes[0] == hash_block(None, tokens[:4], b"adapter-1")
    same = make_request("same", tokens, extra_keys=b"adapter-1")
    other = make_request("other", tokens, extra_keys=b"adapter-2")
    plain = make_request("plain", tokens)
    assert kv.get_computed_blocks(same)[1] == 16
    assert kv.get_computed_blocks(other) == ([], 0)
    assert kv.get_computed_blocks(plain) == ([], 0)


def test_freed_blocks_without_a_findable_prefix_are_taken_first() -> None:
    pool = BlockPool(6, enable_caching=True)
    a, b, c, d = pool.allocate(4)
    pool.cache_block(a, b"a" * 16)
    pool.cache_block(b, b"b" * 16)
    dup = c
    pool.cache_block(dup, b"a" * 16)  # a duplicate of a: hashed, but not findable
    pool.free([d, dup, b, a])  # d: a partial block, never hashed
    assert dup.block_hash is None
    order = [x.block_id for x in pool.allocate(5)]
    # The blocks holding nothing findable go first (even before the never-used block 5), then
    # the cached ones, least recently freed first.
    assert order == [dup.block_id, d.block_id, 5, b.block_id, a.block_id]
    assert pool.stats.evictions == 2


def test_block_pool_random_operations_keep_invariants() -> None:
    """Random allocate / cache / hit / free / reset sequences against a reference model of the
    LRU order: ref counts are exact and never negative, a referenced block is never handed out,
    lookups return only blocks holding that hash, and free cached blocks leave in LRU order."""
    for seed in range(30):
        rng = random.Random(seed)
        pool = BlockPool(rng.randint(2, 24), enable_caching=True)
        holders: list[list[KVBlock]] = []
        # Reference: free block ids in eviction order.
        model: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, pool.num_blocks))
        next_hash = 0
        for _ in range(400):
            op = rng.random()
            if op < 0.35 and pool.num_free_blocks:
                n = rng.randint(1, pool.num_free_blocks)
                referenced = {b.block_id for h in holders for b in h}
                got = pool.allocate(n)
                expected = [model.popitem(last=False)[0] for _ in range(n)]
                assert [b.block_id for b in got] == expected
                assert not referenced & {b.block_id for b in got}, "a referenced block was reused"
                assert all(b.block_hash is None and b.ref_cnt == 1 for b in got)
                for b in got:
                    if rng.random() < 0.7:
                        pool.cache_block(b, next_hash.to_bytes(16, "little"))
                        next_hash += 1
                holders.append(got)
            elif op < 0.55 and pool._cached:
                # A prefix hit on some cached blocks (free or in use).
                hashes = rng.sample(sorted(pool._cached), rng.randint(1, min(3, len(pool._cached))))
                hits = [pool.lookup(h) for h in hashes]
                assert all(b is not None and b.block_hash == h for b, h in zip(hits, hashes, strict=True))
                for b in hits:
                    model.pop(b.block_id, None)
                pool.touch(hits)  # type: ignore[arg-type]
                holders.append(hits)  # type: ignore[arg-type]
            elif op < 0.95 and holders:
                blocks = holders.pop(rng.randrange(len(holders)))
                pool.free(blocks[::-1])
                for b in blocks[::-1]:
                    if b.ref_cnt == 0:
                        model[b.block_id] = None
                        if b.block_hash is None:
                            model.move_to_end(b.block_id, last=False)
            elif op >= 0.95:
                pool.reset_prefix_cache()
                assert not pool._cached
            check_pool(pool, holders)
            assert list(pool._free) == list(model)
        for blocks in holders:
            pool.free(blocks)
        assert pool.num_free_blocks == pool.num_usable_blocks
        with pytest.raises(RuntimeError):
            pool.free([pool.blocks[1]])
        assert all(b.ref_cnt >= 0 for b in pool.blocks)


def test_reset_prefix_cache_forgets_prefixes_and_stats_but_not_blocks_in_use() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    b = make_request("b", list(range(9)))
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8
    kv.allocate_slots(b, 1, blocks)
    assert kv.pool.stats.hits == 8
    free_before = kv.num_free_blocks
    assert kv.reset_prefix_cache()
    assert kv.pool.stats == type(kv.pool.stats)()
    assert kv.num_free_blocks == free_before
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([], 0)
    kv.free(a)
    kv.free(b)
    check_pool(kv.pool, [])


# ---- admission and statistics ---------------------------------------------------------------


def test_failed_admission_is_not_counted_twice() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)  # 3 blocks, 2 hashed; 2 free left
    big = make_request("big", list(range(8)) + list(range(100, 108)) + [1])
    for _ in range(3):  # the scheduler retries it every step while it does not fit
        blocks, n = kv.get_computed_blocks(big)
        assert n == 8
        assert kv.allocate_slots(big, 9, blocks) is None
    assert kv.pool.stats.queries == 9 and kv.pool.stats.requests == 1
    kv.free(a)
    blocks, n = kv.get_computed_blocks(big)
    assert kv.allocate_slots(big, len(big.all_token_ids) - n, blocks) is not None
    s = kv.pool.stats
    assert (s.requests, s.queries, s.hits, s.tokens_saved) == (2, 9 + 17, 8, 8)


def test_prompt_logprobs_requests_do_not_read_the_cache_but_fill_it() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    scored = make_request("s", list(range(9)), prompt_logprobs=1)
    assert kv.get_computed_blocks(scored) == ([], 0)
    kv.allocate_slots(scored, 9)
    assert kv.pool.stats.queries == 9  # only a's
    kv.free(a)
    kv.free(scored)
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[1] == 8


# ---- the flag -------------------------------------------------------------------------------


def test_enable_prefix_caching_flag_parsing() -> None:
    from hallm.core.engine_args import EngineArgs
    from hallm.entrypoints.cli import build_parser
    from hallm.entrypoints.cli.engine_args import add_engine_args, engine_args_from

    assert EngineArgs().enable_prefix_caching is True
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_args_from(parser.parse_args([])).enable_prefix_caching is True
    assert engine_args_from(parser.parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching is False
    assert engine_args_from(parser.parse_args(["--enable-prefix-caching"])).enable_prefix_caching is True
    args = build_parser().parse_args(["bench", "throughput", "--no-enable-prefix-caching"])
    assert engine_args_from(args).enable_prefix_caching is False
