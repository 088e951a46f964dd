"""Prefix caching through the scheduler, driven against a fake worker that checks every KV slot a
step reads holds the right content (so a hit on a block nobody has written yet would fail)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from hallm.core.config import CacheConfig, SchedulerConfig
from hallm.core.kv_cache.manager import KVCacheManager
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.request import Request
from hallm.core.scheduler import Scheduler
from hallm.core.scheduler_output import SchedulerOutput
from tests.core.kv_helpers import MAX_MODEL_LEN, check_pool, make_request

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
