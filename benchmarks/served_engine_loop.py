"""The engine process's host cost per step when serving, against the offline loop's.

    .venv/bin/python benchmarks/served_engine_loop.py [--batches 32,256] [--steps 64] [--rounds 5]

When serving, every step's outputs leave the engine process as one `StepOutputs` message (the
new token ids of every request the step touched, plus the engine's stats), which the offline
loop never builds. On a host-bound step (small models at large batches on a GPU) that work is
added to every step. This decodes `steps` tokens for `batch` requests of a 128-token prompt (a
tiny 2-layer Llama, dummy weights, on the CPU) twice per round, interleaved: the offline loop
(`LLMEngine.step(final_only=True)`) and the engine process's loop (`EngineLoop.step_message`,
encoded as it is sent). It times, with perf_counter around each, the output processing inside
the step, the per-request deltas, the stats and the encoding, and prints microseconds per
step and per request-step (medians of `--rounds` rounds) with the served/offline ratio of the
host work that differs.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import write_model_dir
from benchmarks.host_overhead import instrument_phases

PHASES = (
    ("output processing", "hallm.core.output_processor.OutputProcessor", "process"),
    ("output processing", "hallm.core.output_processor.OutputProcessor", "finished_outputs"),
    ("deltas", "hallm.core.output_processor.OutputProcessor", "deltas"),
    ("stats", "hallm.core.engine_process", "engine_stats"),
)


def build_engine(batch: int, steps: int) -> Any:
    from hallm.core.engine import LLMEngine
    from hallm.core.engine_args import EngineArgs
    from hallm.core.engine_process import TokenIdsOnly

    model_dir = write_model_dir("tiny", Path(tempfile.mkdtemp(prefix="hallm-served-loop-")) / "tiny")
    args = EngineArgs(
        model=str(model_dir),
        device="cpu",
        load_format="dummy",
        dtype="float32",
        max_model_len=128 + steps + 16,
        max_num_seqs=batch,
        max_num_batched_tokens=max(8192, 160 * batch),
    )
    config = args.create_engine_config()
    return LLMEngine(config, TokenIdsOnly([2]))


def run_once(engine: Any, batch: int, steps: int, served: bool, tag: str) -> dict[str, float]:
    from hallm.core.engine_process import EngineLoop
    from hallm.core.engine_protocol import make_encoder
    from hallm.core.sampling_params import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [rng.randrange(100, 10000) for _ in range(128)], params)
    loop = EngineLoop(engine, inbox=None, outboxes=[None], parent_pid=0)
    encoder = make_encoder()
    for i in range(batch):
        loop.live.add(f"{tag}-{i}")
    # The first steps (prefill, admission) are not timed.
    for _ in range(2):
        if served:
            encoder.encode(loop.step_message())
        else:
            engine.step(final_only=True)
    totals: dict[str, float] = collections.defaultdict(float)
    undo = instrument_phases(PHASES, totals)
    n = 0
    t0 = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            if served:
                message = loop.step_message()
                t1 = time.perf_counter()
                encoder.encode(message)
                totals["encode"] += time.perf_counter() - t1
            else:
                engine.step(final_only=True)
            n += 1
    finally:
        undo()
    wall = time.perf_counter() - t0
    row = {phase: totals[phase] * 1e6 / n for phase in dict.fromkeys([*(p for p, _, _ in PHASES), "encode"])}
    row["step (wall)"] = wall * 1e6 / n
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="32,256")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    for batch in [int(b) for b in args.batches.split(",")]:
        engine = build_engine(batch, args.steps)
        rows: dict[str, list[dict[str, float]]] = {"offline": [], "served": []}
        for r in range(args.rounds):
            for mode in ("offline", "served"):
                rows[mode].append(run_once(engine, batch, args.steps, mode == "served", f"{mode}{r}"))
        print(f"\ncpu batch {batch}: us per decode step (median of {args.rounds} rounds, min-max)")
        print(f"{'phase':20} {'offline':>22} {'served':>22} {'served per request':>19}")
        med: dict[str, dict[str, float]] = {}
        for name in rows["offline"][0]:
            cells = []
            for mode in ("offline", "served"):
                vals = [row[name] for row in rows[mode]]
                med.setdefault(mode, {})[name] = statistics.median(vals)
                cells.append(f"{statistics.median(vals):9.1f} ({min(vals):.0f}-{max(vals):.0f})")
            print(f"{name:20} {cells[0]:>22} {cells[1]:>22} {med['served'][name] / batch:19.2f}")
        parts = ("output processing", "deltas", "stats", "encode")
        off = sum(med["offline"][k] for k in parts)
        srv = sum(med["served"][k] for k in parts)
        print(
            f"outputs host work: served {srv:.1f} us vs offline {off:.1f} us per step (+{srv - off:.1f} us, "
            f"{(srv - off) / batch:.2f} us per request)"
        )
        engine.shutdown()


if __name__ == "__main__":
    main()
