"""Streaming the calls of a `tool_choice: "required"` reply as they are written.

Structured output constrains such a reply to a JSON array of `{"name": ..., "parameters": {...}}`
objects, so it is well-formed JSON arriving a few characters at a time. `CallArrayStream` scans
each new character once (a small JSON state machine: nesting, strings, escapes, the key being
read) and turns the array into OpenAI's tool-call deltas as it goes: a call's head (index, id,
name) as soon as its name string closes, then its `parameters` value's text as argument deltas,
verbatim, while it is written. A `parameters` value written before the name is held until the
name arrives.
"""

from __future__ import annotations

import json
from typing import Any

from hallm.entrypoints.openai.tool_parsers.base import ToolCall


class CallArrayStream:
    """`feed(delta)` -> OpenAI delta dicts for the calls seen so far; `calls` when finished."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._text = ""
        self._pos = 0  # characters of _text scanned
        self._depth = 0  # 1: inside the array, 2: inside a call object
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._expect_key = False  # in a call object, before a key's ':'
        self._key: str | None = None  # the call object's key whose value is being read
        self._value_open = False  # that value has started and not ended
        self._scalar = False  # that value is a number, true, false or null
        self._name: str | None = None
        self._args: tuple[int, int | None] | None = None  # `parameters` text: start, end
        self._args_sent = 0

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._text += delta
        out: list[dict[str, Any]] = []
        while self._pos < len(self._text):
            self._step(self._pos, out)
            self._pos += 1
        self._send_args(out)
        return out

    def _step(self, i: int, out: list[dict[str, Any]]) -> None:
        c = self._text[i]
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if self._depth == 2:
                    self._string_closed(i, out)
            return
        if self._depth == 2 and self._scalar and (c in ",}" or c.isspace()):
            self._value_ended(i)
        if c == '"':
            self._in_string, self._string_start = True, i
            if self._depth == 2 and not self._expect_key:
                self._value_started(i)
        elif c in "[{":
            if self._depth == 2:
                self._value_started(i)
            self._depth += 1
            if self._depth == 2:  # a call object: the previous one's last arguments go first
                self._send_args(out)
                self._name, self._args, self._args_sent = None, None, 0
                self._expect_key = True
        elif c in "]}":
            self._depth -= 1
            if self._depth == 2:  # a container value of the call object ended
                self._value_ended(i + 1)
        elif self._depth == 2:
            if c == ":":
                self._expect_key = False
            elif c == ",":
                self._expect_key, self._key = True, None
            elif not c.isspace() and not self._expect_key and not self._value_open:
                self._value_started(i)
                self._scalar = True

    def _value_started(self, i: int) -> None:
        self._value_open = True
        if self._key == "parameters":
            self._args = (i, None)

    def _value_ended(self, end: int) -> None:
        if self._key == "parameters" and self._args is not None and self._args[1] is None:
            self._args = (self._args[0], end)
        self._value_open = self._scalar = False

    def _string_closed(self, i: int, out: list[dict[str, Any]]) -> None:
        if self._expect_key:
            self._key = json.loads(self._text[self._string_start : i + 1])
            return
        if self._key == "name" and self._name is None:
            self._name = json.loads(self._text[self._string_start : i + 1])
            self.calls.append(ToolCall(self._name, ""))
            call = self.calls[-1]
            head = {"index": len(self.calls) - 1, "id": call.call_id, "type": "function"}
            out.append({"tool_calls": [{**head, "function": {"name": self._name, "arguments": ""}}]})
        self._value_ended(i + 1)

    def _send_args(self, out: list[dict[str, Any]]) -> None:
        """The current call's `parameters` text not sent yet (once its name is out); while the
        value is open, trailing whitespace waits for what follows it."""
        if self._name is None or self._args is None:
            return
        start, end = self._args
        piece = self._text[start + self._args_sent : end if end is not None else len(self._text)]
        if end is None:
            piece = piece.rstrip()
        if piece:
            self._args_sent += len(piece)
            self.calls[-1].arguments += piece
            out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})
