"""benchmarks/gpu_served.py end to end on the CPU (tiny model), and its covering tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_common import covering_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_covering_tokenizer_decodes_every_id_to_text() -> None:
    tok = covering_tokenizer(1000)
    assert len(tok) == 1000
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(1000)]
    assert texts[:3] == ["", "", ""]  # bos/eos/pad
    assert all(texts[3:]), [i for i, t in enumerate(texts) if not t and i >= 3]
    words = texts[259:]
    assert len(set(words)) == len(words)  # distinct tokens decode apart
    text = "served text, ünïcode 🙂"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def _processes_mentioning(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_gpu_served_cpu_tiny(tmp_path: Path) -> None:
    """Both paths run on the same model and workload, every served request streams text, the
    latencies are real, each path's step timeline is read from its debug log, and no server or
    engine process outlives the script."""
    cmd = [sys.executable, "benchmarks/gpu_served.py", "--model", "tiny", "--device", "cpu"]
    cmd += ["--num-prompts", "8", "--input-len", "32", "--output-len", "8", "--concurrency-1-prompts", "3"]
    cmd += ["--num-iters", "1", "--num-iters-warmup", "0", "--timeout", "120", "--out", str(tmp_path)]
    cmd += ["--timeline"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "served-tiny.json").read_text())
    assert json.loads((tmp_path / "served.jsonl").read_text().splitlines()[-1]) == rec

    assert rec["offline"]["output_tok_s"] > 0 and len(rec["offline"]["runs_s"]) == 1
    sat, c1 = rec["saturation"]["median_run"], rec["concurrency_1"]
    assert (sat["completed"], sat["failed"], sat["no_text_requests"]) == (8, 0, 0)
    assert (c1["completed"], c1["failed"], c1["no_text_requests"]) == (3, 0, 0)
    # the API process and the engine process froze their start-up heaps (hallm.core.server_gc)
    server_log = (tmp_path / "served-tiny-server.log").read_text()
    assert server_log.count("start-up objects out of the cycle collector") == 2, server_log[-3000:]
    for path in ("offline", "served"):  # the engine's step timeline of each path's last run
        tl = rec["timeline"][path]
        assert tl["requests"] == 8 and tl["prompt_steps"] >= 1, tl
        assert tl["decode_steps"] >= 6 and tl["decode_rows_p50"] >= 1, tl  # 8 tokens each
    for run in (sat, c1):
        assert run["output_tok_s"] > 0
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"]
        assert 0 < run["tpot_ms"]["p50"] <= run["tpot_ms"]["p99"]
        assert 0 < run["itl_ms"]["p50"] <= run["itl_ms"]["p99"]
    assert rec["served_over_offline_output_tok_s"] == sat["output_tok_s"] / rec["offline"]["output_tok_s"]
    assert rec["concurrency_1_tpot_ms"] == c1["tpot_ms"]
    # Both server processes worked during the timed runs (the engine computes every token).
    share = rec["saturation_cpu_share"]
    cores = (os.cpu_count() or 1) + 0.1
    assert 0 < share["api"] <= cores and 0 < share["engine"] <= cores, share

    model_dir = rec["commands"]["serve"].split(" serve ", 1)[1].split()[0]
    assert "--max-concurrency 1" in rec["commands"]["concurrency_1"]
    assert not Path(model_dir).exists()  # the temporary model directory is removed
    assert _processes_mentioning(model_dir) == []
