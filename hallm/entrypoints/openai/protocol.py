"""Request bodies of the OpenAI-compatible API (pydantic), and their mapping to SamplingParams.

Fields are OpenAI's plus vLLM's extras (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, prompt_logprobs, ...). Bodies are
validated in strict JSON mode: a string where a number belongs is a 400 naming the field, not a
coercion. Nothing is silently dropped: a field hallm does not implement (a vLLM extra such as
use_beam_search, an OpenAI field such as audio, or a name nobody knows) is a 400 naming it,
unless it is given its "off" value; only OpenAI's bookkeeping fields (metadata, store, ...),
which do not change the output, are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hallm.core.sampling_params import MAX_LOGPROBS, SamplingParams
from hallm.core.structured_output.params import StructuredOutputsParams

MAX_N = 128

#: Integers travel to the engine process as MessagePack (64-bit): larger ones are a 400 here.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class RequestError(ValueError):
    """A request the server refuses with an OpenAI error body (400 unless `status` says otherwise)."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


#: Fields accepted and ignored: OpenAI bookkeeping that does not change what is generated.
_BOOKKEEPING = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})

#: Fields hallm does not implement (vLLM extras, OpenAI features), with the value meaning "off",
#: which is accepted; any other value is a 400 naming the field.
_NOT_IMPLEMENTED: dict[str, Any] = {
    # vLLM extras
    "use_beam_search": False,
    "length_penalty": 1.0,
    "allowed_token_ids": None,
    "bad_words": [],
    "logits_processors": None,
    "cache_salt": None,
    "kv_transfer_params": None,
    "vllm_xargs": None,
    "mm_processor_kwargs": None,
    "priority": 0,
    "structural_tag": None,
    "prompt_embeds": None,
    "return_token_ids": False,
    "include_reasoning": True,
    "thinking_token_budget": None,
    "media_io_kwargs": None,
    # OpenAI features
    "audio": None,
    "modalities": ["text"],
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
    "verbosity": None,
    "functions": None,
    "function_call": None,
}


class _OpenBody(BaseModel):
    """A body that keeps the fields it does not declare, so that `refuse_unknown` can name them."""

    model_config = ConfigDict(strict=True, extra="allow")

    def refuse_unknown(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in _BOOKKEEPING:
                continue
            if name in _NOT_IMPLEMENTED:
                off = _NOT_IMPLEMENTED[name]
                if value is None or value == off:
                    continue
                raise RequestError(
                    f"{name} is not supported by this server; omit it (or set it to {off!r})", name
                )
            raise RequestError(f"unknown field {name!r}; this server does not implement it", name)


class StreamOptions(_OpenBody):
    include_usage: bool = False
    #: vLLM's: every chunk carries the usage so far (with include_usage).
    continuous_usage_stats: bool = False


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("stop must be a string, a list of strings or null")


class _SamplingFields(_OpenBody):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: Int64 | None = None
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=2**63 - 1)
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=-1, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = Field(None, min_length=1, max_length=256)
    #: vLLM's: keep only the prompt's last k tokens (-1: as many as fit the context).
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # structured output: OpenAI's response_format, vLLM's structured_outputs and guided_* extras
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None

    @field_validator("stop")
    @classmethod
    def _validate_stop(cls, value: Any) -> Any:
        return _check_stop(value)

    def structured_output_sources(self) -> list[tuple[str, dict[str, Any]]]:
        """(request field, StructuredOutputsParams fields) for each way this request constrains
        its output; subclasses add theirs (tools)."""
        sources: list[tuple[str, dict[str, Any]]] = []
        if self.structured_outputs is not None:
            sources.append(("structured_outputs", dict(self.structured_outputs)))
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        for name, value in guided.items():
            if value is not None:
                sources.append((f"guided_{name}", {name: value}))
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type", "text")
            if kind == "json_object":
                sources.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise RequestError(
                        "response_format json_schema needs json_schema.schema, a JSON schema object",
                        "response_format",
                    )
                sources.append(("response_format", {"json": schema}))
            elif kind != "text":
                raise RequestError(
                    f"response_format type must be text, json_object or json_schema, got {kind!r}",
                    "response_format",
                )
        return sources

    def constraint_field(self) -> str:
        """The request field that constrains the output (for error messages)."""
        sources = self.structured_output_sources()
        return sources[0][0] if sources else "structured_outputs"

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        if self.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
            raise RequestError(
                f"guided_decoding_backend {self.guided_decoding_backend!r} is not available: this server's "
                "structured output engine is llguidance ('guidance')",
                "guided_decoding_backend",
            )
        sources = self.structured_output_sources()
        if not sources:
            if self.guided_whitespace_pattern is not None:
                raise RequestError(
                    "guided_whitespace_pattern needs a JSON constraint", "guided_whitespace_pattern"
                )
            return None
        if len(sources) > 1:
            raise RequestError(
                f"give one output constraint, not several: {', '.join(name for name, _ in sources)}",
                sources[1][0],
            )
        param, fields = sources[0]
        fields.pop("tokenizer", None)  # the server binds the vocabulary itself
        if self.guided_whitespace_pattern is not None:
            fields["whitespace_pattern"] = self.guided_whitespace_pattern
        try:
            return StructuredOutputsParams(**fields)
        except TypeError as e:
            raise RequestError(f"{param}: {e}", param) from None
        except ValueError as e:
            raise RequestError(str(e), param) from None

    def truncate(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt with truncate_prompt_tokens applied (its last k tokens)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return token_ids
        if k == 0:
            raise RequestError(
                "truncate_prompt_tokens must be >= 1 (or -1 for the context length)", "truncate_prompt_tokens"
            )
        return token_ids[-(max_model_len if k == -1 else k) :]

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        self.refuse_unknown()
        if self.stream_options is not None:
            self.stream_options.refuse_unknown()
        if prompt_logprobs == -1:
            raise RequestError(
                f"prompt_logprobs=-1 (the whole vocabulary) is not supported; ask for at most {MAX_LOGPROBS}",
                "prompt_logprobs",
            )
        structured = self._structured_outputs()
        # Unset optional knobs keep SamplingParams' defaults; "123" logit_bias keys become ints there.
        opt: dict[str, Any] = {
            "logit_bias": self.logit_bias,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        try:
            return SamplingParams(
                n=self.n,
                max_tokens=max_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=structured,
                **{k: v for k, v in opt.items() if v is not None},
            )
        except ValueError as exc:  # SamplingParams' messages start with the field's name
            field = str(exc).split(" ", 1)[0]
            raise RequestError(str(exc), field if field in type(self).model_fields else None) from None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1, le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: BOS etc. added to text prompts

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        ok = (
            isinstance(value, str)
            or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))
            or (isinstance(value, list) and value and all(_is_token_id(t) for t in value))
            or (
                isinstance(value, list)
                and value
                and all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value)
            )
        )
        if not ok:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                "token ids (none of them empty)"
            )
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings and token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is not supported; omit it or set it equal to n", "best_of")
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs  # echo + logprobs scores the prompt tokens too
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
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


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
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


class TokenizeRequest(_OpenBody):
    """POST /tokenize: a prompt, or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    #: None: True for a prompt, False for messages (the template already adds the special tokens).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_OpenBody):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


def _parameters(function: FunctionDefinition) -> dict[str, Any]:
    """A function's parameters schema; none means no arguments (an empty object)."""
    return function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
