"""Tool-call parsers on the formats popular chat templates emit, whole and streamed (in pieces of
every size: the streamed calls and content add up to the whole-text result), and tools reaching
the chat template."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hallm.entrypoints.openai.chat_template import render_chat
from hallm.entrypoints.openai.tool_calls import ToolReply
from hallm.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolCallStream

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"tz": "Europe/Paris"}

CASES: dict[str, tuple[str, str | None, list[tuple[str, dict[str, Any]]]]] = {
    # name: (parser, model output, expected content, expected calls)
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "Let me check.\n",
        [("weather", WEATHER), ("time", TIME)],
    ),
    "llama3_json": (
        '{"name": "weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "time", "parameters": {"tz": "Europe/Paris"}}',
        None,
        [("weather", WEATHER), ("time", TIME)],
    ),
    "mistral": (
        '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "time", "arguments": {"tz": "Europe/Paris"}}]',
        None,
        [("weather", WEATHER), ("time", TIME)],
    ),
}


def as_pairs(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name", list(CASES))
def test_extract(name: str) -> None:
    text, content, calls = CASES[name]
    parser = TOOL_PARSERS[name]()
    got_content, got_calls = parser.extract(text)
    assert got_content == content
    assert as_pairs(got_calls) == calls
    # Text without calls is all content.
    assert parser.extract("Just words, no calls.") == ("Just words, no calls.", [])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_deltas_add_up(name: str, piece: int) -> None:
    text, content, calls = CASES[name]
    stream = ToolCallStream(TOOL_PARSERS[name]())
    deltas = []
    for i in range(0, len(text), piece):
        deltas += stream.feed(text[i : i + piece])
    deltas += stream.finish()
    streamed_content = "".join(d.get("content", "") for d in deltas)
    assert streamed_content == (content or "")
    by_index: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = by_index.setdefault(tc["index"], {"name": "", "arguments": ""})
            fn = tc.get("function", {})
            entry["name"] += fn.get("name", "")
            entry["arguments"] += fn.get("arguments", "")
            if "id" in tc:
                assert tc["id"].startswith("call_") and tc["type"] == "function"
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(by_index.items())] == calls


def test_marker_prefix_is_held_back_then_released() -> None:
    stream = ToolCallStream(TOOL_PARSERS["hermes"]())
    assert stream.feed("a <tool") == [{"content": "a "}]
    assert stream.feed("box> b") == [{"content": "<toolbox> b"}]  # not the marker after all
    assert stream.finish() == []


def test_required_and_named_replies() -> None:
    reply = ToolReply("required", None, None, parallel=True)
    content, calls = reply.final('[{"name": "weather", "parameters": {"city": "Rome"}}]')
    assert content is None and as_pairs(calls) == [("weather", {"city": "Rome"})]
    reply = ToolReply("named", None, "weather", parallel=True)
    deltas = reply.feed('{"city": ') + reply.feed('"Oslo"}') + reply.finish()
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "weather", "arguments": ""}
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas)
    assert json.loads(args) == {"city": "Oslo"}
    # parallel_tool_calls=False keeps the first call
    text = CASES["hermes"][0]
    content, calls = ToolReply("auto", TOOL_PARSERS["hermes"](), None, parallel=False).final(text)
    assert as_pairs(calls) == [("weather", WEATHER)]


def test_tools_reach_the_chat_template() -> None:
    from tests.utils.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    template = (
        "{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %}{{ c['function']['name'] }}({{ c['function']['arguments']['city'] }})"
        "{% endfor %}{% endfor %}"
    )
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Rome"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    text = render_chat(tokenizer, messages, add_generation_prompt=False, chat_template=template, tools=tools)
    assert text == "[weather]<user>hi<assistant>weather(Rome)<tool>sunny"


def test_required_calls_stream_as_they_are_written() -> None:
    """tool_choice "required": each call's head as soon as its name closes, its arguments while
    they are written, whatever the chunking; the arguments parse to what the array holds."""
    import random

    text = (
        '[ {"name": "weather", "parameters": {"city": "Ro\\"me", "days": [1, {"y": "}"}]}} ,'
        ' {"parameters": {}, "name": "noop"}, {"name": "n", "parameters": 5} ]'
    )
    expected = [(c["name"], c["parameters"]) for c in json.loads(text)]
    for seed in range(50):
        rnd = random.Random(seed)
        reply = ToolReply("required", None, None, parallel=True)
        deltas, i, first_name_at = [], 0, None
        while i < len(text):
            k = rnd.randint(1, 7)
            deltas += reply.feed(text[i : i + k])
            i += k
            if first_name_at is None and deltas:
                first_name_at = i
        deltas += reply.finish()
        assert first_name_at is not None and first_name_at < text.index('"parameters": {"city"') + 20
        calls: dict[int, list[str]] = {}
        for d in deltas:
            (tc,) = d["tool_calls"]
            entry = calls.setdefault(tc["index"], ["", ""])
            entry[0] += tc["function"].get("name", "")
            entry[1] += tc["function"].get("arguments", "")
        assert [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())] == expected
        assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == expected
    single = ToolReply("required", None, None, parallel=False)
    deltas = single.feed(text) + single.finish()
    assert {d["tool_calls"][0]["index"] for d in deltas} == {0} and len(single.calls) == 1
    plain = ToolReply("required", None, None, parallel=True)
    assert plain.feed("not json") == [] and plain.finish() == [{"content": "not json"}]
