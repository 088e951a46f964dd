"""SamplingParams: defaults, normalization, and validation messages that name the field."""

from __future__ import annotations

import pytest

from hallm.core import sampling_params as sp_module
from hallm.core.sampling_params import SamplingParams, SamplingParamsTypeError, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.sampling_type is SamplingType.RANDOM and not p.has_penalties


def test_normalization() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=1).temperature == 1.0 and isinstance(
        SamplingParams(temperature=1).temperature, float
    )
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(logit_bias={"5": 1.5}).logit_bias == {5: 1.5}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_greedy_neutralizes_truncation() -> None:
    p = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=3)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    assert (p.top_k, p.top_p, p.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(seed=1).sampling_type is SamplingType.RANDOM_SEED


def test_clone_and_child() -> None:
    p = SamplingParams(n=3, stop=["x"], seed=10, logit_bias={1: 2.0})
    c = p.clone()
    assert c == p and c is not p
    c.stop.append("y")
    assert p.stop == ["x"]
    kids = [p.child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12] and all(k.n == 1 for k in kids)
    assert SamplingParams(n=2).child(1).seed is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"n": 2, "best_of": 1}, "best_of must be >= n"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be -1 or 0 (disabled) or >= 1, got -2"),
        ({"min_p": 1.1}, "min_p must be in [0, 1]"),
        ({"min_p": -0.1}, "min_p must be in [0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"min_tokens": -1}, "min_tokens must be >= 0"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be <= max_tokens (10), got 20"),
        ({"logprobs": -1}, "logprobs must be in [0, 20]"),
        ({"logprobs": 21}, "logprobs must be in [0, 20]"),
        ({"prompt_logprobs": 100}, "prompt_logprobs must be in [0, 20]"),
        ({"stop": [""]}, "stop must not contain empty strings"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
        ({"stop": ["x"], "detokenize": False}, "stop strings require detokenize=True"),
        ({"logit_bias": {1: 101.0}}, "logit_bias values must be in [-100, 100]"),
        ({"temperature": 0.0, "best_of": 2}, "best_of must be 1 with greedy sampling"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"temperature": "0.7"}, "temperature"),
        ({"top_k": 2.0}, "top_k"),
        ({"seed": "42"}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"logprobs": 1.0}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
    ],
)
def test_wrong_types_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingParamsTypeError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(field)
    # Catchable both ways, so a server maps every bad request to a 400 with one except clause.
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_max_logprobs_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp_module, "MAX_LOGPROBS", 50)
    assert SamplingParams(logprobs=50).logprobs == 50
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 50\]"):
        SamplingParams(logprobs=51)


def test_verify_vocab() -> None:
    SamplingParams(logit_bias={9: 1.0}).verify_vocab(10)
    with pytest.raises(ValueError, match="logit_bias token ids must be < vocab size 10"):
        SamplingParams(logit_bias={10: 1.0}).verify_vocab(10)
