"""ServerMetrics' per-chunk token metrics against prometheus_client's own Counter and Histogram
(the oracle): the same updates give the same exposition lines."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from hallm.entrypoints.openai.metrics import _E2E_BUCKETS, _TPOT_BUCKETS, _TTFT_BUCKETS, ServerMetrics


def _samples(text: bytes, prefixes: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for line in text.decode().splitlines():
        if line.startswith(prefixes) and not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_token_metrics_match_prometheus_client() -> None:
    metrics = ServerMetrics("m")
    registry = CollectorRegistry()
    ttft = Histogram(
        "hallm:time_to_first_token_seconds", "", ["model_name"], buckets=_TTFT_BUCKETS, registry=registry
    )
    tpot = Histogram(
        "hallm:time_per_output_token_seconds", "", ["model_name"], buckets=_TPOT_BUCKETS, registry=registry
    )
    e2e = Histogram(
        "hallm:e2e_request_latency_seconds", "", ["model_name"], buckets=_E2E_BUCKETS, registry=registry
    )
    prompt = Counter("hallm:prompt_tokens", "", ["model_name"], registry=registry)
    generated = Counter("hallm:generation_tokens", "", ["model_name"], registry=registry)
    rng = random.Random(0)
    # values on bucket bounds too: `le` is inclusive
    edges = [0.001, 0.01, 0.5, 1.0, 5.0, 80.0, 960.0, 1e4]
    for _ in range(300):
        first = rng.choice(edges) if rng.random() < 0.3 else rng.expovariate(10)
        metrics.first_token(first, 17)
        ttft.labels("m").observe(first)
        prompt.labels("m").inc(17)
        generated.labels("m").inc(1)
        for _ in range(rng.randint(0, 5)):
            n = rng.randint(1, 6)
            interval = rng.choice(edges) * n if rng.random() < 0.3 else rng.expovariate(50) * n
            metrics.tokens(n, interval)
            generated.labels("m").inc(n)
            for _ in range(n):
                tpot.labels("m").observe(interval / n)
        total = rng.choice(edges) if rng.random() < 0.3 else rng.expovariate(0.2)
        metrics.finished("length", total)
        e2e.labels("m").observe(total)
    names = ("hallm:time_", "hallm:e2e_", "hallm:prompt_tokens", "hallm:generation_tokens")
    ours, oracle = _samples(metrics.render(), names), _samples(generate_latest(registry), names)
    # two counters; per histogram its buckets, +Inf, _count and _sum
    assert len(oracle) == 2 + sum(len(b) + 3 for b in (_TTFT_BUCKETS, _TPOT_BUCKETS, _E2E_BUCKETS))
    assert ours.keys() == oracle.keys()
    for name, value in oracle.items():
        assert abs(ours[name] - value) <= 1e-9 * max(1.0, abs(value)), (name, ours[name], value)
