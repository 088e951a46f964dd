"""benchmarks/api_process.py end to end: the real `hallm serve` API process with the stand-in
engine, driven by `hallm bench serve`, both variants (a few small requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.api_process import ideal_steps

ROOT = Path(__file__).resolve().parents[2]


def test_ideal_steps_counts_admission_and_generation() -> None:
    assert ideal_steps(1, 5, per_step=8, max_seqs=256) == 5
    assert ideal_steps(16, 4, per_step=8, max_seqs=256) == 5  # the second 8 start a step later
    assert ideal_steps(4, 3, per_step=8, max_seqs=2) == 6  # two at a time


def test_api_process_benchmark_runs_both_variants(tmp_path: Path) -> None:
    out = tmp_path / "api.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks/api_process.py"), "--num-prompts", "12"]
    cmd += ["--input-len", "32", "--output-len", "6", "--step-ms", "5", "--iters", "1", "--warmup-iters", "0"]
    cmd += ["--variants", "shipped,interpreter-gc", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    assert set(record["runs"]) == {"shipped", "interpreter-gc"}
    for runs in record["runs"].values():
        (run,) = runs
        assert run["requests_arrived"] == 12  # every request of the burst reached the engine
        assert run["steps"] >= record["ideal_steps"] == ideal_steps(12, 6, 8, 256)
        assert run["output_tok_s"] > 0 and run["api_cpu_us"] > 0
