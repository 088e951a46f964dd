"""The scheduler's side of a KV connector, step by step with a scripted connector: a load step
computes nothing, a completed load counts its tokens as computed and caches its blocks, a failed
one leaves them to compute (and caches nothing unverified), an aborted load frees its blocks,
and a finished request's blocks are held until the connector reports its send done; under
async scheduling a load step resolves before its request computes, and the save is asked once."""

from __future__ import annotations

from typing import Any

from hallm.core.config import CacheConfig, SchedulerConfig
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.request import RequestStatus
from hallm.core.scheduler import Scheduler
from hallm.platforms import KVConnector, KVConnectorRole
from tests.core.kv_helpers import MAX_MODEL_LEN, check_pool, make_request

BLOCK = 4


class ScriptedConnector(KVConnector):
    name = "scripted"

    def __init__(self, external: int = 0, hold: bool = False) -> None:
        super().__init__(None, KVConnectorRole.SCHEDULER)
        self.external, self.hold = external, hold
        self.calls: list[tuple[str, list[int], int]] = []

    def num_external_tokens(self, request: Any, num_computed: int) -> int:
        return self.external

    def on_blocks_allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        self.calls.append((request.request_id, list(block_ids), num_external))

    def build_step_meta(self) -> Any:
        return "meta"

    def on_request_finished(self, request: Any, block_ids: list[int]) -> bool:
        return self.hold

    def register_kv_caches(self, caches: Any) -> None: ...
    def start_load(self, meta: Any) -> None: ...
    def save_layer(self, layer_name: str, kv_cache: Any, layout: Any) -> None: ...


def scheduler(connector: KVConnector, num_blocks: int = 16) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        CacheConfig(block_size=BLOCK, num_blocks=num_blocks, enable_prefix_caching=True),
        MAX_MODEL_LEN,
        connector,
    )


def test_load_step_then_compute_the_rest() -> None:
    conn = ScriptedConnector(external=8)
    sched = scheduler(conn)
    req = make_request("a", list(range(13)), max_tokens=1)
    sched.add_request(req)
    step = sched.schedule()
    assert step.kv_load_req_ids == ["a"] and step.num_scheduled_tokens == {} and not step.is_empty
    assert req.status == RequestStatus.WAITING_FOR_KV
    assert conn.calls == [("a", sched.kv.block_ids("a"), 8)]
    assert all(sched.kv.pool.lookup(h) is None for h in req.block_hashes)  # not findable before the load
    sched.update(step, ModelRunnerOutput({}, kv_loaded={"a"}))
    assert req.num_computed_tokens == 8 and sched.kv_connector_stats["tokens_loaded"] == 8
    assert [sched.kv.pool.lookup(h) is not None for h in req.block_hashes[:2]] == [True, True]
    step = sched.schedule()
    assert step.num_scheduled_tokens == {"a": 5}
    assert step.new_requests[0].num_computed_tokens == 8
    assert step.new_requests[0].block_ids[:2] == conn.calls[0][1][:2]
    assert conn.calls[-1] == ("a", sched.kv.block_ids("a"), 0)  # the prompt completes: save
    sched.update(step, ModelRunnerOutput({"a": 7}))
    assert req.status == RequestStatus.FINISHED_LENGTH
    check_pool(sched.kv.pool, [])


def test_failed_load_is_recomputed() -> None:
    sched = scheduler(ScriptedConnector(external=8))
    req = make_request("a", list(range(13)), max_tokens=1)
    sched.add_request(req)
    step = sched.schedule()
    sched.update(step, ModelRunnerOutput({}))  # the worker names no load as done
    assert req.num_computed_tokens == 0 and sched.kv_connector_stats["load_failures"] == 1
    assert all(sched.kv.pool.lookup(h) is None for h in req.block_hashes)
    step = sched.schedule()
    assert step.num_scheduled_tokens == {"a": 13} and step.new_requests[0].num_computed_tokens == 0


def test_abort_during_a_load_frees_its_blocks() -> None:
    sched = scheduler(ScriptedConnector(external=8))
    sched.add_request(make_request("a", list(range(13))))
    step = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    sched.update(step, ModelRunnerOutput({}, kv_loaded={"a"}))
    assert not sched.has_unfinished_requests()
    check_pool(sched.kv.pool, [])


def test_finished_request_holds_its_blocks_until_sent() -> None:
    sched = scheduler(ScriptedConnector(hold=True))
    sched.add_request(make_request("a", list(range(9)), max_tokens=1))
    step = sched.schedule()
    sched.update(step, ModelRunnerOutput({"a": 1}))
    held = sched.kv.req_blocks["a"]
    check_pool(sched.kv.pool, [held])
    step = sched.schedule()
    sched.update(step, ModelRunnerOutput({}, kv_finished_sending={"a"}))
    check_pool(sched.kv.pool, [])


def test_a_loaded_request_cannot_starve_the_queue_head() -> None:
    """A request back from its load step holds blocks while it waits; when the head of the queue
    (here: one that jumped ahead, as a preempted request does) needs them, they are freed, and
    the loaded prefix stays in the prefix cache."""
    sched = scheduler(ScriptedConnector(external=8), num_blocks=6)  # 5 usable blocks
    a = make_request("a", list(range(13)), max_tokens=1)
    sched.add_request(a)
    sched.update(sched.schedule(), ModelRunnerOutput({}, kv_loaded={"a"}))
    assert sched.kv.holds_blocks(a)
    b = make_request("b", list(range(100, 115)), max_tokens=1)  # 4 blocks: more than are free
    sched.requests["b"] = b
    sched.waiting.appendleft(b)
    sched.connector.external = 0  # type: ignore[union-attr]
    step = sched.schedule()
    assert step.num_scheduled_tokens == {"b": 15}
    assert not sched.kv.holds_blocks(a) and a.num_computed_tokens == 0
    assert any(sched.kv.pool.lookup(h) is not None for h in a.block_hashes[:2])


def async_scheduler(connector: KVConnector) -> Scheduler:
    sched = scheduler(connector)
    sched.async_scheduling = True
    return sched


def test_async_load_step_resolves_before_its_compute() -> None:
    """Async scheduling: the step after a load step is scheduled before the load's result is
    known, so the request is in neither; it computes from the step after the result, the rest
    of its prompt only when the load succeeded."""
    for loaded in (True, False):
        conn = ScriptedConnector(external=8)
        sched = async_scheduler(conn)
        other = make_request("x", list(range(100, 105)), max_tokens=4)
        sched.add_request(other)
        first = sched.schedule()  # x's prefill
        conn.external = 8
        req = make_request("a", list(range(13)), max_tokens=1)
        sched.add_request(req)
        load = sched.schedule()  # x decodes on its pending token; a's load step
        assert load.kv_load_req_ids == ["a"] and "a" not in load.num_scheduled_tokens
        sched.update(first, ModelRunnerOutput({"x": 7}))
        after = sched.schedule()  # scheduled before the load step's output
        assert "a" not in after.num_scheduled_tokens and not after.kv_load_req_ids
        assert req.status == RequestStatus.WAITING_FOR_KV
        sched.update(load, ModelRunnerOutput({"x": 8}, kv_loaded={"a"} if loaded else set()))
        step = sched.schedule()
        assert step.num_scheduled_tokens["a"] == (5 if loaded else 13)
        assert step.new_requests[0].num_computed_tokens == (8 if loaded else 0)


def test_async_save_is_asked_in_the_step_that_completes_the_prompt() -> None:
    """The save instruction reads the tokens computed before the step (async counts a scheduled
    chunk as computed when it is scheduled): asked once, in the step whose chunk ends the prompt."""
    conn = ScriptedConnector()
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8),
        CacheConfig(block_size=BLOCK, num_blocks=16, enable_prefix_caching=True),
        MAX_MODEL_LEN,
        conn,
    )
    sched.async_scheduling = True
    sched.add_request(make_request("a", list(range(13)), max_tokens=3))
    saves = []
    for _ in range(4):
        step = sched.schedule()
        saves.append([c for c in conn.calls if c[2] == 0])
        conn.calls.clear()
        assert step.num_scheduled_tokens
    assert [len(s) for s in saves] == [0, 1, 0, 0]  # chunks of 8 and 5: the second completes it
