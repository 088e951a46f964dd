"""Seeded sampling is reproducible: across LLM instances and calls, and whatever else is in the
batch (seeded or unseeded requests, its position in the batch), n > 1 included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time there was a small model that learned to count:",
    "def add(a, b):",
]


def make_llm(path: Path) -> LLM:
    return LLM(model=str(path), device="cpu", dtype="float32", block_size=4, num_gpu_blocks_override=128)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return make_llm(model_dir)


def seeded(seed: int, **kwargs: object) -> SamplingParams:
    defaults: dict[str, object] = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12, "ignore_eos": True}
    return SamplingParams(seed=seed, **{**defaults, **kwargs})  # type: ignore[arg-type]


def tokens(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[list[int]]]:
    """Per request, the token ids of each of its samples."""
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_same_seed_same_tokens_across_instances_and_calls(llm: LLM, model_dir: Path) -> None:
    params = [seeded(10 + i, top_k=20 if i % 2 else 0) for i in range(len(PROMPTS))]
    first = tokens(llm, PROMPTS, params)
    assert tokens(llm, PROMPTS, params) == first  # a second call on the same engine
    assert tokens(make_llm(model_dir), PROMPTS, params) == first  # a fresh engine
    # The seed matters: other seeds (and no seed) give other tokens.
    assert tokens(llm, PROMPTS, [seeded(1000 + i) for i in range(len(PROMPTS))]) != first
    unseeded = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    assert tokens(llm, PROMPTS, unseeded) != first


def test_seeded_request_ignores_batch_composition(llm: LLM) -> None:
    target_prompt, target = PROMPTS[2], seeded(42, min_p=0.05)
    (alone,) = tokens(llm, [target_prompt], [target])
    others = [
        ("Hello", SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)),
        ("def add(a, b):", seeded(7)),
        ("The capital of France is", SamplingParams(temperature=0.0, max_tokens=5)),
        ("one, two, three", SamplingParams(temperature=0.7, top_k=5, max_tokens=20, ignore_eos=True)),
        (target_prompt, seeded(43, min_p=0.05)),  # same prompt, other seed
    ]
    for position in (0, 2, len(others)):
        batch = [*others[:position], (target_prompt, target), *others[position:]]
        outs = tokens(llm, [p for p, _ in batch], [s for _, s in batch])
        assert outs[position] == alone, f"at position {position}"
    # Same prompt with another seed in the same batch: different tokens.
    assert outs[len(others) - 1] != alone


def test_seeded_n_samples_are_reproducible(llm: LLM, model_dir: Path) -> None:
    params = seeded(5, n=3)
    (alone,) = tokens(llm, [PROMPTS[1]], [params])
    assert len(alone) == 3 and len({tuple(t) for t in alone}) == 3  # distinct samples
    batch = tokens(
        llm,
        [PROMPTS[0], PROMPTS[1], PROMPTS[3]],
        [SamplingParams(temperature=1.0, n=2, max_tokens=12), params, seeded(6, n=2)],
    )
    assert batch[1] == alone
    assert tokens(make_llm(model_dir), [PROMPTS[1]], [params]) == [alone]
