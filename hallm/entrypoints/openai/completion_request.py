"""The body of POST /v1/completions."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from hallm.core.sampling_params import MAX_LOGPROBS, SamplingParams
from hallm.entrypoints.openai.request_body import RequestError
from hallm.entrypoints.openai.sampling_fields import SamplingFields


class CompletionRequest(SamplingFields):
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
            or (isinstance(value, list) and value and _all_token_ids(value))
            or (
                isinstance(value, list)
                and value
                and all(isinstance(p, list) and p and _all_token_ids(p) for p in value)
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


def _all_token_ids(values: list[Any]) -> bool:
    """Every item an int (JSON gives exact ints; a bool is not a token id). Prompts run to
    thousands of ids: one set of item types, not a Python call per id."""
    return set(map(type, values)) == {int}
