"""The p2p KV connector end to end on the cpu plugin and a tiny random llama: a prefill engine
pushes KV blocks to a decode engine over ZMQ/TCP, and a decode instance that is down or silent
costs the prefill side its sends and the decode side a recompute, never tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine.test_kv_connectors import (
    BLOCK_SIZE,
    PROMPTS,
    engine_of,
    generate,
    kv_stats,
    loadable_tokens,
    make_llm,
)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[list[int]]:
    """The oracle: one engine, no connector."""
    return generate(make_llm(model_dir), PROMPTS)


def p2p(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "p2p", "kv_role": role, "kv_connector_extra_config": extra}


def test_p2p_prefill_pushes_to_decode(model_dir: str, expected: list[list[int]]) -> None:
    check_p2p_push(model_dir, expected)


def check_p2p_push(model_dir: str, expected: list[list[int]], ranks: int = 1, **engine: Any) -> None:
    """A prefill engine pushes PROMPTS' blocks to a decode engine (both of `ranks` ranks; each
    rank sends its shard, counted in tokens_saved), which loads every loadable block."""
    from tests.server.utils import free_port

    port = free_port()  # the decode engine's rank r listens on port + r
    tp = {"tensor_parallel_size": ranks, **engine}
    with (
        engine_of(make_llm(model_dir, p2p("kv_consumer", kv_listen_port=port), **tp)) as decode,
        engine_of(make_llm(model_dir, p2p("kv_producer", kv_peer=f"127.0.0.1:{port}"), **tp)) as prefill,
    ):
        assert generate(prefill, PROMPTS, max_tokens=1) == [t[:1] for t in expected]
        saved = 8 * BLOCK_SIZE * ranks  # distinct full blocks, a shard per rank
        assert kv_stats(prefill)["kv_connector_tokens_saved"] == saved
        assert generate(decode, PROMPTS) == expected
        stats = kv_stats(decode)
        assert stats["kv_connector_tokens_loaded"] == sum(loadable_tokens(p) for p in PROMPTS)
        assert stats.get("kv_connector_load_failures", 0) == 0
        generate(prefill, PROMPTS, max_tokens=1)  # nothing new: delivered blocks are not resent
        assert kv_stats(prefill)["kv_connector_tokens_saved"] == saved


def test_p2p_decode_instance_down_or_silent(model_dir: str, expected: list[list[int]]) -> None:
    """The decode instance is gone (nobody listens) or dies mid-transfer (takes the message,
    never answers): the prefill instance answers anyway, counts the failed sends, and a decode
    instance that got nothing computes the prompt itself."""
    import zmq

    from tests.server.utils import free_port

    silent = zmq.Context().socket(zmq.ROUTER)
    silent_port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        for peer_port in (free_port(), silent_port):
            prefill = make_llm(
                model_dir, p2p("kv_producer", kv_peer=f"127.0.0.1:{peer_port}", send_timeout_s=0.3)
            )
            assert generate(prefill, PROMPTS, max_tokens=1) == [t[:1] for t in expected]
            stats = kv_stats(prefill)
            assert stats["kv_connector_save_failures"] == 8 and stats.get("kv_connector_tokens_saved", 0) == 0
    finally:
        silent.close(linger=0)
    decode = make_llm(model_dir, p2p("kv_consumer", kv_listen_port=free_port()))
    try:
        assert generate(decode, PROMPTS) == expected
        assert kv_stats(decode).get("kv_connector_tokens_loaded", 0) == 0
    finally:
        decode.engine.shutdown()
