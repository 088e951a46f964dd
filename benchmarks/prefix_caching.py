"""Issue 4's benchmark: automatic prefix caching on vs off, in one process, on the same prompts.

1. Shared prefixes: `--num-prefixes` (10) random prefixes of `--prefix-len` (512) tokens, each
   followed by `--suffix-len` (64) unique tokens, `--requests-per-prefix` (4) requests per
   prefix, every request producing `--output-len` (64) tokens (greedy, ignore_eos), all submitted
   in one `generate` call in a seeded shuffled order. Throughput = (prompt + output tokens) /
   time. Target: >= 2x with caching on.
2. No shared prefix (0% hit rate): `--overhead-prompts` unique random prompts. Target: <= 3%
   overhead with caching on.

Both engines (caching on and off) are loaded side by side and every workload runs
`--*-repeats` times on each, alternating which engine goes first; the caching engine's cache is
reset before each run, so only hits within a run count. Each run is timed twice: wall time, and
the process's CPU time (all threads). On a machine shared with other jobs the wall time of one
run can swing several-fold while its CPU time barely moves, so the ratios are given for both,
as medians over the repeats. The time spent in the scheduler (where all of caching's
bookkeeping, hashing included, runs) is reported as a share of the CPU time as well.

Before timing, every page of both engines' KV pools is faulted in (`fault_in_kv_pool`), so
that neither pays the host's first-touch page faults inside a timed run; `--cold-pool` skips
that and shows the once-per-pool cost, which falls on the caching engine (it keeps cached
blocks and hands out never-used ones first).

Greedy outputs of the two engines are compared too (reported, not asserted: their batches
differ, and float results may differ in the last bits with the batch shape).

    .venv/bin/python benchmarks/prefix_caching.py [--threads 1] [--model PATH] [--output-json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from typing import Any

ON, OFF = "caching on", "caching off"
_ids = itertools.count()


def shared_prefix_workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    low = min(100, vocab // 2)  # skip the lowest ids (special tokens in most vocabularies)
    prefixes = [[rng.randrange(low, vocab) for _ in range(args.prefix_len)] for _ in range(args.num_prefixes)]
    prompts = [
        p + [rng.randrange(low, vocab) for _ in range(args.suffix_len)]
        for p in prefixes
        for _ in range(args.requests_per_prefix)
    ]
    rng.shuffle(prompts)
    return prompts


def unique_workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed + 1)
    low = min(100, vocab // 2)
    return [
        [rng.randrange(low, vocab) for _ in range(args.overhead_input_len)]
        for _ in range(args.overhead_prompts)
    ]


class SchedulerTimer:
    """Accumulates the CPU time spent in the engine's scheduler (schedule + update)."""

    def __init__(self, llm: Any) -> None:
        self.seconds = 0.0
        sched = llm.engine.scheduler
        for name in ("schedule", "update"):
            setattr(sched, name, self._timed(getattr(sched, name)))

    def _timed(self, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.thread_time() - t

        return wrapper


def timed_generate(
    llm: Any, timer: SchedulerTimer, prompts: list[list[int]], output_len: int
) -> dict[str, Any]:
    """Run every prompt to completion, as `LLM.generate` does (all queued, then stepped), also
    timing the prefill phase: until every request has its first token."""
    from hallm.core.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len)
    llm.reset_prefix_cache()  # start cold: only hits within this run count (stats reset too)
    ids = [f"bench-{next(_ids)}" for _ in prompts]
    sched_before = timer.seconds
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    done: dict[str, Any] = {}
    prefill_wall = prefill_cpu = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if prefill_wall is None and all(r.num_output_tokens > 0 for r in engine.scheduler.requests.values()):
            prefill_wall, prefill_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    outs = [done[rid] for rid in ids]
    stats = engine.get_stats()
    tokens = sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "prefill_phase_wall_s": prefill_wall,
        "prefill_phase_cpu_s": prefill_cpu,
        "scheduler_cpu_s": timer.seconds - sched_before,
        "total_tokens": tokens,
        "tok_per_wall_s": tokens / wall,
        "tok_per_cpu_s": tokens / cpu,
        "hit_rate": stats["prefix_cache_hit_rate"],
        "tokens_saved": stats["prefix_cache_tokens_saved"],
        "evictions": stats["prefix_cache_evictions"],
        "num_preemptions": stats["num_preemptions"],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
    }


def fault_in_kv_pool(llm: Any) -> None:
    """Touch every page of the engine's KV pool once (in-process executors only).

    The pool is allocated with torch.empty, so on the host a block's pages are faulted in (and
    zeroed by the kernel) the first time it is written. With caching off a freed block goes back
    to the head of the free queue and is reused hot; with caching on it joins the LRU tail and
    the next allocations take never-used blocks first, so a timed run would pay first-touch
    faults that the other engine never does: a once-per-pool cost, not caching's steady state.
    """
    runner = getattr(getattr(getattr(llm.engine, "executor", None), "worker", None), "runner", None)
    for cache in getattr(runner, "kv_caches", None) or []:
        cache.zero_()


def run_pairs(
    engines: dict[str, Any],
    timers: dict[str, SchedulerTimer],
    prompts: list[list[int]],
    output_len: int,
    repeats: int,
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {ON: [], OFF: []}
    for r in range(repeats):
        for name in (OFF, ON) if r % 2 == 0 else (ON, OFF):
            res = timed_generate(engines[name], timers[name], prompts, output_len)
            runs[name].append(res)
            print(
                f"  {name:<12} wall {res['wall_s']:7.1f} s ({res['tok_per_wall_s']:7.1f} tok/s)  "
                f"cpu {res['cpu_s']:7.1f} s ({res['tok_per_cpu_s']:7.1f} tok/cpu-s)  "
                f"prefill phase cpu {res['prefill_phase_cpu_s']:6.1f} s  "
                f"hit rate {res['hit_rate']:5.1%}  saved {res['tokens_saved']:6d} tok  "
                f"scheduler {res['scheduler_cpu_s'] / res['cpu_s']:.3%} of cpu",
                flush=True,
            )
    return runs


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the repeats of on/off time ratios (per pair), wall and CPU."""
    wall = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[ON], runs[OFF], strict=True)]
    cpu = [a["cpu_s"] / b["cpu_s"] for a, b in zip(runs[ON], runs[OFF], strict=True)]
    prefill = [
        a["prefill_phase_cpu_s"] / b["prefill_phase_cpu_s"] for a, b in zip(runs[ON], runs[OFF], strict=True)
    ]
    same = sum(a == b for a, b in zip(runs[ON][0]["token_ids"], runs[OFF][0]["token_ids"], strict=True))
    return {
        "time_ratio_wall": wall,
        "time_ratio_cpu": cpu,
        "median_time_ratio_wall": statistics.median(wall),
        "median_time_ratio_cpu": statistics.median(cpu),
        "median_prefill_phase_ratio_cpu": statistics.median(prefill),
        "scheduler_share_of_cpu": {
            k: statistics.median(r["scheduler_cpu_s"] / r["cpu_s"] for r in v) for k, v in runs.items()
        },
        "identical_outputs": same,
        "requests": len(runs[ON][0]["token_ids"]),
        "runs": {
            k: [{kk: vv for kk, vv in r.items() if kk != "token_ids"} for r in v] for k, v in runs.items()
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (real weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--num-prefixes", type=int, default=10)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--requests-per-prefix", type=int, default=4)
    p.add_argument("--shared-repeats", type=int, default=1)
    p.add_argument("--overhead-prompts", type=int, default=8)
    p.add_argument("--overhead-input-len", type=int, default=256)
    p.add_argument("--overhead-output-len", type=int, default=32)
    p.add_argument("--overhead-repeats", type=int, default=5)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cold-pool",
        action="store_true",
        help="leave the KV pools' pages untouched until first use (default: fault them all in first)",
    )
    p.add_argument("--skip-shared", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    longest = max(
        args.prefix_len + args.suffix_len + args.output_len,
        args.overhead_input_len + args.overhead_output_len,
    )
    # Room for every request of either workload at full length: nothing is evicted or preempted.
    most = max(args.num_prefixes * args.requests_per_prefix, args.overhead_prompts)
    num_blocks = most * -(-longest // args.block_size) + 1
    common = dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=-(-longest // 256) * 256,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_gpu_blocks_override=num_blocks,
    )
    t = time.perf_counter()
    engines = {name: LLM(enable_prefix_caching=name == ON, **common) for name in (ON, OFF)}
    timers = {name: SchedulerTimer(llm) for name, llm in engines.items()}
    config = engines[ON].engine.config
    vocab = int(config.model.hf_config.vocab_size)
    warm = [[1] * (longest - 8), [2] * 8]  # first-call costs, on tokens no workload uses
    for llm in engines.values():
        llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        if not args.cold_pool:
            fault_in_kv_pool(llm)
    print(
        f"model {config.model.served_model_name} ({config.model.dtype}), device {args.device}, "
        f"torch threads {torch.get_num_threads()}, {num_blocks} KV blocks of {args.block_size} "
        f"({'cold' if args.cold_pool else 'every page faulted in'}); "
        f"engines ready in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    report: dict[str, Any] = {"args": vars(args), "torch_threads": torch.get_num_threads()}

    if not args.skip_shared:
        prompts = shared_prefix_workload(args, vocab)
        print(
            f"\nShared prefixes: {args.num_prefixes} prefixes x {args.prefix_len} tokens, "
            f"{args.requests_per_prefix} requests each (+{args.suffix_len} unique tokens, "
            f"{args.output_len} output tokens): {len(prompts)} requests, {args.shared_repeats} repeat(s)",
            flush=True,
        )
        s = summary(run_pairs(engines, timers, prompts, args.output_len, args.shared_repeats))
        print(
            f"  speedup (throughput on / off): {1 / s['median_time_ratio_cpu']:.2f}x by CPU time, "
            f"{1 / s['median_time_ratio_wall']:.2f}x by wall time   (target >= 2x)\n"
            f"  prefill phase (until every request has a token) on / off: "
            f"{1 / s['median_prefill_phase_ratio_cpu']:.2f}x faster by CPU time\n"
            f"  greedy outputs identical on vs off: {s['identical_outputs']}/{s['requests']}",
            flush=True,
        )
        report["shared"] = s

    if not args.skip_overhead:
        prompts = unique_workload(args, vocab)
        print(
            f"\nNo shared prefix: {len(prompts)} unique prompts x {args.overhead_input_len} tokens, "
            f"{args.overhead_output_len} output tokens, {args.overhead_repeats} repeat(s)",
            flush=True,
        )
        s = summary(run_pairs(engines, timers, prompts, args.overhead_output_len, args.overhead_repeats))
        assert all(r["hit_rate"] == 0.0 for r in s["runs"][ON])
        share = s["scheduler_share_of_cpu"]
        print(
            f"  time ratios on/off per pair: cpu {', '.join(f'{x:.3f}' for x in s['time_ratio_cpu'])}; "
            f"wall {', '.join(f'{x:.3f}' for x in s['time_ratio_wall'])}\n"
            f"  overhead (median ratio - 1): {s['median_time_ratio_cpu'] - 1:+.1%} by CPU time, "
            f"{s['median_time_ratio_wall'] - 1:+.1%} by wall time   (target <= 3%)\n"
            f"  scheduler share of CPU time: on {share[ON]:.3%}, off {share[OFF]:.3%}",
            flush=True,
        )
        report["overhead"] = s

    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
