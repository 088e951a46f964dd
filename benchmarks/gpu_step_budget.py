"""Offline throughput by step budget (`max_num_batched_tokens`) on a prefill-heavy workload, and
who sets the pace: the host or the device.

    python3 benchmarks/gpu_step_budget.py [--model qwen2.5-0.5b] [--budgets 2048,8192,16384]

For each budget, in its own process (one engine at a time on the device): the served benchmark's
workload (`--num-prompts` random prompts of `--input-len` token ids, `--output-len` tokens each,
temperature 1, no prefix caching), one untimed run, then `--num-iters` timed runs (median), in each
the time the host spent blocked on the device's results (`InFlightSteps.resolve_until`): a small
share means the host, not the device, set the step rate. One more run under torch.profiler (CUDA
activity only) sums the kernels' time: the device's busy share of that run, and the kernels
that took the most. Prints a table, one row per budget, and appends the record to
OUT/step-budget.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, environment, write_model_dir


def measure(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """One budget, in this process."""
    import random

    import torch

    from hallm.core.sampling_params import SamplingParams
    from hallm.core.step_handle import InFlightSteps
    from hallm.entrypoints.llm import LLM

    model_dir = write_model_dir(args.model, Path(tempfile.mkdtemp(prefix="hallm-budget-")) / args.model)
    llm = LLM(
        model=str(model_dir),
        device=args.device,
        load_format="dummy",
        dtype="bfloat16" if args.device == "cuda" else "float32",
        max_model_len=args.input_len + args.output_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=budget,
        enable_prefix_caching=False,
        seed=0,
    )
    rng = random.Random(0)
    vocab = int(llm.engine.config.model.hf_config.vocab_size)
    prompts = [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
        for _ in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    waited = [0.0]
    resolve = InFlightSteps.resolve_until

    def timed_resolve(self: Any, handle: Any) -> None:
        t0 = time.perf_counter()
        resolve(self, handle)
        waited[0] += time.perf_counter() - t0

    llm.generate(prompts, params, use_tqdm=False)  # untimed: first-run costs
    runs, waits = [], []
    InFlightSteps.resolve_until = timed_resolve  # type: ignore[method-assign]
    try:
        for _ in range(args.num_iters):
            sync()
            waited[0] = 0.0
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            sync()
            runs.append(time.perf_counter() - t0)
            waits.append(waited[0])
    finally:
        InFlightSteps.resolve_until = resolve  # type: ignore[method-assign]
    out: dict[str, Any] = {
        "budget": budget,
        "runs_s": runs,
        "output_tok_s": args.num_prompts * args.output_len / statistics.median(runs),
        "host_wait_share": statistics.median(w / r for w, r in zip(waits, runs, strict=True)),
    }
    if args.host_profile:
        import cProfile
        import io
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        prof_host.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof_host, stream=text)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        out["host_profile"] = text.getvalue()
    if args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            sync()
            wall_us = (time.perf_counter() - t0) * 1e6
        kernels: dict[str, float] = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
                kernels[ev.name[:100]] += ev.device_time
        out["profiled_wall_s"] = wall_us / 1e6
        out["kernel_busy_share"] = sum(kernels.values()) / wall_us
        out["top_kernels_ms"] = {
            k: v / 1e3 for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budgets", default="2048,8192,16384")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--top", type=int, default=8, help="kernels listed per budget")
    p.add_argument("--host-profile", action="store_true", help="also cProfile one run of each budget")
    p.add_argument("--out", default="benchmarks/results/raw")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one budget
    args = p.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(measure(args, args.one)), flush=True)
        return 0
    results = []
    for budget in (int(b) for b in args.budgets.split(",")):
        cmd = [sys.executable, *sys.argv, "--one", str(budget)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"budget {budget} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    base = results[0]["output_tok_s"]
    print(
        f"\n{args.model} on {args.device}: {args.num_prompts} x {args.input_len} in / {args.output_len} out, "
        f"median of {args.num_iters}"
    )
    print(f"{'budget':>7} {'tok/s':>9} {'vs first':>8} {'host waited':>11} {'GPU busy':>9}")
    for r in results:
        busy = f"{r['kernel_busy_share']:.0%}" if "kernel_busy_share" in r else "-"
        print(
            f"{r['budget']:7d} {r['output_tok_s']:9.0f} {r['output_tok_s'] / base:8.2f} "
            f"{r['host_wait_share']:11.0%} {busy:>9}"
        )
    for r in results:
        if "top_kernels_ms" in r:
            print(f"\nbudget {r['budget']}: kernels of the profiled run ({r['profiled_wall_s']:.2f} s), ms")
            for name, ms in r["top_kernels_ms"].items():
                print(f"{ms:9.1f}  {name}")
    for r in results:
        if "host_profile" in r:
            print(f"\nbudget {r['budget']}: cProfile of one run\n{r.pop('host_profile')}")
    record = {"benchmark": "step-budget", "model": args.model, "env": environment(), "results": results}
    append_jsonl(Path(args.out) / "step-budget.jsonl", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
