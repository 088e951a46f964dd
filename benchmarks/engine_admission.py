"""What admitting one request costs the engine process: `LLMEngine.add_request` (the offline
entry: a per-id type check, then the admission checks) against `add_token_ids` (the serving
engine process's: ids from a decoded AddRequest, whose schema already refused anything but ints),
interleaved in one process on the same 1,024-id prompts.

    python benchmarks/engine_admission.py [--prompt-tokens 1024] [--requests 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import write_model_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    from hallm.core.engine import LLMEngine
    from hallm.core.engine_args import EngineArgs
    from hallm.core.engine_process import TokenIdsOnly
    from hallm.core.sampling_params import SamplingParams

    model_dir = write_model_dir("tiny", Path(tempfile.mkdtemp(prefix="hallm-admission-")) / "tiny")
    engine_args = EngineArgs(
        model=str(model_dir),
        device="cpu",
        load_format="dummy",
        dtype="float32",
        max_model_len=args.prompt_tokens + 64,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(engine_args.create_engine_config(), TokenIdsOnly([2]))
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, detokenize=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 10000) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    ways = {"add_request": engine.add_request, "add_token_ids": engine.add_token_ids}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, add in ways.items():
            start = time.perf_counter()
            for i, prompt in enumerate(prompts):
                add(f"{name}-{r}-{i}", prompt, params)
            times[name].append((time.perf_counter() - start) / len(prompts) * 1e6)
            engine.abort_request([f"{name}-{r}-{i}" for i in range(len(prompts))])
    us = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.prompt_tokens}-id prompts, {args.requests} requests x {args.rounds} rounds (median, min-max):"
    )
    for name, t in times.items():
        print(f"  {name:14s} {us[name]:7.1f} us a request ({min(t):.1f}-{max(t):.1f})")
    print(f"  add_token_ids / add_request: {us['add_token_ids'] / us['add_request']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
