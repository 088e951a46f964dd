"""Bad input gets a clear error (a ValueError naming the field) and the engine keeps serving:
through LLM.generate (a later call still works) and through the engine API (a request already
running finishes correctly after another is refused)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.admission import InvalidRequestError
from hallm.core.outputs import RequestOutput
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM
from hallm.platforms import ConfigError

GOOD_PROMPT = "The capital of France is"
POOL_BLOCKS = 16  # 15 usable blocks of 4 tokens: 60 tokens
VOCAB = 512


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def llm(model_dir: str) -> LLM:
    return LLM(
        model=model_dir,
        device="cpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=POOL_BLOCKS,
        max_model_len=128,
    )


@pytest.fixture(scope="module")
def expected(llm: LLM) -> list[int]:
    (out,) = llm.generate(GOOD_PROMPT, greedy(), use_tqdm=False)
    return out.outputs[0].token_ids


def assert_still_serves(llm: LLM, expected: list[int]) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv.pool.num_free_blocks == engine.scheduler.kv.pool.num_usable_blocks
    (out,) = llm.generate(GOOD_PROMPT, greedy(), use_tqdm=False)
    assert out.outputs[0].token_ids == expected


BAD_REQUESTS: dict[str, tuple[Any, SamplingParams | None, str]] = {
    # name: (prompt, params or None for greedy(), a field the message must name)
    "empty string": ("", None, "prompt"),
    "empty ids": ({"prompt_token_ids": []}, None, "prompt"),
    "longer than max_model_len": ({"prompt_token_ids": [5] * 200}, None, "max_model_len"),
    "never fits the pool": ({"prompt_token_ids": [5] * 70}, None, "KV-cache blocks"),
    "grows past the pool": ({"prompt_token_ids": [5] * 20}, greedy(60), "max_tokens"),
    "out-of-vocab id": ({"prompt_token_ids": [5, VOCAB, 6]}, None, "prompt_token_ids"),
    "negative id": ({"prompt_token_ids": [5, -1]}, None, "prompt_token_ids"),
    "not a token id": ({"prompt_token_ids": [5, "x"]}, None, "prompt_token_ids"),
    "a bool id": ({"prompt_token_ids": [5, True]}, None, "prompt_token_ids"),
    "a float id": ({"prompt_token_ids": [5, 6.0]}, None, "prompt_token_ids"),
    "no prompt in dict": ({"text": "hi"}, None, "prompt_token_ids"),
    "out-of-vocab logit_bias": (GOOD_PROMPT, SamplingParams(logit_bias={VOCAB + 3: 1.0}), "logit_bias"),
    "out-of-vocab stop_token_ids": (GOOD_PROMPT, SamplingParams(stop_token_ids=[5, VOCAB]), "stop_token_ids"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_generate_refuses_bad_request_then_keeps_serving(llm: LLM, expected: list[int], name: str) -> None:
    prompt, params, field = BAD_REQUESTS[name]
    with pytest.raises(ValueError, match=field) as info:
        llm.generate(prompt, params or greedy(), use_tqdm=False)
    assert isinstance(info.value, InvalidRequestError)
    # A bad prompt among good ones fails the whole call, leaving nothing queued.
    with pytest.raises(InvalidRequestError, match=field):
        llm.generate(
            [GOOD_PROMPT, prompt, GOOD_PROMPT], [greedy(), params or greedy(), greedy()], use_tqdm=False
        )
    assert_still_serves(llm, expected)


def test_one_sampling_params_per_prompt(llm: LLM, expected: list[int]) -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [greedy()] * 3, use_tqdm=False)
    assert_still_serves(llm, expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


def test_engine_api_good_request_survives_a_bad_one(llm: LLM, expected: list[int]) -> None:
    engine = llm.engine
    engine.add_request("good", GOOD_PROMPT, greedy())
    engine.step()  # the good request is running
    for i, (prompt, params, field) in enumerate(BAD_REQUESTS.values()):
        with pytest.raises(InvalidRequestError, match=field):
            engine.add_request(f"bad-{i}", prompt, params or greedy())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", GOOD_PROMPT, greedy())
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        engine.add_request("bad-params", GOOD_PROMPT, {"max_tokens": 3})  # type: ignore[arg-type]
    assert engine.scheduler.num_waiting + engine.scheduler.num_running == 1
    done: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"]
    assert done[0].outputs[0].token_ids == expected and done[0].outputs[0].finish_reason == "length"
    assert_still_serves(llm, expected)


def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model path") as info:
        LLM(model=str(tmp_path / "no-such-model"), device="cpu")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("dtype", ["float8", "fp64", "int8"])
def test_unknown_dtype(model_dir: str, dtype: str) -> None:
    with pytest.raises(ConfigError, match="dtype") as info:
        LLM(model=model_dir, device="cpu", dtype=dtype)
    assert isinstance(info.value, ValueError) and dtype in str(info.value)


def test_unknown_engine_argument(model_dir: str) -> None:
    with pytest.raises(TypeError, match="block_sizes"):
        LLM(model=model_dir, device="cpu", block_sizes=4)
