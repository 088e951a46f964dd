"""Tool calling with the official openai client on a tiny random model: a named tool_choice and
"required" are enforced by structured output, so the calls always parse into the function's
arguments (validated with jsonschema), streamed or not; "auto" needs --tool-call-parser."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.utils import API_KEY, MODEL_NAME, Server

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "Forecast", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "noop"}},
]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
COMPACT = {"guided_whitespace_pattern": " ?"}  # keeps a random model's JSON short


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_named_tool_choice(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "weather"}},
        temperature=1.0,
        seed=1,
        n=3,
        max_tokens=60,
        extra_body=COMPACT,
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_named_tool_choice_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "weather"}},
            temperature=1.0,
            seed=2,
            max_tokens=60,
            stream=True,
            extra_body=COMPACT,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function is not None and calls[0].function.name == "weather" and calls[0].id
    arguments = "".join((tc.function.arguments or "") for tc in calls if tc.function)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_required_tool_choice(client: openai.OpenAI) -> None:
    for seed in range(2):
        out = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=100,
            extra_body=COMPACT,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        args = json.loads(call.function.arguments)
        if call.function.name == "weather":
            jsonschema.validate(args, WEATHER_PARAMS)
        else:
            assert call.function.name == "noop" and args == {}


def test_tool_messages_round_trip(client: openai.OpenAI) -> None:
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        max_tokens=4,
    )
    assert out.choices[0].message.tool_calls is None


def test_auto_needs_a_parser(client: openai.OpenAI, server_factory: Callable[..., Server]) -> None:
    with pytest.raises(openai.BadRequestError, match="tool-call-parser") as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )
    server = server_factory("--tool-call-parser", "hermes")
    auto = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    out = auto.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    # The random model writes no <tool_call>: its text is content.
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content is not None
    assert server.terminate(timeout=60) == 0
