"""The cycle collector in the engine process during a burst: the interpreter's thresholds against
`hallm.core.server_gc.prepare_server_gc`'s, each in a fresh child process.

    .venv/bin/python benchmarks/server_gc.py [--requests 1000] [--prompt-tokens 1024] [--steps 400]
        [--rounds 2]

Each child builds the engine the engine process builds (a tiny 2-layer Llama, dummy weights, on
the CPU, `max_num_seqs` 256), freezes its start-up heap, then adds `--requests` prompts of
`--prompt-tokens` ids as the engine process does (`add_token_ids`) and runs `--steps` steps the
way the engine process does (`step_deltas`). Variants:

  interpreter  start-up heap frozen, the interpreter's thresholds (700, 10, 10)
  shipped      `prepare_server_gc()`: frozen, young threshold `YOUNG_THRESHOLD`

Printed per variant (median over rounds): collections of each generation and their CPU time
(`gc.callbacks`, thread CPU time), the slowest step and the steps' median wall time. The API
process's side is `benchmarks/api_process.py --variants shipped,interpreter-gc`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("interpreter", "shipped")


class Collections:
    """A `gc.callbacks` entry: this process's cycle collections and their thread CPU time, by
    generation."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.cpu_s = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.counts[info["generation"]] += 1
            self.cpu_s[info["generation"]] += time.thread_time() - self._started


def child(variant: str, requests: int, prompt_tokens: int, steps: int) -> dict[str, object]:
    import gc
    import random
    import tempfile

    from benchmarks.gpu_common import write_model_dir
    from hallm.core.engine import LLMEngine
    from hallm.core.engine_args import EngineArgs
    from hallm.core.engine_process import TokenIdsOnly
    from hallm.core.sampling_params import SamplingParams
    from hallm.core.server_gc import prepare_server_gc

    model_dir = write_model_dir("tiny", Path(tempfile.mkdtemp(prefix="hallm-gc-")) / "tiny")
    engine_args = EngineArgs(
        model=str(model_dir),
        device="cpu",
        load_format="dummy",
        dtype="float32",
        max_model_len=prompt_tokens + 128,
        max_num_seqs=256,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(engine_args.create_engine_config(), TokenIdsOnly([2]))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 10000) for _ in range(prompt_tokens)] for _ in range(requests)]
    if variant == "shipped":
        prepare_server_gc()
    else:
        gc.collect()
        gc.freeze()
    collections = Collections()
    gc.callbacks.append(collections)
    params = SamplingParams(temperature=1.0, max_tokens=128, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_token_ids(f"r{i}", prompt, params)
    del prompts
    step_s = []
    for _ in range(steps):
        if not engine.has_unfinished_requests():
            break
        start = time.perf_counter()
        engine.step_deltas()
        step_s.append(time.perf_counter() - start)
    gc.callbacks.remove(collections)
    return {
        "collections": collections.counts,
        "gc_cpu_ms": [round(1000 * s, 1) for s in collections.cpu_s],
        "max_step_ms": 1000 * max(step_s),
        "median_step_ms": 1000 * statistics.median(step_s),
        "steps": len(step_s),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        variant, requests, prompt_tokens, steps = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(child(variant, requests, prompt_tokens, steps)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    results: dict[str, list[dict[str, object]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:  # interleaved: both see the same load on a shared machine
            cmd = [sys.executable, __file__, "child", variant]
            cmd += [str(args.requests), str(args.prompt_tokens), str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"{args.requests} requests x {args.prompt_tokens} ids, {args.steps} steps, "
        f"{args.rounds} rounds (median; collections young/middle/full, their CPU ms):"
    )
    for variant, runs in results.items():
        counts = [statistics.median(r["collections"][g] for r in runs) for g in range(3)]  # type: ignore[index]
        cpu = [statistics.median(r["gc_cpu_ms"][g] for r in runs) for g in range(3)]  # type: ignore[index]
        worst = statistics.median(r["max_step_ms"] for r in runs)  # type: ignore[misc]
        typical = statistics.median(r["median_step_ms"] for r in runs)  # type: ignore[misc]
        print(
            f"  {variant:12s} collections {counts[0]:g}/{counts[1]:g}/{counts[2]:g}, "
            f"CPU {cpu[0]:.1f}/{cpu[1]:.1f}/{cpu[2]:.1f} ms (total {sum(cpu):.1f}); "
            f"step median {typical:.2f} ms, slowest {worst:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
