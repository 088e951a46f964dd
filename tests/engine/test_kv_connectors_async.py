"""KV connectors under async scheduling (forced on for the cpu plugin, whose default is off): the
greedy tokens of the plain synchronous engine, loads counted exactly, and the faults of
test_kv_connectors.py costing recompute, never tokens.

Async scheduling schedules step N+1 before step N's results are known. A request admitted for a
load step in step N is computed from step N+2 on (its load result comes with step N's output);
the save of the step that completes a prompt runs on the worker right after that step's forward,
before any later step's loads.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.entrypoints.llm import LLM
from tests.engine.test_kv_connector_p2p import p2p
from tests.engine.test_kv_connectors import (
    BLOCK_SIZE,
    PROMPTS,
    SHARED,
    generate,
    greedy,
    kv_stats,
    loadable_tokens,
    make_llm,
    storage,
)

OFFLOAD = {"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 1 << 24}}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[list[int]]:
    """The oracle: one synchronous engine, no connector."""
    llm = make_llm(model_dir)
    assert not llm.engine.async_scheduling
    return generate(llm, PROMPTS)


def async_llm(model_dir: str, kv: dict[str, Any] | None, **kwargs: Any) -> LLM:
    llm = make_llm(model_dir, kv, async_scheduling=True, **kwargs)
    assert llm.engine.async_scheduling
    return llm


def test_shared_storage_prefill_on_one_engine_decode_on_another(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    producer = async_llm(model_dir, storage(tmp_path, "kv_producer"))
    assert generate(producer, PROMPTS, max_tokens=1) == [t[:1] for t in expected]
    assert len(list(tmp_path.rglob("*.kvb"))) == 5 + 1 + 2
    consumer = async_llm(model_dir, storage(tmp_path, "kv_consumer"), enable_prefix_caching=False)
    outs = consumer.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    stats = kv_stats(consumer)
    assert stats["kv_connector_tokens_loaded"] == sum(loadable_tokens(p) for p in PROMPTS)
    assert stats.get("kv_connector_load_failures", 0) == 0
    assert [o.num_cached_tokens for o in outs] == [loadable_tokens(p) for p in PROMPTS]


def test_shared_storage_both_roles(model_dir: str, expected: list[list[int]], tmp_path: Path) -> None:
    """One engine saves on the first pass and, its prefix cache reset, loads on the second,
    while other requests of the same batch compute (loads and computes in one step)."""
    llm = async_llm(model_dir, storage(tmp_path))
    assert generate(llm, PROMPTS) == expected
    llm.engine.reset_prefix_cache()
    assert generate(llm, PROMPTS) == expected
    assert kv_stats(llm)["kv_connector_tokens_loaded"] > 0


def test_offload_round_trip_with_eviction(model_dir: str, expected: list[list[int]]) -> None:
    llm = async_llm(model_dir, OFFLOAD, num_blocks=9)
    for p, want in zip(PROMPTS, expected, strict=True):
        assert generate(llm, [p]) == [want]
    assert llm.engine.get_stats()["prefix_cache_evictions"] > 0
    for p, want in zip(PROMPTS, expected, strict=True):
        out = llm.generate([{"prompt_token_ids": p}], greedy(), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == want
        assert out.num_cached_tokens == loadable_tokens(p)
    stats = kv_stats(llm)
    assert stats["kv_connector_offload_hit_tokens"] == stats["kv_connector_tokens_loaded"] > 0
    assert stats.get("kv_connector_load_failures", 0) == 0


def test_p2p_prefill_pushes_to_decode(model_dir: str, expected: list[list[int]]) -> None:
    from tests.server.utils import free_port

    port = free_port()
    decode = async_llm(model_dir, p2p("kv_consumer", kv_listen_port=port))
    prefill = async_llm(model_dir, p2p("kv_producer", kv_peer=f"127.0.0.1:{port}"))
    try:
        assert generate(prefill, PROMPTS, max_tokens=1) == [t[:1] for t in expected]
        assert kv_stats(prefill)["kv_connector_tokens_saved"] == 8 * BLOCK_SIZE
        assert generate(decode, PROMPTS) == expected
        stats = kv_stats(decode)
        assert stats["kv_connector_tokens_loaded"] == sum(loadable_tokens(p) for p in PROMPTS)
        assert stats.get("kv_connector_load_failures", 0) == 0
    finally:
        decode.engine.shutdown()
        prefill.engine.shutdown()


def test_truncated_files_are_recomputed(model_dir: str, expected: list[list[int]], tmp_path: Path) -> None:
    generate(async_llm(model_dir, storage(tmp_path, "kv_producer")), PROMPTS, max_tokens=1)
    for f in sorted(tmp_path.rglob("*.kvb"))[:4]:
        f.write_bytes(f.read_bytes()[:10])
    consumer = async_llm(model_dir, storage(tmp_path, "kv_consumer"))
    assert generate(consumer, PROMPTS) == expected
    stats = kv_stats(consumer)
    assert stats["kv_connector_corrupt_blocks"] >= 1 and stats["kv_connector_load_failures"] >= 1


def test_block_deleted_after_the_offer_is_recomputed(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    """The file of an offered block disappears before the load step reads it (another instance
    evicted it): that request's load fails and it computes its prompt."""
    from hallm.core.kv_connectors.blocks import block_hashes

    generate(async_llm(model_dir, storage(tmp_path, "kv_producer")), PROMPTS, max_tokens=1)
    consumer = async_llm(model_dir, storage(tmp_path, "kv_consumer"))
    connector = consumer.engine.scheduler.connector
    assert connector is not None
    offer = connector.num_external_tokens
    lost: list[str] = []

    def offer_then_lose(request: Any, num_computed: int) -> int:
        n = int(offer(request, num_computed))
        if n and not lost:
            last = block_hashes(request, BLOCK_SIZE)[(num_computed + n) // BLOCK_SIZE - 1]
            connector.path(last).unlink()  # type: ignore[attr-defined]
            lost.append(request.request_id)
        return n

    connector.num_external_tokens = offer_then_lose  # type: ignore[method-assign]
    assert generate(consumer, PROMPTS) == expected
    stats = kv_stats(consumer)
    assert lost and stats["kv_connector_missing_blocks"] == 1 and stats["kv_connector_load_failures"] == 1
    assert stats["kv_connector_tokens_loaded"] == sum(loadable_tokens(p) for p in PROMPTS[1:])


@pytest.mark.parametrize("peer", ["down", "silent"])
def test_p2p_decode_instance_down_or_silent(model_dir: str, expected: list[list[int]], peer: str) -> None:
    """Nobody listens, or the peer takes the message and never answers (died mid-transfer)."""
    import zmq

    from tests.server.utils import free_port

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1") if peer == "silent" else free_port()
    try:
        prefill = async_llm(model_dir, p2p("kv_producer", kv_peer=f"127.0.0.1:{port}", send_timeout_s=0.3))
        assert generate(prefill, PROMPTS) == expected
        stats = kv_stats(prefill)
        assert stats["kv_connector_save_failures"] == 8 and stats.get("kv_connector_tokens_saved", 0) == 0
    finally:
        silent.close(linger=0)
        ctx.term()


def test_under_preemption_and_chunked_prefill(model_dir: str, tmp_path: Path) -> None:
    """Many requests over shared prefixes, a pool small enough to preempt, 8-token chunks: the
    synchronous plain engine's tokens with either connector under async scheduling."""
    rng = random.Random(0)
    systems = [[rng.randrange(3, 500) for _ in range(rng.randint(9, 19))] for _ in range(3)]
    prompts = [systems[i % 3] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 6))] for i in range(10)]
    small = {"num_blocks": 24, "max_num_batched_tokens": 8}
    want = generate(make_llm(model_dir, None, **small), prompts)
    for kv in (OFFLOAD, storage(tmp_path)):
        llm = async_llm(model_dir, kv, **small)
        assert generate(llm, prompts) == want
        llm.engine.reset_prefix_cache()
        assert generate(llm, prompts) == want
        assert llm.engine.get_stats()["num_preemptions"] > 0
        assert kv_stats(llm)["kv_connector_tokens_loaded"] > 0


def test_loads_while_other_requests_decode(model_dir: str, expected: list[list[int]], tmp_path: Path) -> None:
    """Requests arrive while another one decodes (its next token pending in every step): their
    load steps run beside its decode steps, and every request keeps the oracle's tokens."""
    generate(async_llm(model_dir, storage(tmp_path, "kv_producer")), PROMPTS[:2], max_tokens=1)
    engine = async_llm(model_dir, storage(tmp_path, "kv_consumer")).engine
    tokens: dict[str, list[int]] = {}
    arrivals = {0: 2, 2: 0, 4: 1}  # step number -> index into PROMPTS (PROMPTS[2] is not stored)
    step = 0
    while step in arrivals or step <= max(arrivals) or engine.has_unfinished_requests():
        if step in arrivals:
            i = arrivals[step]
            engine.add_request(str(i), {"prompt_token_ids": PROMPTS[i]}, greedy())
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    assert [tokens[str(i)] for i in range(3)] == expected
    stats = kv_stats_of(engine)
    # PROMPTS[1] finds the shared prefix's 3 blocks in the prefix cache (loaded for PROMPTS[0]).
    shared = len(SHARED) // BLOCK_SIZE * BLOCK_SIZE
    assert (
        stats["kv_connector_tokens_loaded"]
        == loadable_tokens(PROMPTS[0]) + loadable_tokens(PROMPTS[1]) - shared
    )
    assert stats.get("kv_connector_load_failures", 0) == 0


def kv_stats_of(engine: Any) -> dict[str, Any]:
    return {k: v for k, v in engine.get_stats().items() if k.startswith("kv_connector_")}
