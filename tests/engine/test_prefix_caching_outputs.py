"""Prefix caching end to end on a tiny model: outputs are the same with caching on and off
(greedy and seeded sampling) over shared system prompts and growing multi-turn chats, also with a
KV pool small enough that cached blocks are evicted (and requests preempted) and recomputed."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM

BLOCK_SIZE = 4
TURNS = 3
OUTPUT_LEN = 6


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_llm(model_dir: str, caching: bool, num_blocks: int = 512, **kwargs: Any) -> LLM:
    return LLM(
        model=model_dir,
        device="cpu",
        dtype="float32",
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=kwargs.pop("max_num_batched_tokens", 64),
        enable_prefix_caching=caching,
        **kwargs,
    )


def chat_workload(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """3 system prompts of 20-45 tokens, 8 conversations on them; per turn each conversation
    gets 2-9 new user tokens (the model's reply is appended between turns)."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 500) for _ in range(rng.randint(20, 45))] for _ in range(3)]
    convs = [list(systems[i % 3]) for i in range(8)]
    turns = [[rng.randrange(3, 500) for _ in range(rng.randint(2, 9))] for _ in range(8 * TURNS)]
    return convs, turns


def params_for(kind: str, i: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    return SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, max_tokens=OUTPUT_LEN, ignore_eos=True)


def run_chats(llm: LLM, kind: str) -> list[list[int]]:
    """Every conversation's token ids after all turns (prompts plus replies)."""
    convs, turns = chat_workload()
    for t in range(TURNS):
        for i, conv in enumerate(convs):
            conv += turns[t * len(convs) + i]
        outs = llm.generate(
            [{"prompt_token_ids": list(c)} for c in convs],
            [params_for(kind, t * 100 + i) for i in range(len(convs))],
            use_tqdm=False,
        )
        for conv, out in zip(convs, outs, strict=True):
            assert len(out.outputs[0].token_ids) == OUTPUT_LEN
            conv += out.outputs[0].token_ids
    return convs


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_outputs_equal_with_caching_on_and_off(model_dir: str, kind: str) -> None:
    off = make_llm(model_dir, caching=False)
    ref = run_chats(off, kind)
    assert off.engine.get_stats()["prefix_cache_queries"] == 0

    on = make_llm(model_dir, caching=True)
    assert run_chats(on, kind) == ref
    big = on.engine.get_stats()
    assert big["prefix_cache_hit_rate"] > 0.5
    assert big["prefix_cache_tokens_saved"] >= big["prefix_cache_hits"] > 0
    assert big["prefix_cache_requests"] == 8 * TURNS
    assert big["prefix_cache_evictions"] == 0

    # ~2 conversations' worth of blocks: cached prefixes are evicted and recomputed, and
    # requests are preempted; outputs must not change.
    small = make_llm(model_dir, caching=True, num_blocks=40, max_num_seqs=4)
    assert run_chats(small, kind) == ref
    stats = small.engine.get_stats()
    assert stats["prefix_cache_evictions"] > 0
    assert stats["prefix_cache_hit_rate"] < big["prefix_cache_hit_rate"]
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_requests"] == 8 * TURNS  # resumes are not counted as queries
    # ...but the blocks a resumed request takes back from the cache are tokens saved.
    assert stats["prefix_cache_tokens_saved"] > stats["prefix_cache_hits"]


def test_n_samples_share_prompt_blocks_and_match_caching_off(model_dir: str) -> None:
    prompt = list(range(20, 20 + 6 * BLOCK_SIZE + 3))  # 6 full blocks and a partial one
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=OUTPUT_LEN, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = make_llm(model_dir, caching=caching, max_num_batched_tokens=256)
        engine = llm.engine
        free = engine.scheduler.kv.num_free_blocks
        engine.add_request("r", {"prompt_token_ids": prompt}, params)
        engine.step()  # all 4 admitted in one step
        tables = [engine.scheduler.kv.req_blocks[f"r#{i}"] for i in range(4)]
        if caching:
            assert all(t[:6] == tables[0][:6] for t in tables)
            assert [b.ref_cnt for b in tables[0][:6]] == [4] * 6
            assert free - engine.scheduler.kv.num_free_blocks == 6 + 4
        else:
            assert free - engine.scheduler.kv.num_free_blocks == 4 * 7
        outs = []
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.finished]
        (out,) = outs
        results[caching] = [c.token_ids for c in out.outputs]
    assert results[True] == results[False]
    assert len({tuple(r) for r in results[True]}) > 1  # the 4 samples differ


def test_prompt_logprobs_with_caching_and_preemption(model_dir: str) -> None:
    """A prompt-logprobs request scores its whole prompt even when its prefix is cached, and a
    preempted one does not repeat positions."""
    convs, _ = chat_workload()
    prompts = [{"prompt_token_ids": [*c, 7, 8, 9]} for c in convs]
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True, prompt_logprobs=2)

    def run(llm: LLM) -> tuple[list[Any], list[float]]:
        llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # warm the cache
        outs = llm.generate(prompts, params, use_tqdm=False)
        exact: list[Any] = []
        values: list[float] = []
        for p, o in zip(prompts, outs, strict=True):
            assert len(o.prompt_logprobs) == len(p["prompt_token_ids"])
            assert o.prompt_logprobs[0] is None
            for tok, lp in zip(p["prompt_token_ids"][1:], o.prompt_logprobs[1:], strict=True):
                assert tok in lp
                exact.append(sorted((t, x.rank) for t, x in lp.items()))
                values += [x.logprob for _, x in sorted(lp.items())]
            exact.append(o.outputs[0].token_ids)
        return exact, values

    ref_exact, ref_values = run(make_llm(model_dir, caching=False))
    for llm in (
        make_llm(model_dir, caching=True),
        make_llm(model_dir, caching=True, num_blocks=30, max_num_seqs=4),
    ):
        exact, values = run(llm)
        assert exact == ref_exact
        assert values == pytest.approx(ref_values, abs=1e-4)
    assert llm.engine.get_stats()["num_preemptions"] > 0


def test_reset_prefix_cache(model_dir: str) -> None:
    llm = make_llm(model_dir, caching=True)
    prompt = {"prompt_token_ids": list(range(30, 70))}
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == first
    assert llm.engine.get_stats()["prefix_cache_hits"] == 36
    assert llm.reset_prefix_cache() is True
    stats = llm.engine.get_stats()
    assert stats["prefix_cache_queries"] == stats["prefix_cache_hits"] == 0
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == first
    assert llm.engine.get_stats()["prefix_cache_hits"] == 0  # nothing was left to hit
