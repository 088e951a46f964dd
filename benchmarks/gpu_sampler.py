"""The sampler's device time with the platform's one-pass `temperature_sample` (the shipped
CUDA op table) against the sampler's torch path on the same logits, in the same process:
Llama-3.1-8B's vocabulary (128256), bf16 logits, temperature 0.6, unseeded, at several batch
sizes (192 is G2's decode step); and at batch 192 with a repetition penalty (the op then reads
the processed float32 logits). Medians of `--iters` CUDA-event timings, variants interleaved.

    python benchmarks/gpu_sampler.py [--rows 1 32 192 512] [--vocab 128256] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_ms(fn: Callable[[], object], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 192, 512])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()

    from hallm_cuda.platform import CudaPlatform

    from hallm.core.sampler import Sampler
    from hallm.core.sampling_metadata import RequestSamplingState, SamplingMetadata
    from hallm.core.sampling_params import SamplingParams

    device = torch.device("cuda")
    op = CudaPlatform().op_table().temperature_sample
    samplers = {"one-pass op": Sampler(temperature_sample=op), "torch path": Sampler()}
    print(f"sampler on [rows, {args.vocab}] bf16 logits, temperature 0.6, {torch.cuda.get_device_name()}")
    cases = [(rows, SamplingParams(temperature=0.6)) for rows in args.rows]
    cases.append((192, SamplingParams(temperature=0.6, repetition_penalty=1.1)))
    for rows, params in cases:
        logits = torch.randn(rows, args.vocab, device=device).to(torch.bfloat16)
        states = [
            RequestSamplingState(params, [1, 2, 3], output_token_ids=[4], device=device) for _ in range(rows)
        ]
        meta = SamplingMetadata.build(states, args.vocab, device)
        fns = {name: (lambda s=s, x=logits, m=meta: s(x, m)) for name, s in samplers.items()}
        for fn in fns.values():
            time_ms(fn, 5)
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.iters):
            for name, fn in fns.items():
                runs[name] += time_ms(fn, 1)
        label = f"batch {rows}" + (", repetition penalty" if params.repetition_penalty != 1.0 else "")
        base = statistics.median(runs["torch path"])
        print(f"{label}:")
        for name, times in runs.items():
            med = statistics.median(times)
            print(
                f"  {name:<12} {med:7.3f} ms (min {min(times):.3f}, max {max(times):.3f})  {base / med:.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
