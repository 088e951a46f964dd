"""What every request body of the OpenAI-compatible API shares (pydantic): strict validation, the
error a refused request raises, and the refusal of fields hallm does not implement.

Bodies are validated in strict JSON mode: a string where a number belongs is a 400 naming the field,
not a coercion. Nothing is silently dropped: a field hallm does not implement (a vLLM extra such as
use_beam_search, an OpenAI field such as audio, or a name nobody knows) is a 400 naming it, unless it
is given its "off" value; only OpenAI's bookkeeping fields (metadata, store, ...), which do not
change the output, are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


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


class Body(BaseModel):
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


class OpenBody(BaseModel):
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
