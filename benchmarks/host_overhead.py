"""The engine's host time per decode step, by phase: what the Python around the model costs.

    .venv/bin/python benchmarks/host_overhead.py [--device cpu] [--batches 1,32,256] [--steps 64]

Decodes `steps` tokens for `batch` requests of a 128-token prompt (a tiny 2-layer Llama with
dummy weights, so the model's own work is small on any device) and times, with perf_counter
around each method, the scheduler (`schedule`, `update`), the runner's request-state update and
input build, the model forward and the logits + sampling (device work, or its launches on a GPU),
resolving a step's results (`StepHandle._finish`) and the output processing. "other" is the rest
of the step loop. Prints microseconds per step and per request-step for each phase, the median of
`--rounds` rounds. No profiler, so the numbers are the real ones; on a GPU the forward and
sampling rows are launch costs (async), on the CPU they are the compute.
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import write_model_dir

# (phase, class path, method): timed per call, nested calls counted in the outer phase only
PHASES = (
    ("schedule", "hallm.core.scheduler.Scheduler", "schedule"),
    ("update", "hallm.core.scheduler.Scheduler", "update"),
    ("runner state", "hallm.core.model_runner.ModelRunner", "_update_states"),
    ("input build", "hallm.core.input_batch.StepBuffers", "build"),
    ("forward", "hallm.core.model_runner.ModelRunner", "forward"),
    ("forward", "hallm.ops.torch_graphs.DecodeGraphs", "replay"),
    ("logits + sampling", "hallm.core.model_runner.ModelRunner", "_sample"),
    ("resolve", "hallm.core.step_handle.StepHandle", "_finish"),
    ("output processing", "hallm.core.output_processor.OutputProcessor", "process"),
    ("output processing", "hallm.core.output_processor.OutputProcessor", "outputs"),
    ("output processing", "hallm.core.output_processor.OutputProcessor", "finished_outputs"),
)


def _resolve(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def instrument_phases(
    phases: tuple[tuple[str, str, str], ...], totals: dict[str, float]
) -> Callable[[], None]:
    """Wrap the phases' methods (phase, class path, method) to add their time to `totals`;
    returns a function that restores them."""
    restore = []
    active = [0]
    for phase, cls_path, method in phases:
        cls = _resolve(cls_path)
        if cls is None:
            continue
        original = getattr(cls, method)

        def wrapped(*args: Any, _f: Any = original, _p: str = phase, **kwargs: Any) -> Any:
            if active[0]:
                return _f(*args, **kwargs)
            active[0] += 1
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_p] += time.perf_counter() - t0
                active[0] -= 1

        setattr(cls, method, functools.wraps(original)(wrapped))
        restore.append((cls, method, original))

    def undo() -> None:
        for cls, method, original in restore:
            setattr(cls, method, original)

    return undo


def measure(llm: Any, batch: int, steps: int, device: str) -> dict[str, float]:
    from hallm.core.sampling_params import SamplingParams

    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 10000) for _ in range(128)]} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, detokenize=False)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    llm.generate(prompts, one, use_tqdm=False)  # prefill into the prefix cache

    def synchronize() -> None:
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    # The admission step (a cached prefill) is timed separately and taken off.
    synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    synchronize()
    admit = time.perf_counter() - t0
    totals: dict[str, float] = collections.defaultdict(float)
    undo = instrument_phases(PHASES, totals)
    try:
        synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        synchronize()
        wall = time.perf_counter() - t0
    finally:
        undo()
    decode_steps = steps - 1
    row = {phase: totals[phase] * 1e6 / decode_steps for phase, _, _ in PHASES}
    row["step (wall, admission off)"] = (wall - admit) * 1e6 / decode_steps
    row["other"] = (wall * 1e6 - sum(totals.values()) * 1e6) / decode_steps
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from hallm.entrypoints.llm import LLM

    batches = [int(b) for b in args.batches.split(",")]
    model_dir = write_model_dir("tiny", Path(tempfile.mkdtemp(prefix="hallm-host-")) / "tiny")
    llm = LLM(
        model=str(model_dir),
        device=args.device,
        load_format="dummy",
        dtype="float32" if args.device == "cpu" else "bfloat16",
        max_model_len=128 + args.steps + 16,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(8192, 160 * max(batches)),
    )
    for batch in batches:
        rounds = [measure(llm, batch, args.steps, args.device) for _ in range(args.rounds)]
        llm.reset_prefix_cache()
        names = list(rounds[0])
        print(f"\n{args.device} batch {batch}: us per decode step (median of {args.rounds} rounds)")
        print(f"{'phase':28} {'per step':>9} {'per request':>12}")
        for name in names:
            med = statistics.median(r[name] for r in rounds)
            print(f"{name:28} {med:9.1f} {med / batch:12.2f}")


if __name__ == "__main__":
    main()
