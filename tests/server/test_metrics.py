"""ServerMetrics' per-chunk token metrics and finished sequences against prometheus_client's own
Counter and Histogram (the oracle): the same updates give the same exposition lines. Several API
server processes sharing their metrics (`MetricsShare`) export what one process fed every request
would."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from hallm.core.engine_protocol import EngineStats
from hallm.entrypoints.openai.metrics import (
    _E2E_BUCKETS,
    _TPOT_BUCKETS,
    _TTFT_BUCKETS,
    KV_CONNECTOR_COUNTERS,
    ServerMetrics,
)
from hallm.entrypoints.openai.metrics_share import MetricsShare


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


_REASONS = ("stop", "length", "abort")


def _lines(text: bytes, prefix: str) -> list[str]:
    return [line for line in text.decode().splitlines() if prefix in line]


def _all_samples(text: bytes) -> dict[str, float]:
    """Every sample line (`_created` included): series with its labels -> value."""
    return {
        name: float(value)
        for name, value in (
            line.rsplit(" ", 1) for line in text.decode().splitlines() if line and not line.startswith("#")
        )
    }


def _assert_same_samples(ours: bytes, oracle: bytes) -> None:
    a, b = _all_samples(ours), _all_samples(oracle)
    assert a.keys() == b.keys()
    for name, value in b.items():
        # a histogram's `_sum` adds the same floats in another order
        assert abs(a[name] - value) <= 1e-9 * max(1.0, abs(value)), (name, a[name], value)
    # the same families, in the same order
    assert _lines(ours, "# ") == _lines(oracle, "# ")


def _request(rng: random.Random, *targets: ServerMetrics) -> None:
    """One random request (first token, a few chunks, a finish) recorded by every target."""
    first, prompt = rng.expovariate(10), rng.randint(1, 40)
    chunks = [(n, rng.expovariate(50) * n) for n in (rng.randint(1, 6) for _ in range(rng.randint(0, 4)))]
    reason, total = rng.choice(_REASONS), rng.expovariate(0.2)
    for metrics in targets:
        metrics.first_token(first, prompt)
        for n, interval in chunks:
            metrics.tokens(n, interval)
        metrics.finished(reason, total)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """One `time.time()` for every `_created` sample, ours and prometheus_client's."""
    monkeypatch.setattr(time, "time", lambda: 1712345678.125)


@pytest.mark.parametrize("created", [True, False])
def test_request_success_matches_prometheus_counter(
    frozen_clock: None, monkeypatch: pytest.MonkeyPatch, created: bool
) -> None:
    """`hallm:request_success` is exported line for line as prometheus_client's labelled Counter,
    `_created` samples (and prometheus_client's switch for them) included."""
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", created)
    metrics = ServerMetrics("m")
    registry = CollectorRegistry()
    oracle = Counter(
        "hallm:request_success",
        "Sequences finished, by finish reason.",
        ["model_name", "finished_reason"],
        registry=registry,
    )
    # before any finish: the family's header alone
    assert _lines(metrics.render(), "hallm:request_success") == _lines(
        generate_latest(registry), "hallm:request_success"
    )
    rng = random.Random(1)
    for _ in range(40):
        reason = rng.choice(_REASONS)
        metrics.finished(reason, rng.expovariate(0.2))
        oracle.labels("m", reason).inc()
    ours = _lines(metrics.render(), "hallm:request_success")
    assert ours == _lines(generate_latest(registry), "hallm:request_success")
    assert any("_created" in line for line in ours) == created


def test_render_without_share_is_unchanged(frozen_clock: None, tmp_path: Path) -> None:
    """Without a share the exposition is the one-process one: the same bytes as a shared process
    that is alone, and the families in the order they have always been exported in."""
    alone = ServerMetrics("m")
    shared = ServerMetrics("m", MetricsShare(str(tmp_path), 0, 2))
    stats = EngineStats(3, 1, 0.5, 10, 20, 2, 100, 40, 1, "offload", {"tokens_loaded": 5})
    rng = random.Random(2)
    for metrics in (alone, shared):
        metrics.engine_stats(stats)
    for _ in range(30):
        _request(rng, alone, shared)
    alone.publish()  # nothing to publish to
    assert alone.render() == shared.render()
    assert [line.split()[2] for line in _lines(alone.render(), "# TYPE")] == [
        "hallm:num_requests_running",
        "hallm:num_requests_waiting",
        "hallm:kv_cache_usage_perc",
        "hallm:kv_cache_free_blocks",
        "hallm:kv_cache_num_blocks",
        "hallm:prefix_cache_hit_rate",
        "hallm:prefix_cache_queries",
        "hallm:prefix_cache_hits",
        "hallm:num_preemptions",
        "hallm:num_requests_aborted",
        *(f"hallm:kv_connector_{key}" for key in KV_CONNECTOR_COUNTERS),
        "hallm:kv_offload_hit_rate",
        "hallm:request_success_total",
        "hallm:request_success_created",
        "hallm:prompt_tokens_total",
        "hallm:generation_tokens_total",
        "hallm:time_to_first_token_seconds",
        "hallm:time_per_output_token_seconds",
        "hallm:e2e_request_latency_seconds",
    ]
    assert sorted(os.listdir(tmp_path)) == ["0.msgpack"]


def test_shared_processes_export_the_sum(frozen_clock: None, tmp_path: Path) -> None:
    """Two processes of one server, fed different requests: either one's scrape shows what one
    process fed every request would (once the other has published), and never goes backwards."""
    a = ServerMetrics("m", MetricsShare(str(tmp_path), 0, 2))
    b = ServerMetrics("m", MetricsShare(str(tmp_path), 1, 2))
    union, only_a = ServerMetrics("m"), ServerMetrics("m")
    rng = random.Random(3)
    for _ in range(60):
        if rng.random() < 0.5:
            _request(rng, a, only_a, union)
        else:
            _request(rng, b, union)
    # b has not published: its numbers are simply absent
    _assert_same_samples(a.render(), only_a.render())
    b.publish()
    _assert_same_samples(a.render(), union.render())
    _assert_same_samples(b.render(), union.render())  # a published when it rendered

    # b's later requests show in a's scrape once b publishes them again
    before = _all_samples(a.render())
    for _ in range(20):
        _request(rng, b, union)
    assert _all_samples(a.render()) == before
    b.publish()
    after = a.render()
    _assert_same_samples(after, union.render())
    for name, value in before.items():
        if not name.endswith("_created"):
            assert _all_samples(after)[name] >= value, name


def test_metrics_share_files(tmp_path: Path) -> None:
    shares = [MetricsShare(str(tmp_path), i, 3) for i in range(3)]
    assert [s.read_others() for s in shares] == [[], [], []]
    shares[1].publish(b"one")
    shares[2].publish(b"two")
    shares[2].publish(b"two, later")  # replaces the previous one
    assert shares[0].read_others() == [b"one", b"two, later"]
    assert shares[1].read_others() == [b"two, later"]
    assert shares[2].read_others() == [b"one"]
    assert sorted(os.listdir(tmp_path)) == ["1.msgpack", "2.msgpack"]  # no temporary file left
    with pytest.raises(ValueError):
        MetricsShare(str(tmp_path), 3, 3)


def test_unreadable_snapshot_is_ignored(frozen_clock: None, tmp_path: Path) -> None:
    a = ServerMetrics("m", MetricsShare(str(tmp_path), 0, 2))
    alone = ServerMetrics("m")
    rng = random.Random(4)
    for _ in range(10):
        _request(rng, a, alone)
    (tmp_path / "1.msgpack").write_bytes(b"\xc1 not msgpack")
    assert a.render() == alone.render()
