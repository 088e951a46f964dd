"""A chat reply's text -> its content and tool calls, by the request's tool mode:

- none: all content.
- auto: the server's tool-call parser (--tool-call-parser) finds calls the model chose to write.
- named: the output was constrained to the function's arguments (structured output): it is the
  call's arguments, streamed as argument deltas.
- required: the output was constrained to a JSON array of {"name", "parameters"}: its calls,
  streamed as each call's name and argument text arrive (`CallArrayStream`).
"""

from __future__ import annotations

import json
from typing import Any

from hallm.entrypoints.openai.tool_parsers import ToolCall, ToolCallStream, ToolParser
from hallm.entrypoints.openai.tool_parsers.call_array_stream import CallArrayStream


def _call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    head = {
        "index": index,
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    return [
        {"tool_calls": [head]},
        {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
    ]


class ToolReply:
    """One choice's reply. Non-streaming: `final(text)`. Streaming: `feed(delta)` for each text
    delta and `finish()` at the end, each returning OpenAI delta dicts (content / tool_calls)."""

    def __init__(self, mode: str, parser: ToolParser | None, named: str | None, parallel: bool) -> None:
        self.mode = mode
        self.parser = parser
        self.named = named
        self.parallel = parallel
        self.text = ""
        self.calls: list[ToolCall] = []
        self._stream = ToolCallStream(parser) if mode == "auto" and parser is not None else None
        self._array = CallArrayStream() if mode == "required" else None

    def final(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "named":
            assert self.named is not None
            self.calls = [ToolCall(self.named, _normalized(text))]
            return None, self.calls
        if self.mode == "required":
            self.calls = _required_calls(text)
            return (None, self.calls) if self.calls else (text, [])
        if self.mode == "auto" and self.parser is not None:
            content, calls = self.parser.extract(text)
            self.calls = calls if self.parallel else calls[:1]
            return content, self.calls
        return text, []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        if self._stream is not None:
            return self._limit(self._stream.feed(delta))
        if self.mode == "named":
            assert self.named is not None
            out: list[dict[str, Any]] = []
            if not self.calls:
                self.calls = [ToolCall(self.named, "")]
                out.extend(_call_deltas(0, self.calls[0])[:1])
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        if self._array is not None:
            return self._limit(self._array.feed(delta))
        return [{"content": delta}] if delta else []

    def finish(self) -> list[dict[str, Any]]:
        if self._stream is not None:
            out = self._limit(self._stream.finish())
            self.calls = self._stream.calls if self.parallel else self._stream.calls[:1]
            return out
        if self.mode == "named":
            return self.feed("") if not self.calls else []
        if self._array is not None:
            calls = self._array.calls
            self.calls = calls if self.parallel else calls[:1]
            if not calls:  # not an array of calls (the constraint was not applied): plain text
                return [{"content": self.text}] if self.text else []
        return []

    def _limit(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.parallel:
            return deltas
        return [d for d in deltas if "tool_calls" not in d or d["tool_calls"][0]["index"] == 0]


def _normalized(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:  # cut short by max_tokens: what there is
        return text


def _required_calls(text: str) -> list[ToolCall]:
    try:
        items = json.loads(text)
    except ValueError:
        return []
    calls = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append(ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
    return calls


def message(content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
    """The reply's message object."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [c.to_openai() for c in calls]
    return msg


def finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    """OpenAI reports a reply that ended with tool calls as finish_reason "tool_calls"."""
    return "tool_calls" if calls and reason == "stop" else reason
