"""`hallm bench throughput`: offline throughput with vLLM's semantics, hallm or HF transformers."""

from __future__ import annotations

import argparse
from typing import Any

from hallm.entrypoints.cli.engine_args import add_engine_args, engine_args_from


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser("throughput", help="offline throughput (requests/s, tokens/s)")
    add_engine_args(p)
    p.add_argument(
        "--backend",
        choices=("hallm", "hf"),
        default="hallm",
        help="hf: HF transformers generate, padded batches",
    )
    p.add_argument("--dataset-name", choices=("random",), default="random")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]"
    )
    p.add_argument("--hf-max-batch-size", type=int, default=32)
    p.add_argument("--output-json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hallm.benchmarks.throughput import random_workload, run_hallm, run_hf
    from hallm.core.model_loader import resolve_model

    engine_args = engine_args_from(args)
    source = resolve_model(engine_args.model, engine_args.load_format, engine_args.tokenizer)
    workload = random_workload(
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.random_range_ratio,
        int(source.hf_config.vocab_size),
    )
    if args.backend == "hallm":
        result = run_hallm(vars(engine_args), workload)
    else:
        dtype = "float32" if args.dtype == "auto" else args.dtype
        result = run_hf(source.model_dir, dtype, workload, args.hf_max_batch_size, source.load_format)
    print(result.line())
    print(f"Total num prompt tokens: {result.prompt_tokens}\nTotal num output tokens: {result.output_tokens}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(result.to_json())
    return 0
