"""Prometheus metrics of the server (`GET /metrics`), named `hallm:*` like vLLM's `vllm:*`.

Engine gauges (running/waiting sequences, KV-cache usage and free blocks, prefix-cache hit rate)
come from the stats the engine process sends with every step and whenever it goes idle; latency
histograms, token counters and finished sequences are recorded in the API process as outputs
arrive. Each server has its own registry, so several servers (tests) can live in one process.

The token counters and latency histograms are updated for every streamed chunk of every request
(hundreds of thousands of times a second at saturation), so they are plain Python numbers
(`LocalHistogram`, `StreamCounters`) that a collector turns into Prometheus families when
`/metrics` is scraped: prometheus_client's own take a lock per update and a histogram observes one
value at a time, where a chunk of n tokens is n observations of one inter-token time. Everything
here is written and read on the server's event loop thread alone.

Several API server processes may share one engine; a scrape on any of them exports the
request-side numbers summed over all of them (`hallm.entrypoints.openai.metrics_share`).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator

import msgspec
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from hallm.core.engine_protocol import EngineStats
from hallm.entrypoints.openai.metrics_share import (
    MetricsShare,
    StreamSnapshot,
    decode_snapshot,
    encode_snapshot,
)

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)


#: The KV connector counters exported as `hallm:kv_connector_<name>` (totals since start).
KV_CONNECTOR_COUNTERS = {
    "tokens_loaded": "Prompt tokens loaded through the KV connector instead of computed, in total.",
    "tokens_saved": "Prompt tokens saved through the KV connector, in total.",
    "load_failures": "Requests whose KV load failed (their tokens were computed instead), in total.",
    "save_failures": "KV blocks the connector could not save (storage read-only, full, ...), in total.",
    "corrupt_blocks": "Stored KV blocks found truncated or corrupt (ignored), in total.",
    "evicted_blocks": "KV blocks the connector evicted from its storage to stay under its size cap, in total.",
    "offload_hit_tokens": "Prompt tokens found in the host-memory offload tier, in total.",
}


class LocalHistogram:
    """Prometheus histogram counts without a lock; `observe(value, n)` adds n observations of
    `value` at once. Bucket bounds are upper bounds, inclusive, as Prometheus' `le`."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family(self, name: str, doc: str, label: str) -> HistogramMetricFamily:
        return _histogram_family(name, doc, label, self.bounds, self.counts, self.sum)


def _histogram_family(
    name: str, doc: str, label: str, bounds: tuple[float, ...], counts: list[int], total: float
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["model_name"])
    buckets, cumulative = [], 0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
    family.add_metric([label], buckets, sum_value=total)
    return family


def _fits(snapshot: StreamSnapshot) -> bool:
    """Whether `snapshot`'s histograms have the bucket counts of this module's bounds."""
    return (
        len(snapshot.ttft_counts) == len(_TTFT_BUCKETS) + 1
        and len(snapshot.tpot_counts) == len(_TPOT_BUCKETS) + 1
        and len(snapshot.e2e_counts) == len(_E2E_BUCKETS) + 1
    )


class StreamCounters:
    """The per-chunk token metrics and the finished sequences of one server, exported by
    `collect()` at scrape time; with a `share`, summed with the other processes' snapshots."""

    def __init__(self, model_name: str, share: MetricsShare | None = None) -> None:
        self.model_name = model_name
        self.share = share
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = LocalHistogram(_TTFT_BUCKETS)
        self.tpot = LocalHistogram(_TPOT_BUCKETS)
        self.e2e = LocalHistogram(_E2E_BUCKETS)
        # in the order the reasons first finished, as prometheus_client exports a counter's children
        self.success: dict[str, int] = {}
        self.success_created: dict[str, float] = {}

    def finished(self, finish_reason: str, e2e: float) -> None:
        success = self.success
        if finish_reason in success:
            success[finish_reason] += 1
        else:
            success[finish_reason] = 1
            self.success_created[finish_reason] = time.time()
        self.e2e.observe(e2e)

    def snapshot(self) -> StreamSnapshot:
        """These numbers now (copies: the snapshot does not follow later updates)."""
        return StreamSnapshot(
            self.prompt_tokens,
            self.generation_tokens,
            list(self.ttft.counts),
            self.ttft.sum,
            list(self.tpot.counts),
            self.tpot.sum,
            list(self.e2e.counts),
            self.e2e.sum,
            dict(self.success),
            dict(self.success_created),
        )

    def publish(self) -> StreamSnapshot:
        """Publish this process' snapshot to the share (there must be one) and return it."""
        assert self.share is not None
        snapshot = self.snapshot()
        self.share.publish(encode_snapshot(snapshot))
        return snapshot

    def collect(self) -> Iterator[Metric]:
        if self.share is None:
            yield from self._families(
                self.prompt_tokens,
                self.generation_tokens,
                (self.ttft.counts, self.ttft.sum),
                (self.tpot.counts, self.tpot.sum),
                (self.e2e.counts, self.e2e.sum),
                self.success,
                self.success_created,
            )
            return
        # publishing first keeps what this scrape shows and what the others see consistent
        total = self.publish()
        for data in self.share.read_others():
            try:
                other = decode_snapshot(data)
            except msgspec.DecodeError:  # not a snapshot of this build: nothing to add
                continue
            if _fits(other):
                total.add(other)
        yield from self._families(
            total.prompt_tokens,
            total.generation_tokens,
            (total.ttft_counts, total.ttft_sum),
            (total.tpot_counts, total.tpot_sum),
            (total.e2e_counts, total.e2e_sum),
            total.success,
            total.success_created,
        )

    def _families(
        self,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: tuple[list[int], float],
        tpot: tuple[list[int], float],
        e2e: tuple[list[int], float],
        success: dict[str, int],
        success_created: dict[str, float],
    ) -> Iterator[Metric]:
        label = self.model_name
        # Exported as prometheus_client's labelled Counter would be (the same family, samples and
        # `_created` switch); it comes first, where such a Counter registered before this
        # collector would.
        finished = CounterMetricFamily(
            "hallm:request_success",
            "Sequences finished, by finish reason.",
            labels=["model_name", "finished_reason"],
        )
        use_created = getattr(_prometheus_metrics, "_use_created", True)
        for reason, count in success.items():
            created = success_created.get(reason) if use_created else None
            finished.add_metric([label, reason], count, created=created)
        yield finished
        prompt = CounterMetricFamily("hallm:prompt_tokens", "Prompt tokens prefilled.", labels=["model_name"])
        prompt.add_metric([label], prompt_tokens)
        generated = CounterMetricFamily("hallm:generation_tokens", "Tokens generated.", labels=["model_name"])
        generated.add_metric([label], generation_tokens)
        yield prompt
        yield generated
        yield _histogram_family(
            "hallm:time_to_first_token_seconds", "Time to first token.", label, _TTFT_BUCKETS, *ttft
        )
        yield _histogram_family(
            "hallm:time_per_output_token_seconds",
            "Time between output tokens (inter-token latency).",
            label,
            _TPOT_BUCKETS,
            *tpot,
        )
        yield _histogram_family(
            "hallm:e2e_request_latency_seconds",
            "End-to-end latency of a sequence.",
            label,
            _E2E_BUCKETS,
            *e2e,
        )


class ServerMetrics:
    """The server's metrics; `model_name` is the `model_name` label of every series. With a
    `share` (one of several API server processes), the request-side metrics exported are the sum
    over the processes; `publish()` then needs calling now and then (about once a second, and at
    shutdown) so that the others' scrapes stay current."""

    def __init__(self, model_name: str, share: MetricsShare | None = None) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._label = lab = {"model_name": model_name}
        r = self.registry

        # The single-label metrics are kept as this model's series, looked up once: `labels()`
        # costs more than the update itself, and the token metrics are updated for every
        # streamed token. Creating the series here also exports them (as 0) before the first
        # request.
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(**lab)

        self._running = gauge(
            "hallm:num_requests_running", "Sequences running in the engine (in the step batch)."
        )
        self._waiting = gauge("hallm:num_requests_waiting", "Sequences waiting to be scheduled.")
        self._kv_usage = gauge("hallm:kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (0-1).")
        self._free_blocks = gauge("hallm:kv_cache_free_blocks", "KV-cache blocks free to be handed out.")
        self._num_blocks = gauge(
            "hallm:kv_cache_num_blocks", "KV-cache blocks in the pool (one is reserved)."
        )
        self._hit_rate = gauge(
            "hallm:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up."
        )
        self._queries = gauge(
            "hallm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache, in total."
        )
        self._hits = gauge("hallm:prefix_cache_hits", "Prompt tokens found in the prefix cache, in total.")
        self._preemptions = gauge("hallm:num_preemptions", "Sequences preempted (KV cache full), in total.")
        self._aborted = gauge(
            "hallm:num_requests_aborted", "Sequences the engine aborted before they finished, in total."
        )
        kv_labels = [*labels, "connector"]
        self._kv_counters = {
            key: Gauge(f"hallm:kv_connector_{key}", doc, kv_labels, registry=r)
            for key, doc in KV_CONNECTOR_COUNTERS.items()
        }
        self._kv_offload_hit_rate = Gauge(
            "hallm:kv_offload_hit_rate",
            "Prompt tokens loaded from the offload tier / prompt tokens looked up in the prefix cache.",
            kv_labels,
            registry=r,
        )
        # `hallm:request_success` is exported by the stream collector, from plain numbers that
        # can be summed over processes.
        self.stream = StreamCounters(model_name, share)
        r.register(self.stream)

    def engine_stats(self, s: EngineStats) -> None:
        """Update the engine gauges from a stats snapshot."""
        lab = self._label
        self._running.set(s.num_running)
        self._waiting.set(s.num_waiting)
        self._kv_usage.set(s.kv_cache_usage)
        self._free_blocks.set(s.num_free_blocks)
        self._num_blocks.set(s.num_blocks)
        self._hit_rate.set(s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0)
        self._queries.set(s.prefix_cache_queries)
        self._hits.set(s.prefix_cache_hits)
        self._preemptions.set(s.num_preemptions)
        self._aborted.set(s.num_aborted)
        if s.kv_connector:
            counters = s.kv_connector_counters
            for key, gauge in self._kv_counters.items():
                gauge.labels(**lab, connector=s.kv_connector).set(counters.get(key, 0))
            if s.kv_connector == "offload":
                hits = counters.get("offload_hit_tokens", 0)
                rate = hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
                self._kv_offload_hit_rate.labels(**lab, connector=s.kv_connector).set(rate)

    def first_token(self, ttft: float, num_prompt_tokens: int) -> None:
        stream = self.stream
        stream.ttft.observe(ttft)
        stream.prompt_tokens += num_prompt_tokens
        stream.generation_tokens += 1

    def tokens(self, n: int, interval: float) -> None:
        """`n` more tokens arrived `interval` seconds after the previous ones (each of them
        counts as one inter-token time of interval / n)."""
        self.stream.generation_tokens += n
        self.stream.tpot.observe(interval / n, n)

    def finished(self, finish_reason: str, e2e: float) -> None:
        self.stream.finished(finish_reason, e2e)

    def publish(self) -> None:
        """Publish this process' request-side numbers to the other processes (nothing without a
        share)."""
        if self.stream.share is not None:
            self.stream.publish()

    def render(self) -> bytes:
        """The text exposition format (with a share, after publishing this process' numbers)."""
        return generate_latest(self.registry)
