"""Batch invariance under pressure: 32 mixed-length requests with a 16-token step budget (chunked
prefill) and a KV pool small enough to force preemption give every request the same tokens as
when it runs alone, greedy and seeded, with prefix caching off and on; and every block is free
again afterwards."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM

NUM_REQUESTS = 32
MAX_TOKENS = 10
BLOCK_SIZE = 4
POOL_BLOCKS = 24  # 23 usable: the longest request needs 12, all 32 at once ~250


def workload() -> list[list[int]]:
    rng = random.Random(1234)
    lengths = [1, 2, 17, 40] + [rng.randint(1, 40) for _ in range(NUM_REQUESTS - 4)]
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, seed=500 + i, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def alone(model_dir: str) -> dict[str, list[list[int]]]:
    """Each request run by itself on a roomy engine (no chunking, no preemption)."""
    llm = LLM(
        model=model_dir, device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_gpu_blocks_override=64
    )
    out: dict[str, list[list[int]]] = {"greedy": [], "seeded": []}
    for i, prompt in enumerate(workload()):
        for kind, params in (("greedy", greedy()), ("seeded", seeded(i))):
            (res,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
            out[kind].append(res.outputs[0].token_ids)
    assert llm.engine.scheduler.num_preemptions == 0
    return out


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_outputs_match_alone_under_pressure(
    model_dir: str, alone: dict[str, list[list[int]]], caching: bool
) -> None:
    llm = LLM(
        model=model_dir,
        device="cpu",
        dtype="float32",
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=POOL_BLOCKS,
        max_num_batched_tokens=16,
        enable_prefix_caching=caching,
    )
    pool = llm.engine.scheduler.kv.pool
    start = pool.num_free_blocks
    prompts = [{"prompt_token_ids": p} for p in workload()]

    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
    assert max(len(p["prompt_token_ids"]) for p in prompts) > 16  # chunked prefill happened
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == alone["greedy"][i], f"greedy request {i}"
    assert pool.num_free_blocks == start
    assert not llm.engine.has_unfinished_requests()

    # Seeded requests mixed with greedy and unseeded ones, in another order.
    preempted_before = llm.engine.scheduler.num_preemptions
    order = list(range(NUM_REQUESTS))
    random.Random(7).shuffle(order)
    batch = [(prompts[i], seeded(i)) for i in order]
    batch += [(prompts[i], greedy()) for i in range(0, NUM_REQUESTS, 4)]
    batch += [(prompts[i], SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)) for i in range(1, 9)]
    outs = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > preempted_before
    for j, i in enumerate(order):
        assert outs[j].outputs[0].token_ids == alone["seeded"][i], f"seeded request {i}"
    for j, i in enumerate(range(0, NUM_REQUESTS, 4)):
        assert outs[NUM_REQUESTS + j].outputs[0].token_ids == alone["greedy"][i]
    assert pool.num_free_blocks == start
    assert pool.num_free_blocks == pool.num_usable_blocks
