"""`hallm bench throughput`: offline throughput with vLLM's semantics, hallm or HF transformers.
`hallm bench serve`: load on an OpenAI-compatible server (TTFT, TPOT, ITL, throughput)."""

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
    p.add_argument(
        "--num-iters", type=int, default=3, help="timed runs of the workload; the median is reported (hallm)"
    )
    p.add_argument(
        "--num-iters-warmup",
        type=int,
        default=1,
        help="untimed runs of the workload first; the first is reported as the process's first-run cost (hallm)",
    )
    p.add_argument(
        "--compare-detokenize",
        action="store_true",
        help="alternate runs with text out and with token ids out, same engine and requests (hallm)",
    )
    p.add_argument("--output-json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(handler=run)
    _register_serve(sub)


def _register_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="load on an OpenAI-compatible server: TTFT, TPOT, ITL, throughput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API's base URL (with /v1)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (chat: words)")
    p.add_argument("--output-len", type=int, default=64, help="tokens to generate (ignore_eos)")
    p.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]"
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrival rate in requests/s (default: inf, all at once)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: unbounded)"
    )
    p.add_argument("--vocab-size", type=int, default=32000, help="random prompt ids are < this (completions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of every request (default: 0, greedy; 1 matches `bench throughput`)",
    )
    p.add_argument(
        "--api-key", default=None, help="bearer token (default: $HALLM_API_KEY or $OPENAI_API_KEY)"
    )
    p.add_argument("--output-json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    from hallm.benchmarks.serve import ServeBenchConfig, run_benchmark
    from hallm.entrypoints.event_loop import run_event_loop

    cfg = ServeBenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.random_range_ratio,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        vocab_size=args.vocab_size,
        seed=args.seed,
        temperature=args.temperature,
        api_key=args.api_key or os.environ.get("HALLM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
    )
    result = run_event_loop(run_benchmark(cfg))
    print(result.report())
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(result.to_json())
    return 0 if result.completed else 1


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
        results = run_hallm(
            vars(engine_args),
            workload,
            num_iters=args.num_iters,
            num_iters_warmup=args.num_iters_warmup,
            compare_detokenize=args.compare_detokenize,
        )
    else:
        dtype = "float32" if args.dtype == "auto" else args.dtype
        results = [run_hf(source.model_dir, dtype, workload, args.hf_max_batch_size, source.load_format)]
    for result in results:
        print(result.line())
    if len(results) == 2:
        text, ids = results
        print(f"text/ids throughput: {ids.elapsed_s / text.elapsed_s:.3f} (median runs)")
    result = results[0]
    print(f"Total num prompt tokens: {result.prompt_tokens}\nTotal num output tokens: {result.output_tokens}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(
                results[0].to_json()
                if len(results) == 1
                else "[" + ",".join(r.to_json() for r in results) + "]"
            )
    return 0
