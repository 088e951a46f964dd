"""The API process's per-chunk metrics update (`ServerMetrics.tokens`) against the same update on
prometheus_client's Counter and Histogram (what the server used: a lock per update, one
observation at a time), in one process.

    .venv/bin/python benchmarks/server_metrics.py [--calls 200000] [--rounds 5]

A streamed chunk of n tokens adds n to the generation counter and n inter-token times to the
histogram. Prints microseconds per chunk (median of `--rounds`, min-max) for n = 1 and 3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from hallm.entrypoints.openai.metrics import _TPOT_BUCKETS, ServerMetrics

    registry = CollectorRegistry()
    counter = Counter("g", "", ["model_name"], registry=registry).labels("m")
    histogram = Histogram("t", "", ["model_name"], buckets=_TPOT_BUCKETS, registry=registry).labels("m")

    def prometheus_client_update(n: int, interval: float) -> None:
        counter.inc(n)
        for _ in range(n):
            histogram.observe(interval / n)

    metrics = ServerMetrics("m")
    ways = {"prometheus_client": prometheus_client_update, "ServerMetrics": metrics.tokens}
    for n in (1, 3):
        us: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, update in ways.items():  # interleaved
                t = timeit.timeit(lambda u=update, k=n: u(k, 0.004), number=args.calls)  # type: ignore[misc]
                us[name].append(t / args.calls * 1e6)
        med = {name: statistics.median(v) for name, v in us.items()}
        print(
            f"chunk of {n} token(s): "
            + ", ".join(f"{name} {med[name]:.2f} us ({min(v):.2f}-{max(v):.2f})" for name, v in us.items())
            + f"; ServerMetrics / prometheus_client {med['ServerMetrics'] / med['prometheus_client']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
