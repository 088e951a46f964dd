"""Two checkouts of hallm against each other on the CPU: the decode step at batch 1 and 32.

For a change that must not move CPU speed (a refactor), this builds both trees' engines in the
same run and alternates them, round after round, so the machine's drift (other load, copy
bandwidth that moves by tens of percent within minutes) hits both alike. Each round runs each
tree's `--step` worker in its own subprocess (PYTHONPATH points at that tree); a worker loads
the model once and times decode steps of `batch` requests at a 128-token context:
(time of 1 + N output tokens - time of 1 output token) / N, in wall time and in the process's
CPU time (which other load on the machine moves far less; with --threads 1 there is no
spin-waiting either). It prints every round and the median step of each tree with the ratios
after / before.

    .venv/bin/python benchmarks/cpu_ab.py --before /tmp/before --after . [--model smollm2]
        [--dtypes float32,bfloat16] [--batches 1,32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def step_worker(model: str, dtype: str, batch: int, steps: int) -> None:
    from hallm import LLM, SamplingParams

    dummy = model != "smollm2"
    kwargs = {"load_format": "dummy", "skip_tokenizer_init": True} if dummy else {}
    llm = LLM(
        model=None if model == "smollm2" else model,
        device="cpu",
        dtype=dtype,
        max_model_len=512,
        max_num_seqs=batch,
        seed=0,
        **kwargs,
    )
    prompts = [{"prompt_token_ids": [(7 * i + 13 * r) % 1000 + 10 for i in range(128)]} for r in range(batch)]

    def timed(n: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        params = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, time.process_time() - c

    timed(4)  # warm-up
    prefill = min(timed(1) for _ in range(2))
    run = timed(1 + steps)
    print(
        json.dumps(
            {"step_ms": (run[0] - prefill[0]) / steps * 1e3, "cpu_ms": (run[1] - prefill[1]) / steps * 1e3}
        )
    )


def run_tree(
    tree: Path, model: str, dtype: str, batch: int, steps: int, threads: int | None
) -> dict[str, float]:
    paths = [tree, tree / "plugins" / "cpu", tree / "plugins" / "cuda"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p.resolve()) for p in paths)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", model, dtype, str(batch), str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path)
    p.add_argument("--after", type=Path, default=Path("."))
    p.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF) or a model directory")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the workers (default: torch's)")
    p.add_argument("--step", nargs=4, metavar=("MODEL", "DTYPE", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        model, dtype, batch, steps = args.step
        step_worker(model, dtype, int(batch), int(steps))
        return
    if args.before is None:
        p.error("--before DIR is required (a checkout of the baseline, e.g. from `git worktree add`)")
    results = []
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            times: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for label in order:
                    tree = args.before if label == "before" else args.after
                    times[label].append(run_tree(tree, args.model, dtype, batch, args.steps, args.threads))
                print(
                    f"{dtype} batch {batch} round {r}: "
                    + ", ".join(
                        f"{k} {v[-1]['step_ms']:.2f} ms (cpu {v[-1]['cpu_ms']:.2f})" for k, v in times.items()
                    ),
                    flush=True,
                )
            row: dict[str, Any] = {
                "model": args.model,
                "dtype": dtype,
                "batch": batch,
                "threads": args.threads,
            }
            for metric in ("step_ms", "cpu_ms"):
                before = statistics.median(t[metric] for t in times["before"])
                after = statistics.median(t[metric] for t in times["after"])
                row[f"before_{metric}"], row[f"after_{metric}"] = before, after
                row[f"after_over_before_{metric}"] = after / before
            results.append(row)
            print(json.dumps(row), flush=True)
    print(
        "| dtype | batch | before step ms | after step ms | after / before | before CPU ms | after CPU ms | after / before |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['dtype']} | {row['batch']} | {row['before_step_ms']:.2f} | {row['after_step_ms']:.2f} | "
            f"{row['after_over_before_step_ms']:.3f} | {row['before_cpu_ms']:.2f} | {row['after_cpu_ms']:.2f} | "
            f"{row['after_over_before_cpu_ms']:.3f} |"
        )


if __name__ == "__main__":
    main()
