"""StructuredOutputsParams: what a request's output must match (vLLM's fields and names)."""

from __future__ import annotations

import dataclasses
import json as jsonlib
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (the
    output is one of these strings), `grammar` (a Lark grammar, or GBNF/EBNF with `::=` rules),
    `json_object=True` (any JSON object).

    `disable_any_whitespace`: JSON without whitespace between tokens (compact). Otherwise
    `whitespace_pattern` (a regex) or, by default, up to `MAX_JSON_WHITESPACE` whitespace
    characters are allowed between JSON tokens.

    `tokenizer` is not for users: the engine sets it when it admits the request (the model's
    tokenizer source, from which the sampler's process loads the grammar's vocabulary).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must give exactly one of {', '.join(_KINDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if isinstance(self.json, dict):
            self.json = jsonlib.dumps(self.json)
        if self.json is not None:
            if not isinstance(self.json, str):
                raise ValueError(
                    f"structured_outputs.json must be a JSON schema, got {type(self.json).__name__}"
                )
            try:
                schema = jsonlib.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        for name in ("regex", "grammar", "whitespace_pattern", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {type(value).__name__}")
        if self.choice is not None:
            if (
                not isinstance(self.choice, list | tuple)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False):
            raise ValueError("structured_outputs.json_object must be a bool")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))
