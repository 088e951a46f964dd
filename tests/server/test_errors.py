"""Bad input gets an OpenAI-style error body with the right status and a message naming the field
(or the limit); the API key guards /v1; nothing a client sends causes a 500."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tests.server.utils import API_KEY, MAX_MODEL_LEN, MODEL_NAME, Server

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}


def post(server: Server, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str | bytes) else {"json": body}
    return httpx.post(
        f"{server.url}{path}", headers=server.headers if headers is None else headers, timeout=60, **kwargs
    )


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/chat/completions", "{not json", None, ["not valid JSON"]),
        ("/v1/chat/completions", b"", None, ["not valid JSON"]),
        ("/v1/chat/completions", "[1, 2]", None, ["request body"]),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", ["temperature", "number"]),
        ("/v1/chat/completions", {**CHAT, "n": 1.5}, "n", ["n:", "integer"]),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream", ["stream", "boolean"]),
        ("/v1/chat/completions", {"model": MODEL_NAME}, "messages", ["messages is required"]),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", ["messages", "at least 1"]),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
            "messages.0.role",
            ["role"],
        ),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages.0.content",
            ["only text"],
        ),
        ("/v1/chat/completions", {**CHAT, "top_p": 5}, "top_p", ["top_p", "(0, 1]"]),
        (
            "/v1/chat/completions",
            {**CHAT, "temperature": -1},
            "temperature",
            ["temperature", "greater than or equal"],
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "presence_penalty": 3},
            "presence_penalty",
            ["presence_penalty", "[-2, 2]"],
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": 0},
            "max_tokens",
            ["max_tokens", "greater than or equal to 1"],
        ),
        ("/v1/chat/completions", {**CHAT, "n": 0}, "n", ["n:", "greater than or equal to 1"]),
        (
            "/v1/chat/completions",
            {**CHAT, "top_logprobs": 50, "logprobs": True},
            "top_logprobs",
            ["top_logprobs", "20"],
        ),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", ["requires logprobs"]),
        ("/v1/chat/completions", {**CHAT, "top_k": -5}, "top_k", ["top_k"]),
        ("/v1/chat/completions", {**CHAT, "stop": 7}, "stop", ["stop must be"]),
        (
            "/v1/chat/completions",
            {**CHAT, "logit_bias": {"99999": 1.0}},
            "logit_bias",
            ["logit_bias", "vocab"],
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stop_token_ids": [99999]},
            "stop_token_ids",
            ["stop_token_ids", "99999", "vocabulary"],
        ),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools.0.function", ["required"]),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt", ["prompt must be"]),
        ("/v1/completions", {**COMPLETION, "prompt": 5}, "prompt", ["prompt must be"]),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 99999]}, "prompt", ["99999", "vocabulary"]),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs", ["logprobs", "20"]),
        ("/v1/completions", {**COMPLETION, "min_p": 2.0}, "min_p", ["min_p", "[0, 1]"]),
        ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of", ["best_of"]),
        ("/detokenize", {"tokens": [-1]}, "tokens", ["-1", "vocabulary"]),
        ("/tokenize", {}, "prompt", ["prompt or messages"]),
    ],
)
def test_bad_input_is_400_naming_the_field(
    server: Server, path: str, body: Any, param: str | None, words: list[str]
) -> None:
    err = error_of(post(server, path, body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    for word in words:
        assert word in err["message"], err


def test_prompt_over_context_limit(server: Server) -> None:
    long_prompt = [5] * (MAX_MODEL_LEN + 10)
    err = error_of(post(server, "/v1/completions", {**COMPLETION, "prompt": long_prompt}), 400)
    assert f"maximum context length (max_model_len) is {MAX_MODEL_LEN} tokens" in err["message"]
    assert f"has {MAX_MODEL_LEN + 10} tokens" in err["message"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"

    err = error_of(
        post(server, "/v1/completions", {**COMPLETION, "prompt": [5] * 200, "max_tokens": 100}), 400
    )
    assert (
        f"is {MAX_MODEL_LEN} tokens" in err["message"]
        and "300 tokens (200 in the prompt, 100" in err["message"]
    )

    chat = {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}
    err = error_of(post(server, "/v1/chat/completions", chat), 400)
    assert f"is {MAX_MODEL_LEN} tokens" in err["message"] and err["param"] == "messages"


def test_unknown_model_is_404(server: Server) -> None:
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        err = error_of(post(server, path, {**body, "model": "gpt-17"}), 404)
        assert "`gpt-17` does not exist" in err["message"] and err["code"] == "model_not_found"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=1)


def test_unknown_route_and_method(server: Server) -> None:
    err = error_of(httpx.get(f"{server.url}/v1/nothing", headers=server.headers), 404)
    assert "/v1/nothing" in err["message"]
    err = error_of(httpx.get(f"{server.url}/v1/completions", headers=server.headers), 405)
    assert "GET" in err["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": f"Basic {API_KEY}"},
    ],
)
def test_api_key_required_on_v1(server: Server, headers: dict[str, str]) -> None:
    for resp in (
        httpx.get(f"{server.url}/v1/models", headers=headers),
        post(server, "/v1/chat/completions", CHAT, headers=headers),
    ):
        err = error_of(resp, 401)
        assert "API key" in err["message"] and err["code"] == "invalid_api_key"


def test_api_key_accepted_and_open_routes(server: Server) -> None:
    assert httpx.get(f"{server.url}/v1/models", headers=server.headers).status_code == 200
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


_ODD_VALUES: list[Any] = [None, "x", -1, 2**62, 10**30, 1.5e300, [], {}, True, [None], {"a": [1]}]
_FIELDS = [
    "model", "messages", "temperature", "top_p", "n", "stop", "seed", "logit_bias", "logprobs", "top_logprobs",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p", "min_tokens", "stream",
    "stream_options", "stop_token_ids", "ignore_eos", "response_format", "chat_template_kwargs",
    "max_completion_tokens", "skip_special_tokens",
]  # fmt: skip


def test_no_user_input_causes_a_500(server: Server) -> None:
    """Odd values in every field (sent concurrently, so the valid ones share engine steps)."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {**CHAT, field: value}) for field in _FIELDS for value in _ODD_VALUES
    ]
    for value in _ODD_VALUES:
        cases += [
            ("/v1/completions", {**COMPLETION, "prompt": value}),
            ("/tokenize", {"prompt": value}),
            ("/detokenize", {"tokens": value}),
        ]

    async def main() -> list[httpx.Response]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:

            async def send(path: str, body: dict[str, Any]) -> httpx.Response:
                async with limit:
                    return await client.post(path, json=body)

            return await asyncio.gather(*(send(path, body) for path, body in cases))

    responses = asyncio.run(main())
    for (path, body), resp in zip(cases, responses, strict=True):
        assert resp.status_code < 500, (path, body, resp.text)
        if resp.status_code != 200:
            error_of(resp, resp.status_code)
    assert {r.status_code for r in responses} >= {200, 400}
