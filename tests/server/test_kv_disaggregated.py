"""Disaggregated serving through the OpenAI API: a prefill server (kv_producer) answers
max_tokens=1 and hands the prompt's KV to a decode server (kv_consumer), which loads it and
answers in full, with the same greedy tokens as a server that computed the prompt itself; its
/metrics count the loaded tokens. Through `p2p` behind the example proxy
(examples/disagg_proxy.py, streamed and not), and through `shared_storage`."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server.utils import MODEL_NAME, Server, free_port

PROMPT = list(range(40, 140))  # 100 token ids: 6 full blocks of 16 are loadable


def kv_flags(connector: str, role: str, **extra: Any) -> tuple[str, str]:
    config = {"kv_connector": connector, "kv_role": role, "kv_connector_extra_config": extra}
    return "--kv-transfer-config", json.dumps(config)


def body(max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **kw}


def complete(server: Server, max_tokens: int) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/v1/completions", json=body(max_tokens), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def load_proxy() -> Any:
    path = Path(__file__).parents[2] / "examples" / "disagg_proxy.py"
    spec = importlib.util.spec_from_file_location("disagg_proxy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_p2p_behind_the_proxy(server_factory: Callable[..., Server]) -> None:
    port = free_port()
    prefill = server_factory(*kv_flags("p2p", "kv_producer", kv_peer=f"127.0.0.1:{port}"))
    decode = server_factory(*kv_flags("p2p", "kv_consumer", kv_listen_port=port))
    proxy = TestClient(load_proxy().make_app(prefill.url, decode.url))
    answer = proxy.post("/v1/completions", json=body(8))
    assert answer.status_code == 200, answer.text
    streamed = proxy.post("/v1/completions", json=body(8, stream=True))
    assert streamed.status_code == 200
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    reference = complete(prefill, 8)["choices"][0]["text"]  # the prefill server computes it all
    assert answer.json()["choices"][0]["text"] == reference
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference
    metrics = decode.metrics()
    # Loaded once: the streamed request found the prompt in the decode server's prefix cache.
    assert metrics["hallm:kv_connector_tokens_loaded"] == 96
    assert metrics["hallm:prefix_cache_hits"] == 96
    assert metrics["hallm:kv_connector_load_failures"] == 0


@pytest.mark.slow  # two more servers: ~40 s
def test_shared_storage_between_servers(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    prefill = server_factory(*kv_flags("shared_storage", "kv_producer", shared_storage_path=str(tmp_path)))
    decode = server_factory(*kv_flags("shared_storage", "kv_consumer", shared_storage_path=str(tmp_path)))
    complete(prefill, 1)
    assert list(tmp_path.rglob("*.kvb"))
    answer = complete(decode, 8)
    assert answer["choices"][0]["text"] == complete(prefill, 8)["choices"][0]["text"]
    metrics = decode.metrics()
    assert metrics["hallm:kv_connector_tokens_loaded"] == 96
    assert metrics["hallm:kv_connector_load_failures"] == 0
