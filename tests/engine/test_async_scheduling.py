"""Async scheduling (the engine schedules and prepares step N+1 while the device runs step N) gives
the same tokens, finish reasons and texts as sync scheduling: under chunked prefill and
preemption, with stop strings, stop tokens and EOS (a request may then be scheduled once more and
that token is dropped), penalties and min_tokens (which wait for the pending ids), seeded
sampling, logprobs, n > 1, abort, and a request id reused while a step of its namesake is in
flight. On the CPU nothing overlaps, but every path of the pipeline runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.outputs import RequestOutput
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM

CAPITAL = 319  # " capital" in the tiny BPE tokenizer
EOS = 1


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_llm(model_dir: str, async_scheduling: bool, **kwargs: Any) -> LLM:
    kwargs = {"block_size": 4, "num_gpu_blocks_override": 64, **kwargs}
    return LLM(model=model_dir, device="cpu", dtype="float32", async_scheduling=async_scheduling, **kwargs)


def workload() -> tuple[list[str], list[SamplingParams]]:
    prompts = [
        "Hello, world!",
        "The capital of France is Paris. The capital of Italy is",
        "one, two, three, four",
        "def add(a, b):",
        "Once upon a time there was a small model that learned to count",
        "apples, oranges, pears",
    ] * 3
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),  # may stop on EOS
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[" capital", "e"]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=2, stop_token_ids=[300, 301, 302]),
        SamplingParams(temperature=0.7, seed=5, max_tokens=9, frequency_penalty=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4, presence_penalty=0.4),
        SamplingParams(temperature=0.9, seed=7, max_tokens=11, top_k=20, top_p=0.9, prompt_logprobs=1),
        SamplingParams(temperature=1.0, seed=11, max_tokens=7, n=2),
        SamplingParams(temperature=0.0, max_tokens=6, logit_bias={CAPITAL: 100.0}, stop_token_ids=[CAPITAL]),
        SamplingParams(temperature=0.0, max_tokens=10, logit_bias={EOS: 100.0}, min_tokens=3),
    ]
    return prompts, [params[i % len(params)] for i in range(len(prompts))]


def summary(outs: list[RequestOutput]) -> list[Any]:
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] + [o.finished]
        for o in outs
    ]


def assert_logprobs_close(a: Any, b: Any) -> None:
    """Logprobs agree to float noise (a different batch composition may round differently)."""
    if a is None or b is None:
        assert a is None and b is None
        return
    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        if pa is None or pb is None:
            assert pa is None and pb is None
            continue
        assert list(pa) == list(pb)
        for tid in pa:
            assert pa[tid].rank == pb[tid].rank
            assert math.isclose(pa[tid].logprob, pb[tid].logprob, rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_async_matches_sync_under_pressure(model_dir: str, caching: bool) -> None:
    prompts, params = workload()
    results = {}
    for mode in (False, True):
        # A small pool and step budget: chunked prefill and preemption.
        llm = make_llm(
            model_dir,
            mode,
            num_gpu_blocks_override=28,
            max_num_batched_tokens=16,
            max_num_seqs=8,
            enable_prefix_caching=caching,
        )
        assert llm.engine.async_scheduling is mode
        pool = llm.engine.scheduler.kv.pool
        start = pool.num_free_blocks
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
        assert not llm.engine.has_unfinished_requests()
        assert pool.num_free_blocks == start
        results[mode] = outs
    assert summary(results[True]) == summary(results[False])
    reasons = {c.finish_reason for o in results[False] for c in o.outputs}
    assert reasons == {"stop", "length"}
    for a, b in zip(results[False], results[True], strict=True):
        assert_logprobs_close(a.prompt_logprobs, b.prompt_logprobs)
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert_logprobs_close(ca.logprobs, cb.logprobs)
            assert (ca.cumulative_logprob is None) == (cb.cumulative_logprob is None)


def test_async_streams_every_token_once(model_dir: str) -> None:
    """Step by step, each request's outputs only grow, and end as the sync run's."""
    prompts, params = workload()
    expected = summary(make_llm(model_dir, False).generate(prompts, params, use_tqdm=False))
    engine = make_llm(model_dir, True).engine
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), prompt, p)
    last: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            before = last.get(out.request_id)
            assert before is None or not before.finished
            for j, c in enumerate(out.outputs):
                if before is not None:
                    assert c.token_ids[: len(before.outputs[j].token_ids)] == before.outputs[j].token_ids
            last[out.request_id] = out
    assert summary([last[str(i)] for i in range(len(prompts))]) == expected


def test_async_abort_and_id_reuse(model_dir: str) -> None:
    llm = make_llm(model_dir, True, max_num_seqs=3)
    engine = llm.engine
    pool = engine.scheduler.kv.pool
    start = pool.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (expected,) = make_llm(model_dir, False).generate("Hello, world!", params, use_tqdm=False)
    for rid in ("a", "b", "c", "d"):  # d waits: max_num_seqs=3
        engine.add_request(rid, "Hello, world!", params)
    engine.add_request("e", "The quick brown fox", SamplingParams(n=2, temperature=1.0, max_tokens=12))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None  # a step is running while we abort
    aborted = engine.abort_request(["b", "d", "e"])
    assert {o.request_id for o in aborted} == {"b", "d", "e"}
    assert not any(engine.scheduler.kv.block_ids(r) for r in ("b", "d", "e#0", "e#1"))
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(finished) == {"a", "c"}
    for out in finished.values():
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert pool.num_free_blocks == start

    # "x" stops on its first token (a stop token), which is only known after its next step was
    # launched (with "y", still running); a new "x" added right then must not receive that
    # step's token.
    stop_first = SamplingParams(
        temperature=0.0, max_tokens=6, logit_bias={CAPITAL: 100.0}, stop_token_ids=[CAPITAL]
    )
    engine.add_request("x", "Hello, world!", stop_first)
    engine.add_request("y", "Hello, world!", params)
    done: dict[str, RequestOutput] = {}
    while "x" not in done:
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done["x"].outputs[0].token_ids == [CAPITAL] and done["x"].outputs[0].finish_reason == "stop"
    in_flight = engine._in_flight
    assert in_flight is not None and "x" in in_flight[0].num_scheduled_tokens  # x's extra step
    engine.add_request("x", "Hello, world!", params)
    done.clear()
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(done) == {"x", "y"}
    assert done["x"].outputs[0].token_ids == expected.outputs[0].token_ids
    assert done["y"].outputs[0].token_ids == expected.outputs[0].token_ids
    assert pool.num_free_blocks == start
