"""`hallm bench serve` against the test server: a tiny run completes and reports every metric."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

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


def _sse_client(chunks: list[dict[str, object]], delay_s: float, split: int | None = None) -> object:
    """An httpx client whose server streams `chunks` as SSE, the first after `delay_s` (with
    `split`, the whole body in pieces of that many bytes)."""
    import httpx

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            await asyncio.sleep(delay_s)
            events = [f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode() for obj in chunks]
            events.append(b"data: [DONE]\n\n")
            if split is None:
                for event in events:
                    yield event
            else:
                body = b"".join(events)
                for i in range(0, len(body), split):
                    yield body[i : i + split]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_bench_serve_request_without_text_is_timed_at_first_chunk() -> None:
    """A stream whose chunks carry no text (ids the tokenizer cannot spell) gets the time to its
    first chunk as TTFT, never 0, and is counted in the report."""
    from hallm.benchmarks.serve import ServeBenchResult, _one, _stats

    empty = [{"choices": [{"index": 0, "text": ""}]} for _ in range(3)]
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}

    async def go() -> tuple[object, object]:
        async with _sse_client([*empty, usage], 0.05) as client:  # type: ignore[attr-defined]
            silent = await _one(client, "http://x/v1/completions", {"prompt": [1, 2, 3, 4]}, False)
        texted = [{"choices": [{"index": 0, "text": "a"}]}, usage]
        async with _sse_client(texted, 0.05) as client:  # type: ignore[attr-defined]
            spoken = await _one(client, "http://x/v1/completions", {"prompt": [1, 2, 3, 4]}, False)
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
    from hallm.benchmarks.serve import _one

    texts = ["a\u2028b", "\x85", "c\x1cd\u2029", "\r"]
    chunks: list[dict[str, object]] = [{"choices": [{"index": 0, "text": t}]} for t in texts]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}})

    async def go(split: int | None) -> object:
        async with _sse_client(chunks, 0.0, split) as client:  # type: ignore[attr-defined]
            return await _one(client, "http://x/v1/completions", {"prompt": [1, 2]}, False)

    for split in (None, 1, 7):
        result = asyncio.run(go(split))
        assert result.ok, result.error  # type: ignore[attr-defined]
        assert result.output_tokens == 4 and len(result.itl) == 3  # type: ignore[attr-defined]
