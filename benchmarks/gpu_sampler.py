"""The sampler's device time on G2's decode step: Llama-3.1-8B logits [192, 128256] bf16,
temperature 0.6, no top-k/top-p, unseeded, as `Sampler.__call__` runs it, against the same call
with the exponential race's noise drawn the way it used to be (uniform_, then -log(1 - U) in
three more passes over [N, V]), built here. Medians of `--iters` CUDA-event timings, variants
interleaved.

    python benchmarks/gpu_sampler.py [--rows 192] [--vocab 128256] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _four_pass_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    noise = torch.empty_like(probs)
    noise.uniform_()
    noise = torch.log1p(noise.neg_(), out=noise).neg_()
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


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
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()

    from hallm.core import sampler as sampler_module
    from hallm.core.sampler import Sampler
    from hallm.core.sampling_metadata import RequestSamplingState, SamplingMetadata
    from hallm.core.sampling_params import SamplingParams

    device = torch.device("cuda")
    logits = torch.randn(args.rows, args.vocab, device=device).to(torch.bfloat16)
    states = [
        RequestSamplingState(SamplingParams(temperature=0.6), [1], device=device) for _ in range(args.rows)
    ]
    meta = SamplingMetadata.build(states, args.vocab, device)
    sampler = Sampler()

    def library() -> object:
        return sampler(logits, meta)

    def four_pass() -> object:
        with mock.patch.object(sampler_module, "_exponential_race", _four_pass_race):
            return sampler(logits, meta)

    for fn in (library, four_pass):
        time_ms(fn, 5)
    runs: dict[str, list[float]] = {"library": [], "four-pass noise": []}
    for _ in range(args.iters):
        runs["library"] += time_ms(library, 1)
        runs["four-pass noise"] += time_ms(four_pass, 1)
    print(
        f"sampler on [{args.rows}, {args.vocab}] bf16 logits, temperature 0.6, {torch.cuda.get_device_name()}"
    )
    base = statistics.median(runs["four-pass noise"])
    for name, times in runs.items():
        med = statistics.median(times)
        print(f"  {name:<16} {med:7.3f} ms (min {min(times):.3f}, max {max(times):.3f})  {base / med:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
