"""ToolParser: finds the tool calls a model wrote in its output text, at the end and while
streaming. A parser knows one format: where the tool-call section starts (a marker) and how to
read the calls in it; `ToolCallStream` turns that into OpenAI's streamed deltas (content until
the marker, then one call at a time as each is complete)."""

from __future__ import annotations

import abc
import dataclasses
import json
import uuid
from typing import Any


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    call_id: str = dataclasses.field(default_factory=_new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def call_from_object(obj: Any, arguments_key: str = "arguments") -> ToolCall | None:
    """{"name": ..., "arguments"/"parameters": {...}} -> ToolCall; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("parameters", obj.get("arguments", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def json_values(text: str) -> tuple[list[Any], int]:
    """The JSON values at the start of `text`, separated by whitespace, commas or semicolons, and
    how many characters they (and their separators) took; stops at the first incomplete one."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = 0
    end = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,;":
            pos += 1
        if pos >= len(text):
            return values, end
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return values, end
        values.append(value)
        end = pos


class ToolParser(abc.ABC):
    """One tool-call format. `start` is the text that begins the tool-call section."""

    name: str = ""
    start: str = ""

    def find_start(self, text: str) -> int:
        """Where the tool-call section starts in `text`, or -1."""
        return text.find(self.start)

    @abc.abstractmethod
    def calls_in(self, section: str, final: bool) -> list[ToolCall]:
        """The calls in a section (which begins with the marker); unless `final`, only the
        complete ones."""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content before the calls, or None when empty; the calls). Text that does not parse
        stays content, with no calls."""
        at = self.find_start(text)
        if at < 0:
            return text, []
        calls = self.calls_in(text[at:], final=True)
        if not calls:
            return text, []
        content = text[:at]
        return (content if content.strip() else None), calls


class ToolCallStream:
    """The streamed deltas of one choice: `feed(text)` -> list of delta dicts, `finish()` -> the
    last ones. Content is held back while it could be the beginning of the marker."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_content = 0  # characters of content already sent
        self.section_at: int | None = None
        self.num_sent_calls = 0
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        return self._deltas(final=False)

    def finish(self) -> list[dict[str, Any]]:
        out = self._deltas(final=True)
        if self.section_at is not None and not self.calls:  # a marker but no parsable call: content
            rest = self.text[self.sent_content :]
            self.sent_content = len(self.text)
            if rest:
                out.append({"content": rest})
        return out

    def _deltas(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.section_at is None:
            at = self.parser.find_start(self.text)
            if at >= 0:
                self.section_at = at
                safe = at
            elif final:
                safe = len(self.text)
            else:
                safe = len(self.text) - _partial_suffix(self.text, self.parser.start)
            if safe > self.sent_content:
                out.append({"content": self.text[self.sent_content : safe]})
                self.sent_content = safe
        if self.section_at is not None:
            calls = self.parser.calls_in(self.text[self.section_at :], final)
            for i in range(self.num_sent_calls, len(calls)):
                call = calls[i]
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call.call_id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
                out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
            self.calls.extend(calls[self.num_sent_calls :])
            self.num_sent_calls = len(calls)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
