"""The tool-call formats of popular chat templates."""

from __future__ import annotations

import json
import re

from hallm.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, call_from_object, json_values


class HermesToolParser(ToolParser):
    """Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call."""

    name = "hermes"
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(</tool_call>|$)", re.DOTALL)

    def calls_in(self, section: str, final: bool) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for match in self._block.finditer(section):
            if not match.group(2) and not final:
                break  # not closed yet
            try:
                call = call_from_object(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is None:
                break
            calls.append(call)
        return calls


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON: the reply is `{"name": ..., "parameters": {...}}` (after an optional
    `<|python_tag|>`), several separated by `;`."""

    name = "llama3_json"
    start = "{"

    def find_start(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith("<|python_tag|>"):
            return text.index("<|python_tag|>")
        return len(text) - len(stripped) if stripped.startswith("{") else -1

    def calls_in(self, section: str, final: bool) -> list[ToolCall]:
        values, _ = json_values(section.removeprefix("<|python_tag|>").lstrip())
        calls: list[ToolCall] = []
        for value in values:
            call = call_from_object(value, "parameters")
            if call is None:
                break
            calls.append(call)
        return calls


class MistralToolParser(ToolParser):
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`."""

    name = "mistral"
    start = "[TOOL_CALLS]"

    def calls_in(self, section: str, final: bool) -> list[ToolCall]:
        values, _ = json_values(section[len(self.start) :])
        calls: list[ToolCall] = []
        for value in values:
            for obj in value if isinstance(value, list) else [value]:
                call = call_from_object(obj)
                if call is None:
                    return calls
                calls.append(call)
        return calls
