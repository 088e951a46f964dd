"""Where a decode step's GPU time goes: the kernels of one captured decode-graph replay.

    python3 benchmarks/gpu_step_profile.py [--model qwen2.5-0.5b] [--batches 1,32] [--out DIR]

Builds the engine on the CUDA plugin with dummy weights (bf16, graphs on), decodes a few tokens
at ~1k context so every batch size's graph is captured and warm, then profiles replays of the
graph with torch.profiler (CUPTI reports each kernel of a replayed graph). Prints, per batch
size, the replay's wall time (CUDA events), the summed kernel time, and a table of kernels by
name: launches per replay, mean and total microseconds. The difference between the wall time
and the kernel sum is the graph's launch gaps. Writes the tables to DIR/step-profile.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, environment, write_model_dir

REPLAYS = 10


def profile_batch(llm: Any, batch: int, ctx: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hallm.core.sampling_params import SamplingParams

    runner = llm.engine.executor.worker.runner
    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(ctx)]} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)
    graphs = runner.graphs
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
        "kernel_us": kernel_us,
        "launches": launches,
        "kernels": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results/raw")
    args = p.parse_args()

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
        r = profile_batch(llm, batch, args.ctx)
        record["profiles"].append(r)
        print(
            f"\n{args.model} batch {batch} ctx {args.ctx}: replay {r['replay_us']:.1f} us, kernels "
            f"{r['kernel_us']:.1f} us over {r['launches']:.0f} launches "
            f"(gaps {r['replay_us'] - r['kernel_us']:.1f} us)"
        )
        print(f"{'launches':>8} {'mean us':>8} {'total us':>9}  kernel")
        for k in r["kernels"]:
            print(f"{k['per_replay']:8.0f} {k['mean_us']:8.2f} {k['total_us']:9.1f}  {k['kernel']}")
    append_jsonl(Path(args.out) / "step-profile.jsonl", record)


if __name__ == "__main__":
    main()
