"""Server lifecycle: SIGTERM lets in-flight streams finish and exits 0; a dead engine process
turns /health into a 503 (and requests into 503s) without taking the API process down."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from tests.server.utils import MODEL_NAME, Server, wait_until


def test_sigterm_finishes_in_flight_and_exits_0(server_factory: Callable[..., Server]) -> None:
    server = server_factory()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    first_chunk = threading.Event()
    result: dict[str, Any] = {}

    def stream() -> None:
        chunks = client.completions.create(
            model=MODEL_NAME,
            prompt="Once upon a time",
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text = ""
        for chunk in chunks:
            first_chunk.set()
            text += "".join(c.text for c in chunk.choices)
            result["finish"] = next(
                (c.finish_reason for c in chunk.choices if c.finish_reason), result.get("finish")
            )
            result["usage"] = chunk.usage or result.get("usage")
        result["text"] = text

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_chunk.wait(60), server.log()
    server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result.get("finish") == "length", (result, server.log())
    assert result["usage"].completion_tokens == 24
    assert server.terminate(timeout=60) == 0, server.log()
    assert "Shutting down" in server.log()
    # The port is closed and the engine process is gone.
    try:
        httpx.get(f"{server.url}/health", timeout=2)
        raise AssertionError("the server still answers after exiting")
    except httpx.TransportError:
        pass
    assert not _alive(server.engine_pid())


def test_small_kv_cache_then_engine_dies(server_factory: Callable[..., Server]) -> None:
    """A 12-block KV cache (11 usable: 176 tokens) refuses what could never fit, with a 400; then
    the engine process is killed: /health is 503, requests are 503, SIGTERM still exits 0."""
    server = server_factory("--num-gpu-blocks-override", "12")
    url = f"{server.url}/v1/completions"
    resp = httpx.post(url, json={"model": MODEL_NAME, "prompt": [5] * 200, "max_tokens": 1}, timeout=30)
    assert resp.status_code == 400 and "KV-cache blocks" in resp.json()["error"]["message"]
    resp = httpx.post(url, json={"model": MODEL_NAME, "prompt": [5] * 100, "max_tokens": 100}, timeout=30)
    error = resp.json()["error"]
    assert (
        resp.status_code == 400
        and error["param"] == "max_tokens"
        and "can grow to 13 KV-cache blocks" in error["message"]
    )
    resp = httpx.post(url, json={"model": MODEL_NAME, "prompt": [5] * 100, "max_tokens": 2}, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 2

    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    os.kill(server.engine_pid(), signal.SIGKILL)

    resp = wait_until(
        lambda: (r := httpx.get(f"{server.url}/health", timeout=10)).status_code == 503 and r, timeout=10
    )
    error = resp.json()["error"]
    assert "engine" in error["message"] and "died" in error["message"]
    assert error["code"] == "engine_dead"

    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=30,
    )
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_dead"
    assert httpx.get(f"{server.url}/version", timeout=10).status_code == 200  # the API process lives on
    assert server.terminate(timeout=60) == 0, server.log()


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True
