"""`hallm bench serve`: load on any OpenAI-compatible server, vLLM's `bench serve` metrics.

Requests stream (`stream_options.include_usage`) so every chunk is timed: TTFT is the time to
the first chunk with text (a request that streams no text, e.g. ids outside the tokenizer's
vocabulary, is timed at its first chunk, as vLLM's benchmark does, and counted in the report),
ITL the gaps between text chunks, TPOT (latency - TTFT) / (output
tokens - 1) per request; output tokens come from the server's usage when it reports it (else the
number of text chunks). Arrivals: all at once (`request_rate=inf`) or a Poisson process of that
rate; `max_concurrency` caps the requests in flight (inf rate + a cap = fixed concurrency).

Prompts: for /v1/completions random token ids (exact lengths; ids in [100, vocab_size), so give
the model's vocabulary size, default 32000) and `ignore_eos` so each request generates its full
output length; for /v1/chat/completions random common words (about one token each).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had",
    "not", "but", "first", "one", "their", "its", "new", "after", "who", "they", "two", "have",
    "been", "more", "also", "other", "time", "year", "city", "world", "school", "state", "during",
    "into", "when", "people", "part", "made", "music", "over", "team", "game", "family", "house",
    "water",
)  # fmt: skip


@dataclasses.dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None
    endpoint: str = "completions"  # or "chat"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    request_rate: float = math.inf
    max_concurrency: int | None = None
    vocab_size: int = 32000
    seed: int = 0
    api_key: str | None = None
    timeout: float = 600.0
    temperature: float = 0.0


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int
    ttft: float
    latency: float
    itl: list[float]
    error: str | None = None
    # True when no chunk carried text: `ttft` is then the time to the first chunk.
    no_text: bool = False


@dataclasses.dataclass
class ServeBenchResult:
    config: dict[str, Any]
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    errors: list[str]
    no_text_requests: int = 0
    #: This client's own CPU seconds over the timed part: near `duration_s` (one core), the
    #: client rather than the server may be what limits the measured throughput.
    client_cpu_s: float = 0.0

    def report(self) -> str:
        c = self.config
        conc = c["max_concurrency"] if c["max_concurrency"] is not None else "unbounded"
        lines = [
            "============ Serving Benchmark Result ============",
            f"{'Endpoint:':<40}{c['base_url']}/{'chat/completions' if c['endpoint'] == 'chat' else 'completions'}",
            f"{'Request rate (req/s):':<40}{c['request_rate']}",
            f"{'Maximum request concurrency:':<40}{conc}",
            f"{'Successful requests:':<40}{self.completed}",
            f"{'Failed requests:':<40}{self.failed}",
            f"{'Benchmark duration (s):':<40}{self.duration_s:.2f}",
            f"{'Total input tokens:':<40}{self.total_input_tokens}",
            f"{'Total generated tokens:':<40}{self.total_output_tokens}",
            f"{'Request throughput (req/s):':<40}{self.request_throughput:.2f}",
            f"{'Output token throughput (tok/s):':<40}{self.output_throughput:.2f}",
            f"{'Total token throughput (tok/s):':<40}{self.total_token_throughput:.2f}",
            f"{'Client CPU (% of one core):':<40}{100 * self.client_cpu_s / max(self.duration_s, 1e-9):.0f}",
        ]
        if self.no_text_requests:
            lines.append(f"{'Requests with no text (TTFT at 1st chunk):':<40}{self.no_text_requests}")
        for title, name, stats in (
            ("Time to First Token", "TTFT", self.ttft_ms),
            ("Time per Output Token (excl. 1st token)", "TPOT", self.tpot_ms),
            ("Inter-token Latency", "ITL", self.itl_ms),
        ):
            lines.append(f"{title:-^50}")
            for key in ("mean", "p50", "p99"):
                label = {"mean": "Mean", "p50": "Median", "p99": "P99"}[key]
                lines.append(f"{f'{label} {name} (ms):':<40}{stats[key]:.2f}")
        lines.append("=" * 50)
        lines.extend(f"error: {e}" for e in self.errors[:5])
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    arr = np.asarray(values) * 1000.0
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
    }


def make_payloads(cfg: ServeBenchConfig, model: str) -> list[dict[str, Any]]:
    """The request bodies: random prompts and output lengths, uniform in [L(1-r), L(1+r)]."""
    rng = random.Random(cfg.seed)

    def length(center: int) -> int:
        return rng.randint(
            max(1, int(center * (1 - cfg.range_ratio))), max(1, int(center * (1 + cfg.range_ratio)))
        )

    low = min(100, cfg.vocab_size // 2)
    payloads = []
    for _ in range(cfg.num_prompts):
        n_in, n_out = length(cfg.input_len), length(cfg.output_len)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": n_out,
            "temperature": cfg.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cfg.endpoint == "chat":
            body["messages"] = [
                {"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(n_in))}
            ]
        else:
            body["prompt"] = [rng.randrange(low, cfg.vocab_size) for _ in range(n_in)]
        payloads.append(body)
    return payloads


_SSE_LINE_END = re.compile(rb"\r\n|\r|\n")


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data:` fields of an event stream. Split on the bytes SSE ends lines with (CR, LF,
    CRLF) only: a text decoder's line splitting also breaks at U+2028, U+0085 and the like, which
    JSON strings carry unescaped (generated text can hold them)."""
    pending = b""
    async for chunk in chunks:
        *lines, pending = _SSE_LINE_END.split(pending + chunk)
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


_decode_json = msgspec.json.Decoder().decode
_JSON = {"Content-Type": "application/json"}


def env_route(url: str, api_key: str | None) -> dict[str, Any]:
    """The proxy (HTTP(S)_PROXY, NO_PROXY) and ~/.netrc credentials aiohttp's `trust_env` would
    use for `url`, looked up once, as keyword arguments of `session.post`.

    With `trust_env` aiohttp reads the environment and parses ~/.netrc again for every request,
    twice on a worker thread; under a burst of a thousand requests those hops through the thread
    pool made the client, not the server, what paced the requests' arrival."""
    from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
    from yarl import URL

    target = URL(url)
    route: dict[str, Any] = {}
    with contextlib.suppress(LookupError):
        route["proxy"], route["proxy_auth"] = get_env_proxy_for_url(target)
    if api_key is None and target.host is not None:  # an Authorization header excludes `auth`
        with contextlib.suppress(LookupError):
            route["auth"] = basicauth_from_netrc(netrc_from_env(), target.host)
    return route


async def _one(
    session: Any,
    url: str,
    body: dict[str, Any],
    chat: bool,
    raw: bytes | None = None,
    route: dict[str, Any] | None = None,
) -> RequestResult:
    """One streamed request; `raw` is `body` encoded beforehand (else aiohttp encodes it here);
    `route` from `env_route`."""
    start = time.perf_counter()
    ttft = 0.0
    first_chunk: float | None = None
    last = start
    itl: list[float] = []
    chunks = 0
    prompt_tokens = len(body.get("prompt", []))
    output_tokens: int | None = None
    try:
        route = route or {}
        post = (
            session.post(url, json=body, **route)
            if raw is None
            else session.post(url, data=raw, headers=_JSON, **route)
        )
        async with post as resp:
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                return RequestResult(False, 0, 0, 0.0, 0.0, [], f"HTTP {resp.status}: {text[:200]}")
            async for data in _sse_data(resp.content.iter_any()):
                if data == b"[DONE]":
                    break
                if first_chunk is None:
                    first_chunk = time.perf_counter() - start
                obj = _decode_json(data)
                if "error" in obj:
                    return RequestResult(False, 0, 0, 0.0, 0.0, [], str(obj["error"])[:200])
                if obj.get("usage"):
                    output_tokens = obj["usage"].get("completion_tokens")
                    prompt_tokens = obj["usage"].get("prompt_tokens", prompt_tokens)
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if chunks == 0:
                            ttft = now - start
                        else:
                            itl.append(now - last)
                        last = now
                        chunks += 1
    except Exception as exc:
        return RequestResult(False, 0, 0, 0.0, 0.0, [], f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    no_text = chunks == 0
    if no_text:
        ttft = first_chunk if first_chunk is not None else latency
    n_out = output_tokens if output_tokens is not None else chunks
    return RequestResult(True, prompt_tokens, n_out, ttft, latency, itl, no_text=no_text)


async def run_benchmark(cfg: ServeBenchConfig) -> ServeBenchResult:
    """Warm up with one short request, then send every request and collect the metrics.

    aiohttp (C HTTP parser) rather than httpx: at a few hundred concurrent streams httpx's
    per-chunk Python cost made the client, not the server, the limit (benchmarks/results/gpu.md)."""
    import aiohttp

    base = cfg.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = cfg.max_concurrency or cfg.num_prompts
    connector = aiohttp.TCPConnector(limit=limit + 1)
    # Per connect and per read, as before: a long generation is no error while chunks keep coming.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout, sock_read=cfg.timeout)
    async with aiohttp.ClientSession(
        headers=headers,
        timeout=timeout,
        connector=connector,
        trust_env=False,  # the environment's proxy and netrc are looked up once: env_route
    ) as session:
        route = env_route(base, cfg.api_key or None)
        model = cfg.model
        if model is None:
            async with session.get(f"{base}/models", **route) as resp:
                resp.raise_for_status()
                model = (await resp.json())["data"][0]["id"]
        chat = cfg.endpoint == "chat"
        url = f"{base}/chat/completions" if chat else f"{base}/completions"
        payloads = make_payloads(cfg, model)
        warm = await _one(session, url, {**payloads[0], "max_tokens": 2}, chat, route=route)
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")

        rng = random.Random(cfg.seed + 1)
        semaphore = asyncio.Semaphore(limit)

        async def limited(body: dict[str, Any], raw: bytes) -> RequestResult:
            async with semaphore:
                return await _one(session, url, body, chat, raw, route)

        # Encoded before the clock starts: the client's JSON work is not the server's.
        raws = [msgspec.json.encode(body) for body in payloads]
        start, start_cpu = time.perf_counter(), time.process_time()
        tasks = []
        for body, raw in zip(payloads, raws, strict=True):
            tasks.append(asyncio.create_task(limited(body, raw)))
            if math.isfinite(cfg.request_rate) and cfg.request_rate > 0:
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        client_cpu = time.process_time() - start_cpu

    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    config = dataclasses.asdict(cfg)
    config.update(model=model, api_key=None, request_rate=str(cfg.request_rate))
    return ServeBenchResult(
        config=config,
        duration_s=duration,
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        ttft_ms=_stats([r.ttft for r in ok]),
        tpot_ms=_stats(tpots),
        itl_ms=_stats([x for r in ok for x in r.itl]),
        errors=[r.error for r in results if r.error],
        no_text_requests=sum(r.no_text for r in ok),
        client_cpu_s=client_cpu,
    )
