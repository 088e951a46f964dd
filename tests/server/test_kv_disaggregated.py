"""Disaggregated serving through the OpenAI API: a prefill server (kv_producer) answers
max_tokens=1 and saves the prompt's KV to shared storage; a decode server (kv_consumer) loads it
and answers in full, with the same greedy tokens as a server that computed the prompt itself,
and its /metrics count the loaded tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.server.utils import MODEL_NAME, Server

PROMPT = list(range(40, 140))  # 100 token ids: 6 full blocks of 16 are loadable


def kv_flags(path: Path, role: str) -> tuple[str, str]:
    config = {
        "kv_connector": "shared_storage",
        "kv_role": role,
        "kv_connector_extra_config": {"shared_storage_path": str(path)},
    }
    return "--kv-transfer-config", json.dumps(config)


def complete(server: Server, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_prefill_server_then_decode_server(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    prefill = server_factory(*kv_flags(tmp_path, "kv_producer"))
    decode = server_factory(*kv_flags(tmp_path, "kv_consumer"))
    complete(prefill, 1)
    assert list(tmp_path.rglob("*.kvb"))
    answer = complete(decode, 8)
    reference = complete(prefill, 8)  # computed on the prefill server (its own prefix cache)
    assert answer["choices"][0]["logprobs"]["tokens"] == reference["choices"][0]["logprobs"]["tokens"]
    assert answer["choices"][0]["text"] == reference["choices"][0]["text"]
    metrics = decode.metrics()
    assert metrics["hallm:kv_connector_tokens_loaded"] == 96
    assert metrics["hallm:kv_connector_load_failures"] == 0
