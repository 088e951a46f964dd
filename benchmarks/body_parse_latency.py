"""How long a request body's parse takes to come back when the API process's event loop is busy:
on the worker pool (`WorkerPool.run`) against inline on the loop, the two paths of
`ServerContext.parse`.

    .venv/bin/python benchmarks/body_parse_latency.py [--requests 200] [--prompt-len 1024]

The loop is kept busy by tasks that each run ~50 us of Python and yield, as streaming hundreds
of responses keeps it busy in a saturated server. Each request's body (a completions request
with a `--prompt-len`-token prompt) is parsed with pydantic; the script prints the median and
p90 latency from submitting a parse to its result, and the rate at which parses complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hallm.entrypoints.openai.completion_request import CompletionRequest
from hallm.entrypoints.openai.offload import WorkerPool


async def busy(stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < 50e-6:
            pass
        await asyncio.sleep(0)


async def measure(raw: bytes, requests: int, offload: bool, busy_tasks: int) -> tuple[list[float], float]:
    pool = WorkerPool()
    stop = asyncio.Event()
    spinners = [asyncio.create_task(busy(stop)) for _ in range(busy_tasks)]
    await asyncio.sleep(0.01)

    async def one() -> float:
        t = time.perf_counter()
        if offload:
            await pool.run(CompletionRequest.model_validate_json, raw, what="parsing", interruptible=False)
        else:
            CompletionRequest.model_validate_json(raw)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    latencies = await asyncio.gather(*(one() for _ in range(requests)))
    wall = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*spinners)
    return list(latencies), requests / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--busy-tasks", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    body = {
        "model": "m",
        "prompt": list(range(100, 100 + args.prompt_len)),
        "max_tokens": 128,
        "stream": True,
    }
    raw = json.dumps(body).encode()
    print(
        f"{args.requests} parses of a {len(raw)}-byte body, event loop busy with {args.busy_tasks} tasks "
        f"(switch interval {sys.getswitchinterval() * 1e3:.0f} ms); median of {args.rounds} rounds"
    )
    for offload in (True, False):
        rows = [
            asyncio.run(measure(raw, args.requests, offload, args.busy_tasks)) for _ in range(args.rounds)
        ]
        p50 = statistics.median(statistics.median(lat) for lat, _ in rows) * 1e3
        p90 = statistics.median(statistics.quantiles(lat, n=10)[-1] for lat, _ in rows) * 1e3
        rate = statistics.median(r for _, r in rows)
        name = "worker pool" if offload else "inline"
        print(f"  {name:12} latency p50 {p50:8.2f} ms  p90 {p90:8.2f} ms  {rate:9.0f} parses/s")


if __name__ == "__main__":
    main()
