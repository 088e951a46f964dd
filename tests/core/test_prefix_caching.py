"""Prefix caching: the block pool under random operation sequences, the manager's admission and
statistics, and the scheduler driven against a fake worker that checks every KV slot a step reads
holds the right content (so a hit on a block nobody has written yet would fail)."""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections import OrderedDict

import pytest

from hallm.core.config import CacheConfig, SchedulerConfig
from hallm.core.kv_cache.block_pool import BlockPool, KVBlock
from hallm.core.kv_cache.hashing import hash_block
from hallm.core.kv_cache.manager import KVCacheManager
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.request import Request
from hallm.core.sampling_params import SamplingParams
from hallm.core.scheduler import Scheduler
from hallm.core.scheduler_output import SchedulerOutput

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


# ---- the scheduler against a fake worker ----------------------------------------------------


def next_token(prefix_key: int) -> int:
    return 10 + prefix_key % 37


@dataclasses.dataclass
class FakeState:
    tokens: list[int]
    keys: list[int]  # keys[p]: identifies tokens[: p + 1], i.e. what position p's KV depends on
    table: list[int]
    computed: int

    def append(self, token: int) -> None:
        self.keys.append(hash((self.keys[-1] if self.keys else 0, token)))
        self.tokens.append(token)


class FakeWorker:
    """Mirrors the model runner's bookkeeping. Its KV cache stores, per slot, the key of the
    prefix whose KV it holds. A step first writes every scheduled token's slot (as a backend
    writes a step's KV before attention reads it), then checks each request's reads."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.kv: dict[tuple[int, int], int] = {}
        self.states: dict[str, FakeState] = {}
        self.same_step_reads = 0  # reads of slots another request wrote in this very step

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.block_size
        for rid in step.finished_req_ids:
            self.states.pop(rid, None)
        for new in step.new_requests:
            st = FakeState([], [], list(new.block_ids), new.num_computed_tokens)
            for t in new.prompt_token_ids + new.output_token_ids:
                st.append(t)
            self.states[new.req_id] = st
        for cached in step.cached_requests:
            st = self.states[cached.req_id]
            assert st.computed == cached.num_computed_tokens
            st.table += cached.new_block_ids
        writer: dict[tuple[int, int], str] = {}
        for rid, n in step.num_scheduled_tokens.items():
            st = self.states[rid]
            assert st.computed + n <= len(st.tokens)
            for p in range(st.computed, st.computed + n):
                slot = (st.table[p // bs], p % bs)
                assert slot[0] != 0, "wrote into the null block"
                assert slot not in writer, "two requests wrote one slot in one step"
                writer[slot] = rid
                self.kv[slot] = st.keys[p]
        out = ModelRunnerOutput(sampled_token_ids={})
        for rid, n in step.num_scheduled_tokens.items():
            st = self.states[rid]
            for p in range(st.computed + n):
                slot = (st.table[p // bs], p % bs)
                assert self.kv.get(slot) == st.keys[p], f"{rid} reads wrong KV at position {p}"
                if writer.get(slot, rid) != rid:
                    self.same_step_reads += 1
            st.computed += n
            if st.computed == len(st.tokens):
                token = next_token(st.keys[-1])
                st.append(token)
                out.sampled_token_ids[rid] = token
        return out


def run_scheduler(
    sched: Scheduler, worker: FakeWorker, requests: list[Request], check_every_step: bool = True
) -> dict[str, list[int]]:
    for r in requests:
        sched.add_request(r)
    steps = 0
    while sched.has_unfinished_requests():
        step = sched.schedule()
        assert not step.is_empty, "no progress"
        out = worker.execute(step)
        sched.update(step, out)
        if check_every_step:
            check_pool(sched.kv.pool, list(sched.kv.req_blocks.values()))
        steps += 1
        assert steps < 10_000
    worker.execute(sched.schedule())  # drop the last finished ones
    check_pool(sched.kv.pool, [])
    return {r.request_id: list(r.output_token_ids) for r in requests}


def make_scheduler(
    num_blocks: int, block_size: int, budget: int, caching: bool, max_num_seqs: int = 64
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=True
        ),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        MAX_MODEL_LEN,
    )


def test_chunked_identical_prompts_never_hit_blocks_not_yet_reached() -> None:
    """Two identical long prompts with a small budget: the second is admitted in a step where the
    first's last chunk completes the prompt and reads blocks written in that same step; blocks
    beyond any chunk of the step are never hashed, so never hit."""
    bs, budget = 4, 24
    prompt = [random.Random(1).randrange(10, 500) for _ in range(90)]
    sched = make_scheduler(num_blocks=64, block_size=bs, budget=budget, caching=True)
    worker = FakeWorker(bs)
    a, b = make_request("a", prompt, max_tokens=3), make_request("b", prompt, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    b_hits_at_admission = None
    while sched.has_unfinished_requests():
        step = sched.schedule()
        # Every block findable in the cache covers tokens computed by the end of this step.
        for r in (a, b):
            done = r.num_computed_tokens + step.num_scheduled_tokens.get(r.request_id, 0)
            for i, block in enumerate(sched.kv.req_blocks.get(r.request_id, [])):
                if block.block_hash is not None and sched.kv.pool.lookup(block.block_hash) is block:
                    assert (i + 1) * bs <= done
        if b_hits_at_admission is None and any(n.req_id == "b" for n in step.new_requests):
            b_hits_at_admission = b.num_cached_tokens
            assert a.num_computed_tokens + step.num_scheduled_tokens["a"] == len(prompt)
        sched.update(step, worker.execute(step))
    assert b_hits_at_admission == (len(prompt) - 1) // bs * bs
    assert worker.same_step_reads > 0  # b read KV that a wrote in the very step b was admitted
    assert a.output_token_ids == b.output_token_ids


def test_only_blocks_a_chunk_reaches_are_hashed() -> None:
    """A chunk hashes the blocks it fills and no further, so a request admitted next (in the
    same step or later) can hit only blocks whose KV is written by then. (The FCFS scheduler
    admits nobody behind a prompt its budget cuts, so this is checked on the manager.)"""
    bs = 4
    prompt = list(range(10, 80))
    kv = KVCacheManager(num_blocks=64, block_size=bs, enable_caching=True)
    a, b = make_request("a", prompt), make_request("b", prompt)
    assert kv.allocate_slots(a, 18) is not None  # a's first chunk: 4 full blocks and 2 tokens
    blocks, n = kv.get_computed_blocks(b)
    assert n == 16 and blocks == kv.req_blocks["a"][:4]
    assert sum(blk.block_hash is not None for blk in kv.req_blocks["a"]) == 4
    a.num_computed_tokens = 18
    assert kv.allocate_slots(a, 20) is not None  # a reaches 38 tokens: 9 blocks
    assert kv.get_computed_blocks(b)[1] == 36
    a.num_computed_tokens = 38
    assert kv.allocate_slots(a, 32) is not None  # the whole prompt: 17 full blocks
    assert kv.get_computed_blocks(b)[1] == 68


def test_n_samples_share_their_prompt_blocks() -> None:
    bs = 4
    prompt = list(range(10, 10 + 4 * bs + 2))  # 4 full blocks and a partial one
    sched = make_scheduler(num_blocks=64, block_size=bs, budget=256, caching=True)
    children = [make_request(f"r#{i}", prompt) for i in range(4)]
    for c in children:
        sched.add_request(c)
    step = sched.schedule()
    assert len(step.new_requests) == 4
    tables = [sched.kv.req_blocks[c.request_id] for c in children]
    assert all(t[:4] == tables[0][:4] for t in tables)
    assert [b.ref_cnt for b in tables[0][:4]] == [4] * 4
    assert len({t[4].block_id for t in tables}) == 4  # the partial block is private
    # 4 shared blocks + 4 private ones taken from the pool, not 4 * 5.
    assert sched.kv.num_free_blocks == 63 - 8
    assert step.total_num_scheduled_tokens == len(prompt) + 3 * 2
    s = sched.kv.pool.stats
    assert (s.requests, s.queries, s.hits) == (4, 4 * len(prompt), 3 * 16)


def test_preempted_request_reuses_its_cached_blocks_and_is_not_a_new_query() -> None:
    bs = 4
    # 5 usable blocks: two requests of 7 prompt tokens (2 blocks each) cannot both decode.
    sched = make_scheduler(num_blocks=6, block_size=bs, budget=64, caching=True)
    worker = FakeWorker(bs)
    a = make_request("a", list(range(10, 17)), max_tokens=8)
    b = make_request("b", list(range(50, 57)), max_tokens=8)
    outputs = run_scheduler(sched, worker, [a, b])
    assert sched.num_preemptions > 0
    s = sched.kv.pool.stats
    assert s.requests == 2 and s.queries == 14 and s.hits == 0
    assert s.tokens_saved > 0  # the resumed request took its own blocks back from the cache
    ref = run_scheduler(
        make_scheduler(64, bs, 64, caching=False),
        FakeWorker(bs),
        [
            make_request("a", list(range(10, 17)), max_tokens=8),
            make_request("b", list(range(50, 57)), max_tokens=8),
        ],
    )
    assert outputs == ref


def random_multi_turn(seed: int) -> tuple[Scheduler, FakeWorker]:
    """Shared system prompts, growing multi-turn chats, a duplicate, chunked prefill and a pool
    small enough to evict and preempt, with caching on and off: every KV read is checked, and
    the outputs must be equal. Returns the caching-on scheduler and worker."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    budget = rng.choice([8, 16, 32, 128])
    max_tokens = rng.randint(1, 12)
    systems = [[rng.randrange(10, 500) for _ in range(rng.randint(3, 40))] for _ in range(3)]
    convs = [list(rng.choice(systems)) for _ in range(rng.randint(2, 8))]
    longest = max(len(s) for s in systems) + 3 * (12 + max_tokens) + 1
    num_blocks = -(-longest // bs) + 1 + rng.randint(0, longest // bs)
    on = make_scheduler(num_blocks, bs, budget, caching=True, max_num_seqs=rng.choice([2, 4, 64]))
    off = make_scheduler(1024, bs, 1024, caching=False)
    w_on, w_off = FakeWorker(bs), FakeWorker(bs)
    for turn in range(3):
        for conv in convs:
            conv += [rng.randrange(10, 500) for _ in range(rng.randint(1, 12))]
        prompts = [list(c) for c in convs] + [list(convs[0])]  # one duplicate
        reqs_on = [make_request(f"{turn}-{i}", p, max_tokens) for i, p in enumerate(prompts)]
        reqs_off = [make_request(f"{turn}-{i}", p, max_tokens) for i, p in enumerate(prompts)]
        got = run_scheduler(on, w_on, reqs_on)
        assert got == run_scheduler(off, w_off, reqs_off)
        for conv, r in zip(convs, reqs_on, strict=False):
            conv += r.output_token_ids
    s = on.kv.pool.stats
    assert 0 < s.hits <= s.queries
    assert off.kv.pool.stats.queries == 0
    return on, w_on


@pytest.mark.parametrize("seed", range(24))
def test_random_workloads_read_correct_kv_and_match_caching_off(seed: int) -> None:
    random_multi_turn(seed)


def test_random_workloads_cover_eviction_preemption_and_same_step_hits() -> None:
    runs = [random_multi_turn(seed) for seed in range(24)]
    assert sum(on.num_preemptions > 0 for on, _ in runs) >= 5
    assert sum(on.kv.pool.stats.evictions > 0 for on, _ in runs) >= 10
    assert sum(w.same_step_reads > 0 for _, w in runs) >= 5


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
