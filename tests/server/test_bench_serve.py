"""`hallm bench serve` against the test server: a tiny run completes and reports every metric."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hallm.benchmarks.serve import ServeBenchConfig, make_payloads, run_benchmark
from hallm.entrypoints.cli import main
from tests.server.utils import API_KEY, Server


def test_bench_serve_fixed_concurrency(server: Server) -> None:
    cfg = ServeBenchConfig(
        base_url=f"{server.url}/v1",
        num_prompts=6,
        input_len=16,
        output_len=4,
        range_ratio=0.5,
        max_concurrency=3,
        vocab_size=512,
        api_key=API_KEY,
    )
    result = asyncio.run(run_benchmark(cfg))
    assert (result.completed, result.failed) == (6, 0), result.errors
    assert result.total_output_tokens >= 6 * 2
    assert result.ttft_ms["p50"] > 0 and result.itl_ms["p99"] > 0 and result.tpot_ms["mean"] > 0
    assert result.request_throughput > 0 and result.output_throughput > 0
    report = result.report()
    for line in ("Median TTFT (ms):", "P99 ITL (ms):", "Mean TPOT (ms):", "Output token throughput (tok/s):"):
        assert line in report


def test_bench_serve_cli_poisson_chat(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--base-url", f"{server.url}/v1", "--api-key", API_KEY, "--endpoint", "chat"]
    argv += ["--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--request-rate", "20"]
    argv += ["--temperature", "0.7", "--output-json", str(out)]
    assert main(argv) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert (
        data["completed"] == 4 and data["config"]["endpoint"] == "chat" and data["config"]["api_key"] is None
    )
    assert data["config"]["temperature"] == 0.7


@contextlib.asynccontextmanager
async def _sse_server(chunks: list[dict[str, object]], delay_s: float) -> AsyncIterator[tuple[Any, str]]:
    """(an aiohttp session, a completions URL) whose server streams `chunks` as SSE, the first
    after `delay_s`."""
    import aiohttp
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(delay_s)
        for obj in chunks:
            await resp.write(f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}/v1/completions"
    finally:
        await runner.cleanup()


def test_bench_serve_request_without_text_is_timed_at_first_chunk() -> None:
    """A stream whose chunks carry no text (ids the tokenizer cannot spell) gets the time to its
    first chunk as TTFT, never 0, and is counted in the report."""
    from hallm.benchmarks.serve import ServeBenchResult, _one, _stats

    empty = [{"choices": [{"index": 0, "text": ""}]} for _ in range(3)]
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}

    async def go() -> tuple[object, object]:
        async with _sse_server([*empty, usage], 0.05) as (session, url):
            silent = await _one(session, url, {"prompt": [1, 2, 3, 4]}, False)
        texted = [{"choices": [{"index": 0, "text": "a"}]}, usage]
        async with _sse_server(texted, 0.05) as (session, url):
            spoken = await _one(session, url, {"prompt": [1, 2, 3, 4]}, False)
        return silent, spoken

    silent, spoken = asyncio.run(go())
    assert silent.ok and silent.no_text and silent.output_tokens == 3  # type: ignore[attr-defined]
    assert 0.05 <= silent.ttft <= silent.latency  # type: ignore[attr-defined]
    assert spoken.ok and not spoken.no_text and spoken.ttft >= 0.05  # type: ignore[attr-defined]
    result = ServeBenchResult(
        config={"base_url": "http://x/v1", "endpoint": "completions", "request_rate": "inf", "max_concurrency": None},
        duration_s=1.0, completed=1, failed=0, total_input_tokens=4, total_output_tokens=3,
        request_throughput=1.0, output_throughput=3.0, total_token_throughput=7.0,
        ttft_ms=_stats([silent.ttft]), tpot_ms=_stats([]), itl_ms=_stats([]), errors=[],  # type: ignore[attr-defined]
        no_text_requests=1,
    )  # fmt: skip
    assert result.ttft_ms["p50"] >= 50.0
    assert "Requests with no text" in result.report()


def test_bench_serve_payloads_carry_temperature() -> None:
    cfg = ServeBenchConfig(num_prompts=3, input_len=5, output_len=2, temperature=0.7, vocab_size=512)
    bodies = make_payloads(cfg, "m")
    assert [b["temperature"] for b in bodies] == [0.7] * 3
    assert all(len(b["prompt"]) == 5 and b["ignore_eos"] for b in bodies)


def test_bench_serve_text_with_unicode_line_separators() -> None:
    """Generated text may hold U+2028, U+0085 or U+001C, which JSON strings carry unescaped (as
    the server's msgspec writes them): the client splits events on CR/LF only, in whatever pieces
    the bytes arrive."""
    from hallm.benchmarks.serve import _one, _sse_data

    texts = ["a\u2028b", "\x85", "c\x1cd\u2029", "\r"]
    chunks: list[dict[str, object]] = [{"choices": [{"index": 0, "text": t}]} for t in texts]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}})
    events = [f"data: {json.dumps(obj, ensure_ascii=False)}\r\n\r\n".encode() for obj in chunks]
    body = b"".join(events) + b"data: [DONE]"  # the last line without its end

    async def pieces(size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(body), size):
            yield body[i : i + size]

    async def collect(size: int) -> list[bytes]:
        return [data async for data in _sse_data(pieces(size))]

    expected = [e.strip()[len(b"data: ") :] for e in events] + [b"[DONE]"]
    for size in (1, 7, len(body)):
        assert asyncio.run(collect(size)) == expected

    async def go() -> object:
        async with _sse_server(chunks, 0.0) as (session, url):
            return await _one(session, url, {"prompt": [1, 2]}, False)

    result = asyncio.run(go())
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert result.output_tokens == 4 and len(result.itl) == 3  # type: ignore[attr-defined]


def test_env_route_reads_proxy_and_netrc_once_as_trust_env_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client looks up the environment's proxy and ~/.netrc once (aiohttp's `trust_env` did
    it on a worker thread for every request); the decisions are trust_env's."""
    from hallm.benchmarks.serve import env_route

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine bench.example login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))

    assert env_route("http://other.example:8000/v1", None) == {}
    route = env_route("http://bench.example:8000/v1", None)
    assert (route["auth"].login, route["auth"].password) == ("alice", "s3cret")
    assert "auth" not in env_route("http://bench.example:8000/v1", "key")  # the API key's header wins

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    route = env_route("http://other.example:8000/v1", None)
    assert str(route["proxy"]) == "http://proxy.example:3128" and route["proxy_auth"] is None
    monkeypatch.setenv("NO_PROXY", "other.example")
    assert "proxy" not in env_route("http://other.example:8000/v1", None)
