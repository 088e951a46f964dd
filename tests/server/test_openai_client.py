"""The official `openai` client against `hallm serve`: sync and async, streaming and not,
completions and chat; usage is exact (stop strings included), logprobs and n/seed behave."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from hallm.version import __version__
from tests.server.utils import API_KEY, MODEL_NAME, Server

PROMPT = "The capital of France is"
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a color."},
]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def tokenize(server: Server, **body: Any) -> list[int]:
    resp = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["tokens"])


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == 256


def test_completion_sync_and_stream(client: openai.OpenAI, server: Server) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=8, extra_body=IGNORE_EOS
    )
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion" and full.model == MODEL_NAME
    assert [c.finish_reason for c in full.choices] == ["length"]
    assert full.usage is not None
    assert full.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    assert full.usage.completion_tokens == 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8

    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 8)


def test_chat_sync_and_stream(client: openai.OpenAI, server: Server) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_completion_tokens=6, extra_body=IGNORE_EOS
    )
    full = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert full.usage is not None
    assert full.usage.prompt_tokens == len(tokenize(server, messages=MESSAGES))
    assert full.usage.completion_tokens == 6
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 6
    for item in choice.logprobs.content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top token

    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens,
        6,
    )


def test_token_prompts_n_and_seed(client: openai.OpenAI) -> None:
    prompts = [[5, 6, 7, 8], [40, 41, 42]]
    kwargs: dict[str, Any] = dict(
        model=MODEL_NAME, prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=7
    )
    first = client.completions.create(**kwargs, extra_body=IGNORE_EOS)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert first.usage is not None
    assert first.usage.prompt_tokens == 7 and first.usage.completion_tokens == 16
    again = client.completions.create(**kwargs, extra_body=IGNORE_EOS)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # seeded: reproducible


def _stop_case(client: openai.OpenAI) -> tuple[str, str, int]:
    """(stop string, expected text, expected completion tokens) from a greedy completion."""
    base = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=24, logprobs=0, extra_body=IGNORE_EOS
    )
    tokens = base.choices[0].logprobs.tokens  # type: ignore[union-attr]
    text = base.choices[0].text
    for k in range(1, len(tokens)):
        tok, prefix = tokens[k], "".join(tokens[:k])
        usable = len(tok) >= 2 and tok.isascii() and tok.isalnum() and text.startswith(prefix + tok)
        if usable and (prefix + tok).find(tok) == len(prefix):  # the stop string first ends at token k
            return tok, prefix, k + 1
    pytest.skip(f"no usable stop string in {tokens}")


def test_stop_string_usage_is_exact(client: openai.OpenAI) -> None:
    stop, expected, n_tokens = _stop_case(client)
    kwargs: dict[str, Any] = dict(
        model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=24, stop=[stop], extra_body=IGNORE_EOS
    )
    out = client.completions.create(**kwargs)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    assert out.usage is not None and out.usage.completion_tokens == n_tokens

    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n_tokens


def test_async_client_concurrent(server: Server) -> None:
    async def main() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def chat(i: int, stream: bool) -> tuple[str, int]:
            messages = [{"role": "user", "content": f"Count to {i}."}]
            common: dict[str, Any] = dict(
                model=MODEL_NAME, messages=messages, max_tokens=5, extra_body=IGNORE_EOS
            )
            if not stream:
                r = await aclient.chat.completions.create(**common)
                assert r.usage is not None
                return r.choices[0].message.content or "", r.usage.completion_tokens
            s = await aclient.chat.completions.create(
                **common, stream=True, stream_options={"include_usage": True}
            )
            text, used = "", -1
            async for c in s:
                text += "".join(ch.delta.content or "" for ch in c.choices)
                used = c.usage.completion_tokens if c.usage else used
            return text, used

        async def complete(i: int, stream: bool) -> tuple[str, int]:
            common: dict[str, Any] = dict(
                model=MODEL_NAME, prompt=f"{i} + {i} =", max_tokens=5, extra_body=IGNORE_EOS
            )
            if not stream:
                r = await aclient.completions.create(**common)
                assert r.usage is not None
                return r.choices[0].text, r.usage.completion_tokens
            s = await aclient.completions.create(
                **common, stream=True, stream_options={"include_usage": True}
            )
            text, used = "", -1
            async for c in s:
                text += "".join(ch.text for ch in c.choices)
                used = c.usage.completion_tokens if c.usage else used
            return text, used

        jobs = [f(i, stream) for i in range(2) for f in (chat, complete) for stream in (False, True)]
        results = await asyncio.gather(*jobs)
        await aclient.close()
        assert [used for _, used in results] == [5] * len(jobs)

    asyncio.run(main())


def test_tokenize_detokenize(server: Server) -> None:
    text = "Hello, world! 123"
    ids = tokenize(server, prompt=text, add_special_tokens=False)
    resp = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=30)
    assert resp.status_code == 200 and resp.json() == {"prompt": text}
    body = httpx.post(f"{server.url}/tokenize", json={"prompt": text}, timeout=30).json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256


def test_health_version_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/version", timeout=10).json() == {"version": __version__}
    names = server.metrics()
    for name in (
        "hallm:num_requests_running",
        "hallm:num_requests_waiting",
        "hallm:kv_cache_usage_perc",
        "hallm:kv_cache_free_blocks",
        "hallm:prefix_cache_hit_rate",
        "hallm:prompt_tokens_total",
        "hallm:generation_tokens_total",
        "hallm:time_to_first_token_seconds_count",
        "hallm:time_per_output_token_seconds_count",
        "hallm:e2e_request_latency_seconds_count",
    ):
        assert name in names, name


def test_token_metrics_count_what_was_streamed(server: Server, client: openai.OpenAI) -> None:
    """One streamed and one plain completion of 6 tokens each: the token counters and the latency
    histograms grow by exactly what the two requests produced."""
    before = server.metrics()
    prompt = [11, 12, 13, 14, 15]
    extra = {"ignore_eos": True}
    stream = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body=extra
    )
    assert sum(1 for _ in stream) >= 1
    plain = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra
    )
    assert plain.usage is not None and plain.usage.completion_tokens == 6
    after = server.metrics()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("hallm:generation_tokens_total") == 12
    assert grew("hallm:prompt_tokens_total") == 10
    assert grew("hallm:time_to_first_token_seconds_count") == 2
    assert grew("hallm:time_per_output_token_seconds_count") == 10  # every token after the first
    assert grew("hallm:e2e_request_latency_seconds_count") == 2
    assert grew("hallm:request_success_total[length]") == 2
