"""`hallm bench serve` against the test server: a tiny run completes and reports every metric."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hallm.benchmarks.serve import ServeBenchConfig, run_benchmark
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
    argv += ["--output-json", str(out)]
    assert main(argv) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert (
        data["completed"] == 4 and data["config"]["endpoint"] == "chat" and data["config"]["api_key"] is None
    )
