"""`hallm bench throughput`: warm-up runs reported apart, repeated timed runs (median, spread),
and the text-vs-ids comparison in one process on the same requests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hallm.entrypoints.cli import main


def test_bench_throughput_repeats_and_compares_text_with_ids(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    argv = ["bench", "throughput", str(tiny_model_dir("llama")), "--device", "cpu"]
    argv += ["--dtype", "float32", "--max-model-len", "64", "--num-prompts", "4", "--input-len", "8"]
    argv += ["--output-len", "4", "--num-iters", "3", "--num-iters-warmup", "1", "--compare-detokenize"]
    argv += ["--output-json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Throughput (text):" in printed and "Throughput (ids):" in printed
    assert "median of 3 runs" in printed and "First run of the process (text)" in printed
    assert "text/ids throughput:" in printed
    text, ids = json.loads(out.read_text())
    for r in (text, ids):
        assert len(r["runs_s"]) == 3 and r["first_run_s"] > 0
        assert sorted(r["runs_s"])[1] == r["elapsed_s"]
        assert r["output_tokens"] == 4 * 4 and r["num_requests"] == 4
    assert (text["label"], ids["label"]) == ("text", "ids")


def test_bench_throughput_rejects_zero_iterations(tiny_model_dir: Callable[[str], Path]) -> None:
    argv = ["bench", "throughput", str(tiny_model_dir("llama")), "--device", "cpu"]
    argv += ["--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--num-iters", "0"]
    with pytest.raises(ValueError, match="num_iters"):
        main(argv)
