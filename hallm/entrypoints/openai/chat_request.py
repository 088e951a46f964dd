"""The body of POST /v1/chat/completions: messages, tools and tool_choice (which become an output
constraint when a call is required or named)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from hallm.core.sampling_params import MAX_LOGPROBS, SamplingParams
from hallm.entrypoints.openai.request_body import Body, RequestError
from hallm.entrypoints.openai.sampling_fields import SamplingFields


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    """A message; fields of a reply that clients send back (annotations, audio, ...) are ignored."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str:
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list):
            texts = []
            for part in value:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        "content parts must be {'type': 'text', 'text': '...'}; only text is supported"
                    )
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("content must be a string or a list of text parts")

    def to_template(self) -> dict[str, Any]:
        # Most chat templates know no "developer" role; OpenAI treats it as the system prompt.
        msg: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content,
        }
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Templates read the arguments as a mapping (HF's convention), OpenAI sends JSON text.
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        return msg


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**63 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**63 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is not None and self.stream:
            raise RequestError(
                "prompt_logprobs are not available when streaming chat completions", "prompt_logprobs"
            )
        return self._sampling_params(max_tokens, logprobs, prompt_logprobs)

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named: how tools shape the reply (OpenAI's default with tools is auto)."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise RequestError("tool_choice needs tools", "tool_choice")
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else "named"

    def named_tool(self) -> FunctionDefinition:
        assert isinstance(self.tool_choice, NamedToolChoice) and self.tools
        name = self.tool_choice.function.name
        for tool in self.tools:
            if tool.function.name == name:
                return tool.function
        raise RequestError(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")

    def structured_output_sources(self) -> list[tuple[str, dict[str, Any]]]:
        sources = super().structured_output_sources()
        mode = self.tool_mode
        if mode == "named":
            sources.append(("tool_choice", {"json": _parameters(self.named_tool())}))
        elif mode == "required":
            assert self.tools
            one_of = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _parameters(t.function),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            items: dict[str, Any] = {"anyOf": one_of}
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
            if self.parallel_tool_calls is False:
                schema["maxItems"] = 1
            sources.append(("tool_choice", {"json": schema}))
        return sources

    def template_tools(self) -> list[dict[str, Any]] | None:
        return None if not self.tools else [t.model_dump(exclude_none=True) for t in self.tools]

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]


def _parameters(function: FunctionDefinition) -> dict[str, Any]:
    """A function's parameters schema; none means no arguments (an empty object)."""
    return function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
