"""Structured-output overhead: output tokens/s with and without a JSON schema, offline, at batch
1 and 32 (CPU by default). Every request generates exactly --max-tokens tokens (ignore_eos; the
schema's array needs more tokens than that, so the grammar constrains every token), so the two
runs do the same model work and the difference is the grammar's: mask computation, copy and
application, and the step overlap that async scheduling gives up for constrained requests.

    python benchmarks/structured_output.py [--model DIR_OR_GGUF | --tiny] [--device cpu] [--rounds 3]

The model defaults to hallm's default (SmolLM2-135M); --tiny builds the tests' tiny random llama
instead, where the model is cheap and the grammar's share is the largest. Plain and schema runs
alternate for --rounds rounds (the machine's speed drifts); the median of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# At least 64 array items (two tokens or more each): the grammar is still open at --max-tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 64},
    },
    "required": ["id", "values"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random llama")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--load-format", default="auto", help="dummy: random weights of the model's shapes")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one plain and one schema run at the largest batch (torch profiler: "
        "host calls and device kernels by total time)",
    )
    args = parser.parse_args()

    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    model = args.model
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.utils.tiny_models import build_tiny_model

        model = str(build_tiny_model("llama", Path(tempfile.mkdtemp())))
    llm = LLM(
        model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_tokens + 16,
        max_num_seqs=max(args.batch),
    )
    print(
        f"model={model or 'default'} device={args.device} max_tokens={args.max_tokens} rounds={args.rounds} "
        f"async_scheduling={getattr(llm.engine, 'async_scheduling', None)}"
    )
    print(f"{'batch':>5} {'plain tok/s':>12} {'schema tok/s':>13} {'ratio':>6}")
    for batch in args.batch:
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for constrained in (False, True):
                params = [
                    SamplingParams(
                        temperature=1.0,
                        seed=i,
                        max_tokens=args.max_tokens,
                        ignore_eos=True,
                        structured_outputs={"json": SCHEMA} if constrained else None,
                    )
                    for i in range(batch)
                ]
                llm.generate(["warm up"] * batch, params, use_tqdm=False)  # caches, first steps
                start = time.perf_counter()
                outs = llm.generate(["Give me a record:"] * batch, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                runs[constrained].append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
        plain, schema = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"{batch:>5} {plain:>12.1f} {schema:>13.1f} {schema / plain:>6.2f}")
    if args.profile:
        profile(llm, max(args.batch), args.max_tokens)
    return 0


def profile(llm: object, batch: int, max_tokens: int) -> None:
    """Where a step's time goes with and without the schema: host calls (waits included) and
    device kernels, by total time over one run of `batch` requests."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from hallm.core.sampling_params import SamplingParams

    for constrained in (False, True):
        params = [
            SamplingParams(
                temperature=1.0,
                seed=i,
                max_tokens=max_tokens,
                ignore_eos=True,
                structured_outputs={"json": SCHEMA} if constrained else None,
            )
            for i in range(batch)
        ]
        llm.generate(["warm up"] * batch, params, use_tqdm=False)  # type: ignore[attr-defined]
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        with torch_profile(activities=activities) as prof:
            start = time.perf_counter()
            llm.generate(["Give me a record:"] * batch, params, use_tqdm=False)  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - start
        label = "schema" if constrained else "plain"
        print(f"\n--- profile: {label}, batch {batch}, {max_tokens} tokens each, {elapsed * 1e3:.1f} ms")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        )
        if torch.cuda.is_available():
            print(
                prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60
                )
            )


if __name__ == "__main__":
    raise SystemExit(main())
