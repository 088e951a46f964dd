"""What admitting one request costs the API process: parsing and validating a /v1/completions body
(`CompletionRequest.model_validate_json`), plain and under the request-work deadline tracer
(`offload.call_with_deadline`, which the server keeps for chat templates).

The server parses bodies off the event loop but on threads that share the GIL with it, so every
microsecond here is taken from streaming; at saturation a few hundred such bodies arrive at once.

    python benchmarks/request_parse.py [--prompt-tokens 1024] [--iters 300]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable


def per_call_us(fn: Callable[[], object], iters: int, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()

    from hallm.entrypoints.openai.completion_request import CompletionRequest
    from hallm.entrypoints.openai.offload import call_with_deadline

    rng = random.Random(0)
    bodies = {
        f"{args.prompt_tokens} token ids": {
            "prompt": [rng.randrange(150_000) for _ in range(args.prompt_tokens)]
        },
        f"text of ~{args.prompt_tokens} tokens": {
            "prompt": " ".join("word" for _ in range(args.prompt_tokens))
        },
    }
    print(f"{'body':<28} {'plain us':>10} {'traced us':>10} {'traced/plain':>13}")
    for name, prompt in bodies.items():
        raw = json.dumps({"model": "m", "max_tokens": 128, "stream": True, **prompt}).encode()
        plain = per_call_us(lambda raw=raw: CompletionRequest.model_validate_json(raw), args.iters)
        traced = per_call_us(
            lambda raw=raw: call_with_deadline(
                CompletionRequest.model_validate_json, (raw,), time.monotonic() + 60
            ),
            args.iters,
        )
        print(f"{name:<28} {plain:>10.1f} {traced:>10.1f} {traced / plain:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
