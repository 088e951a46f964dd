"""The fields completions and chat completions share, and their mapping to SamplingParams.

Fields are OpenAI's plus vLLM's extras (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, prompt_logprobs, ...), and the
structured-output ones (response_format, structured_outputs, guided_*).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator

from hallm.core.sampling_params import MAX_LOGPROBS, SamplingParams
from hallm.core.structured_output.params import StructuredOutputsParams
from hallm.entrypoints.openai.request_body import OpenBody, RequestError

MAX_N = 128

#: Integers travel to the engine process as MessagePack (64-bit): larger ones are a 400 here.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(OpenBody):
    include_usage: bool = False
    #: vLLM's: every chunk carries the usage so far (with include_usage).
    continuous_usage_stats: bool = False


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("stop must be a string, a list of strings or null")


class SamplingFields(OpenBody):
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
