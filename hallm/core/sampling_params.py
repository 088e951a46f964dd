"""SamplingParams: how one request is decoded (vLLM's fields, names and defaults).

Validation happens once, at construction, so that the sampler and the detokenizer can trust the
values on the hot path. Every error names the field and the allowed range, and is a `ValueError`
(type errors are `SamplingParamsTypeError`, which is both a `TypeError` and a `ValueError`, so a
server can turn any bad request into a 400 by catching `ValueError`).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from typing import Any

from hallm.core.structured_output.params import StructuredOutputsParams

#: Upper bound on `logprobs` and `prompt_logprobs` (vLLM's default `max_logprobs`). Read at
#: validation time, so an engine may raise it before building requests.
MAX_LOGPROBS: int = 20

#: Below this temperature a request is greedy (argmax), as in vLLM.
SAMPLING_EPS: float = 1e-5

#: `logit_bias` values are limited to the OpenAI API's range.
MAX_LOGIT_BIAS: float = 100.0

_SEED_MASK = (1 << 64) - 1


class SamplingType(enum.IntEnum):
    """How the sampler draws a request's next token."""

    GREEDY = 0  # argmax, no randomness
    RANDOM = 1  # random, from the device's default generator
    RANDOM_SEED = 2  # random, from the request's own seeded generator


class SamplingParamsTypeError(TypeError, ValueError):
    """A sampling parameter of the wrong type (also a ValueError, so one `except` covers both)."""


def _check_int(name: str, value: Any) -> int:
    # bool is an int subclass; `n=True` is a bug, not a request for one sequence.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsTypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


@dataclasses.dataclass
class SamplingParams:
    """Sampling parameters for one request, mirroring vLLM's `SamplingParams`.

    Greedy decoding is `temperature=0` (anything below 1e-5). `top_k` 0 or -1 means off (stored
    as 0). `max_tokens=None` means up to the model's context limit (resolved by the engine).
    `logprobs=k` returns the sampled token's logprob plus the top k (k=0: only the sampled one);
    logprobs are of the raw model distribution, before penalties and temperature (vLLM's default).
    `stop` is normalized to a list of strings and `stop_token_ids` to a list of ints.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    #: token id -> additive bias in [-100, 100] on the logits (OpenAI's `logit_bias`).
    logit_bias: dict[int, float] | None = None
    #: Constrain the output to a JSON schema, regex, choice or grammar (a dict is converted).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.n = _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.best_of is not None:
            self.best_of = _check_int("best_of", self.best_of)
            if self.best_of < self.n:
                raise ValueError(f"best_of must be >= n (n={self.n}), got {self.best_of}")

        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self.seed = _check_int("seed", self.seed)

        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)

        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(
                    f"max_tokens must be >= 1 (or None for the context limit), got {self.max_tokens}"
                )
        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            value = _check_int(name, value)
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] (MAX_LOGPROBS), got {value}")

        for name in (
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            _check_bool(name, getattr(self, name))
        if self.stop and not self.detokenize:
            raise ValueError("stop strings require detokenize=True; use stop_token_ids instead")

        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise SamplingParamsTypeError(f"structured_outputs: {e}") from None
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise SamplingParamsTypeError(
                "structured_outputs must be a StructuredOutputsParams (or a dict of its fields), got "
                f"{type(self.structured_outputs).__name__}"
            )

        if self.is_greedy:
            # Greedy ignores the truncation knobs; neutral values let the sampler skip them.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.best_of is not None and self.best_of > 1:
                raise ValueError(
                    f"best_of must be 1 with greedy sampling (temperature=0), got {self.best_of}"
                )

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise SamplingParamsTypeError(
                f"stop must be a str, a list of str or None, got {type(stop).__name__}"
            )
        for s in stop:
            if not isinstance(s, str):
                raise SamplingParamsTypeError(f"stop must contain only str, got {type(s).__name__} {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")
        return list(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise SamplingParamsTypeError(f"stop_token_ids must be a list of int, got {type(ids).__name__}")
        out = [_check_int("stop_token_ids", i) for i in ids]
        if any(i < 0 for i in out):
            raise ValueError(f"stop_token_ids must be >= 0, got {out}")
        return out

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise SamplingParamsTypeError(
                f"logit_bias must be a dict of token id -> float, got {type(bias).__name__}"
            )
        out: dict[int, float] = {}
        for key, value in bias.items():
            # JSON object keys are strings; accept "123" as token 123 (OpenAI clients send that).
            if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                key = int(key)
            token = _check_int("logit_bias token id", key)
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            v = _check_float("logit_bias value", value)
            if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {v} for token {token}")
            out[token] = v
        return out or None

    # ------------------------------------------------------------------ derived properties

    @property
    def is_greedy(self) -> bool:
        """True when the request decodes by argmax (temperature below 1e-5)."""
        return self.temperature < SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY, RANDOM_SEED (a seed was given) or RANDOM."""
        if self.is_greedy:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def has_penalties(self) -> bool:
        """True when any of presence/frequency/repetition penalty changes the logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def torch_seed(self) -> int | None:
        """`seed` folded into the unsigned 64-bit range that `torch.Generator.manual_seed` accepts."""
        return None if self.seed is None else self.seed & _SEED_MASK

    def verify_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model cannot produce; call once when the request is admitted."""
        if self.logit_bias:
            bad = sorted(t for t in self.logit_bias if t >= vocab_size)
            if bad:
                raise ValueError(f"logit_bias token ids must be < vocab size {vocab_size}, got {bad}")

    # ------------------------------------------------------------------ copies

    def clone(self) -> SamplingParams:
        """A deep copy (lists and dicts are not shared with the original)."""
        return copy.deepcopy(self)

    def child(self, index: int) -> SamplingParams:
        """Params of the `index`-th of `n` parallel sequences: n=1, and with a seed, seed + index.

        Deterministic (as vLLM does), so a seeded n>1 request reproduces every one of its samples.
        """
        params = self.clone()
        params.n = 1
        params.best_of = None
        if params.seed is not None:
            params.seed = params.seed + index
        return params
