"""Where a decode step's GPU time goes: the kernels of one captured decode-graph replay.

    python3 benchmarks/gpu_step_profile.py [--model qwen2.5-0.5b] [--batches 1,32] [--out DIR]
                                           [--engine]

Builds the engine on the CUDA plugin with dummy weights (bf16, graphs on), decodes a few tokens
at ~1k context so every batch size's graph is captured and warm, then profiles replays of the
graph with torch.profiler (CUPTI reports each kernel of a replayed graph). Prints, per batch
size, the replay's wall time (CUDA events), the summed kernel time, and a table of kernels by
name: launches per replay, mean and total microseconds. The difference between the wall time
and the kernel sum is the graph's launch gaps. Writes the tables to DIR/step-profile.jsonl.

--engine also profiles whole decode steps of ``LLM.generate`` (graph replay, logits, sampling,
copies, host work) and splits each step's period, from one replay's first kernel to the next's,
into GPU time inside the graph, GPU time outside it (a table of those kernels and copies), and
idle time, when the GPU waited for the host (with the ops on either side of each gap). Before
that it runs the same decode unprofiled and times how long the host waited for the device:
near zero means the host sets the step rate. --host prints a cProfile of 64 decode steps.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, environment, write_model_dir
from benchmarks.variants import VARIANTS
from benchmarks.variants import apply as apply_variant

REPLAYS = 10
ENGINE_STEPS = 24


def profile_batch(llm: Any, batch: int, ctx: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hallm.core.sampling_params import SamplingParams

    runner = llm.engine.executor.worker.runner
    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(ctx)]} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)
    # Again, from the prefix cache: every request now prefills one token in the same step and
    # decodes in lockstep, so the last step fills all `batch` rows of the graph's buffers. After
    # the first pass alone the last step held only the stragglers, and a direct replay of the
    # larger graph read the stale rows of an earlier prefill step (an illegal memory access).
    llm.generate(prompts, replace(params, max_tokens=2), use_tqdm=False)
    graphs = runner.graphs.decode if runner.graphs is not None else None
    if graphs is None or batch > graphs.max_size:
        raise RuntimeError(f"no decode graph for batch {batch}")
    g = graphs.graphs[int(graphs.bucket[batch])]
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    wall_us = start.elapsed_time(end) / REPLAYS * 1e3
    launch_us = []
    for _ in range(REPLAYS):  # the host's cost of one launch, on an idle GPU, not profiled
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        launch_us.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            g.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            kernels[ev.name].append(ev.device_time)
    rows = sorted(
        (
            {
                "kernel": name[:110],
                "per_replay": len(times) / REPLAYS,
                "mean_us": sum(times) / len(times),
                "total_us": sum(times) / REPLAYS,
            }
            for name, times in kernels.items()
        ),
        key=lambda r: -r["total_us"],
    )
    kernel_us = sum(r["total_us"] for r in rows)
    launches = sum(r["per_replay"] for r in rows)
    llm.reset_prefix_cache()
    return {
        "batch": batch,
        "ctx": ctx,
        "replay_us": wall_us,
        "host_launch_us": sorted(launch_us)[len(launch_us) // 2],
        "kernel_us": kernel_us,
        "launches": launches,
        "kernels": rows,
    }


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (PDL kernels overlap their neighbours)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def profile_host(llm: Any, batch: int, ctx: int, steps: int = 64) -> str:
    """cProfile of `steps` decode steps (at most the model length allows; not under the CUDA
    profiler): where the host's time goes."""
    import cProfile
    import io
    import pstats

    from hallm.core.sampling_params import SamplingParams

    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(ctx)]} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, detokenize=False)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    llm.reset_prefix_cache()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return out.getvalue()


def profile_engine(llm: Any, batch: int, ctx: int, temperature: float = 0.0) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hallm.core.sampling_params import SamplingParams
    from hallm.core.step_handle import InFlightSteps

    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(ctx)]} for _ in range(batch)]
    params = SamplingParams(
        temperature=temperature, max_tokens=1 + ENGINE_STEPS, ignore_eos=True, detokenize=False
    )
    llm.generate(prompts, params, use_tqdm=False)  # prefill; the prompts stay in the prefix cache
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    # Unprofiled: how long the host waited for the device. Near zero means the host, not the GPU,
    # sets the step rate.
    waited = [0.0]
    resolve = InFlightSteps.resolve_until

    def timed_resolve(self: Any, handle: Any) -> None:
        t0 = time.perf_counter()
        resolve(self, handle)
        waited[0] += time.perf_counter() - t0

    InFlightSteps.resolve_until = timed_resolve  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        plain_us = (time.perf_counter() - start) * 1e6
    finally:
        InFlightSteps.resolve_until = resolve  # type: ignore[method-assign]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    trace_path = Path(tempfile.mkdtemp(prefix="hallm-trace-")) / "trace.json"
    prof.export_chrome_trace(str(trace_path))
    events = json.loads(trace_path.read_text())["traceEvents"]
    launcher = {
        e["args"]["correlation"]: e["name"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    gpu = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    # A replay's kernels share the correlation id of their cudaGraphLaunch.
    replay_starts: list[float] = []
    seen: set[int] = set()
    for e in gpu:
        corr = e["args"].get("correlation")
        if launcher.get(corr) == "cudaGraphLaunch" and corr not in seen:
            seen.add(corr)
            replay_starts.append(e["ts"])
    if len(replay_starts) < 4:
        raise RuntimeError(f"only {len(replay_starts)} graph replays in the profile of batch {batch}")
    # Middle periods only: the first and last steps carry the request's admission and finish.
    periods = list(itertools.pairwise(replay_starts[1:-1]))
    outside: dict[str, list[float]] = collections.defaultdict(list)
    inside_kernels: dict[str, list[float]] = collections.defaultdict(list)
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    graph_busy = outside_busy = idle = 0.0
    for lo, hi in periods:
        inside, other, ops = [], [], []
        for e in gpu:
            if lo <= e["ts"] < hi:
                span = (e["ts"], min(e["ts"] + e["dur"], hi))
                ops.append((span, e))
                if launcher.get(e["args"].get("correlation")) == "cudaGraphLaunch":
                    inside.append(span)
                    inside_kernels[e["name"][:110]].append(e["dur"])
                else:
                    other.append(span)
                    outside[e["name"][:110]].append(e["dur"])
        busy = _busy_us(inside + other)
        graph_busy += _busy_us(inside)
        outside_busy += busy - _busy_us(inside)
        idle += (hi - lo) - busy
        # Where the GPU idled: the op it waited for, named with the host call that issued it.
        reach, before = lo, "replay"
        for (start, end), e in ops:
            if start - reach > 2.0:
                after = f"{launcher.get(e['args'].get('correlation'), '?')}: {e['name'][:60]}"
                gaps[f"after {before[:60]} -> before {after}"].append(start - reach)
            if end > reach:
                reach, before = end, e["name"]
    n = len(periods)
    blocking = _host_waits(events, replay_starts[1], replay_starts[-2])
    rows = sorted(
        (
            {"kernel": name, "per_step": len(d) / n, "mean_us": sum(d) / len(d), "total_us": sum(d) / n}
            for name, d in outside.items()
        ),
        key=lambda r: -r["total_us"],
    )
    llm.reset_prefix_cache()
    return {
        "batch": batch,
        "ctx": ctx,
        "generate_us_per_token": wall_us / (1 + ENGINE_STEPS),
        "unprofiled_us_per_token": plain_us / (1 + ENGINE_STEPS),
        "unprofiled_host_wait_us_per_token": waited[0] * 1e6 / (1 + ENGINE_STEPS),
        "period_us": (replay_starts[-2] - replay_starts[1]) / n,
        "graph_busy_us": graph_busy / n,
        "outside_busy_us": outside_busy / n,
        "idle_us": idle / n,
        "outside": rows,
        "inside": sorted(
            (
                {"kernel": name, "per_step": len(d) / n, "mean_us": sum(d) / len(d), "total_us": sum(d) / n}
                for name, d in inside_kernels.items()
            ),
            key=lambda r: -r["total_us"],
        ),
        "gaps": sorted(
            ({"where": k, "per_step": len(v) / n, "mean_us": sum(v) / len(v)} for k, v in gaps.items()),
            key=lambda r: -r["per_step"] * r["mean_us"],
        ),
        "host_waits": [dict(r, per_step=r["count"] / n) for r in blocking],
    }


_WAITS = {"cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy"}


def _host_waits(events: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    """Runtime calls in [lo, hi) that block the host (syncs, or any call over 20 us), grouped by
    name and, in a trace taken with_stack=True, by the innermost hallm Python frames around them.
    CUPTI's tracing lengthens cudaGraphLaunch several-fold (the unprofiled launch is printed with
    the replay); the unprofiled host wait printed with each step says who sets the pace."""
    frames = [e for e in events if e.get("cat") == "python_function" and "hallm" in e.get("name", "")]
    found: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver") or not lo <= e["ts"] < hi:
            continue
        if e["name"] not in _WAITS and e.get("dur", 0) < 20:
            continue
        around = sorted(
            (f for f in frames if f["tid"] == e["tid"] and f["ts"] <= e["ts"] < f["ts"] + f["dur"]),
            key=lambda f: -f["dur"],
        )
        where = " > ".join(f["name"].split("/")[-1][:50] for f in around[-3:])
        found[f"{e['name']} in {where}" if where else e["name"]].append(e["dur"])
    return sorted(
        ({"call": k, "count": len(v), "mean_us": sum(v) / len(v)} for k, v in found.items()),
        key=lambda r: -r["count"] * r["mean_us"],
    )


def launch_costs(llm: Any, batch: int) -> dict[str, float]:
    """Host microseconds of the CUDA calls a decode step makes, with the GPU busy (as in the
    engine, where the host runs a step ahead) and idle: relaunching the step's graph while its
    previous launch runs, alternating two graphs, small H2D copies from pageable and pinned
    memory, the lm_head and argmax launches, a D2H copy to pinned memory, an event record."""
    import numpy as np
    import torch

    runner = llm.engine.executor.worker.runner
    graphs = runner.graphs.decode
    g = graphs.graphs[int(graphs.bucket[batch])]
    other = graphs.graphs[int(graphs.bucket[max(1, batch // 2)])] if batch > 1 else graphs.graphs[2]
    hidden = graphs.outputs[int(graphs.bucket[batch])][:batch]
    host = np.arange(batch + 1, dtype=np.int32)
    pinned = torch.from_numpy(host).pin_memory()
    dst = torch.empty(batch + 1, dtype=torch.int32, device="cuda")

    def timed(fn: Any, busy: bool, n: int = 12) -> float:
        out = []
        for _ in range(n):
            torch.cuda.synchronize()
            if busy:
                g.replay()  # ~1 ms of GPU work queued ahead of the call
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        return sorted(out)[len(out) // 2]

    logits = runner.model.compute_logits(hidden)
    rows = {
        "graph relaunch, its previous launch running": timed(g.replay, True),
        "graph launch, another graph running": timed(other.replay, True),
        "graph launch, GPU idle": timed(g.replay, False),
        "H2D copy from pageable, GPU busy": timed(
            lambda: dst.copy_(torch.from_numpy(host), non_blocking=True), True
        ),
        "H2D copy from pinned, GPU busy": timed(lambda: dst.copy_(pinned, non_blocking=True), True),
        "compute_logits (lm_head + float), GPU busy": timed(
            lambda: runner.model.compute_logits(hidden), True
        ),
        "argmax, GPU busy": timed(lambda: logits.argmax(dim=-1), True),
        "D2H to pinned (non_blocking), GPU busy": timed(lambda: dst.to("cpu", non_blocking=True), True),
        "event record, GPU busy": timed(lambda: torch.Event(device=dst.device).record(), True),
    }
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results/raw")
    p.add_argument("--engine", action="store_true", help="also profile whole engine decode steps")
    p.add_argument(
        "--no-replay", action="store_true", help="skip the direct graph replays (the engine steps only)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="the engine steps' sampling temperature")
    p.add_argument("--host", action="store_true", help="also cProfile the host over the decode steps")
    p.add_argument("--launch-costs", action="store_true", help="also time the step's CUDA calls on the host")
    p.add_argument(
        "--variant", default="shipped", choices=list(VARIANTS), help="engine variant (benchmarks/variants.py)"
    )
    args = p.parse_args()
    apply_variant(args.variant)

    from hallm.entrypoints.llm import LLM

    batches = [int(b) for b in args.batches.split(",")]
    model_dir = write_model_dir(args.model, Path(tempfile.mkdtemp(prefix="hallm-prof-")) / args.model)
    llm = LLM(
        model=str(model_dir),
        device="cuda",
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=args.ctx + 64,
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
    )
    record: dict[str, Any] = {
        "benchmark": "step-profile",
        "model": args.model,
        "env": environment(),
        "profiles": [],
    }
    for batch in batches:
        if not args.no_replay:
            r = profile_batch(llm, batch, args.ctx)
            record["profiles"].append(r)
            print(
                f"\n{args.model} batch {batch} ctx {args.ctx}: replay {r['replay_us']:.1f} us (host launch "
                f"{r['host_launch_us']:.1f} us), kernels "
                f"{r['kernel_us']:.1f} us over {r['launches']:.0f} launches "
                f"(gaps {r['replay_us'] - r['kernel_us']:.1f} us)"
            )
            print(f"{'launches':>8} {'mean us':>8} {'total us':>9}  kernel")
            for k in r["kernels"]:
                print(f"{k['per_replay']:8.0f} {k['mean_us']:8.2f} {k['total_us']:9.1f}  {k['kernel']}")
        if args.launch_costs:
            import torch

            with torch.inference_mode():
                costs = launch_costs(llm, batch)
            record.setdefault("launch_costs", []).append({"batch": batch, **costs})
            print(f"\nhost us per call, batch {batch} (median of 12):")
            for name, us in costs.items():
                print(f"{us:9.1f}  {name}")
        if args.host:
            print(f"\nhost profile, batch {batch}, decode steps:\n{profile_host(llm, batch, args.ctx)}")
        if args.engine:
            e = profile_engine(llm, batch, args.ctx, args.temperature)
            record.setdefault("engine", []).append(e)
            print(
                f"\nengine decode step, batch {batch}: period {e['period_us']:.1f} us = graph "
                f"{e['graph_busy_us']:.1f} + outside the graph {e['outside_busy_us']:.1f} + idle "
                f"{e['idle_us']:.1f} (generate: {e['generate_us_per_token']:.1f} us per token; "
                f"unprofiled {e['unprofiled_us_per_token']:.1f} us per token, of which the host waited "
                f"{e['unprofiled_host_wait_us_per_token']:.1f} us for the device)"
            )
            print(f"{'per step':>8} {'mean us':>8} {'total us':>9}  inside the graph")
            for k in e["inside"][:16]:
                print(f"{k['per_step']:8.1f} {k['mean_us']:8.2f} {k['total_us']:9.1f}  {k['kernel']}")
            print(f"{'per step':>8} {'mean us':>8} {'total us':>9}  outside the graph")
            for k in e["outside"]:
                print(f"{k['per_step']:8.1f} {k['mean_us']:8.2f} {k['total_us']:9.1f}  {k['kernel']}")
            print(f"{'per step':>8} {'mean us':>8}  GPU idle")
            for k in e["gaps"][:12]:
                print(f"{k['per_step']:8.1f} {k['mean_us']:8.2f}  {k['where']}")
            print(f"{'per step':>8} {'mean us':>8}  host waits")
            for k in e["host_waits"][:12]:
                print(f"{k['per_step']:8.1f} {k['mean_us']:8.2f}  {k['call']}")
    append_jsonl(Path(args.out) / "step-profile.jsonl", record)


if __name__ == "__main__":
    main()
