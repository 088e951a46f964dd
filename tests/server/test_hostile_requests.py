"""Requests that make the server work hard never stop it from answering: /health stays fast, other
clients are served, SIGTERM still stops it. (Loopback only; the bodies are bounded.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.server.utils import MODEL_NAME, Server

# Two nested loops of 1e5: 1e10 template steps, hours of rendering.
HOSTILE_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE_CHAT = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 2,
    "chat_template": HOSTILE_TEMPLATE,
}


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def health_latencies(server: Server, while_alive: threading.Thread, at_least: float = 1.5) -> list[float]:
    """Time /health repeatedly while `while_alive` runs (and for at least `at_least` seconds)."""
    latencies = []
    start = time.monotonic()
    while while_alive.is_alive() or time.monotonic() - start < at_least:
        t0 = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
        if time.monotonic() - start > 60:
            break
    return latencies


@pytest.fixture(scope="module")
def trusting_server(server_factory: Callable[..., Server]) -> Server:
    return server_factory(
        "--trust-request-chat-template", "--request-work-timeout", "2", "--shutdown-timeout", "5"
    )


def test_request_chat_template_is_refused_by_default(server: Server) -> None:
    resp = httpx.post(
        f"{server.url}/v1/chat/completions", json=HOSTILE_CHAT, headers=server.headers, timeout=30
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    # Renderer arguments smuggled in as template variables are refused too.
    body = {
        **HOSTILE_CHAT,
        "chat_template": None,
        "chat_template_kwargs": {"chat_template": HOSTILE_TEMPLATE},
    }
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "chat_template_kwargs", resp.text


def test_hostile_template_times_out_while_health_answers(trusting_server: Server) -> None:
    server = trusting_server
    thread, result = in_background(
        lambda: httpx.post(f"{server.url}/v1/chat/completions", json=HOSTILE_CHAT, timeout=60)
    )
    latencies = health_latencies(server, thread)
    thread.join(60)
    (resp,) = result
    assert resp.status_code == 408, resp.text
    assert "chat template" in resp.json()["error"]["message"]
    assert max(latencies) < 1.0, latencies
    # The server still serves (the stuck render was stopped, not left running).
    ok = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2},
        timeout=30,
    )
    assert ok.status_code == 200, ok.text


def test_huge_tokenize_body_does_not_stall_the_server(server: Server) -> None:
    prompt = "hello world " * (10 * 2**20 // 12)  # 10 MB of text
    thread, result = in_background(
        lambda: httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}, timeout=60)
    )
    latencies = health_latencies(server, thread)
    thread.join(60)
    (resp,) = result
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert max(latencies) < 1.0, latencies


def test_body_over_the_limit_is_413(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--max-request-body-bytes", "1000")
    resp = httpx.post(f"{server.url}/tokenize", json={"prompt": "x" * 2000}, timeout=30)
    assert resp.status_code == 413 and "1000 bytes" in resp.json()["error"]["message"], resp.text
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}, timeout=30).status_code == 200
    assert server.terminate(timeout=60) == 0


def test_sigterm_stops_the_server_during_a_hostile_render(trusting_server: Server) -> None:
    server = trusting_server
    thread, _ = in_background(
        lambda: httpx.post(f"{server.url}/v1/chat/completions", json=HOSTILE_CHAT, timeout=60)
    )
    time.sleep(0.5)
    assert thread.is_alive()  # the render is in progress
    assert server.terminate(timeout=30) == 0
