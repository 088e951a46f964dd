"""`LLMEngine.step_deltas()` (what the serving engine process sends) against the engine's whole
outputs (`step()`): concatenated, each request's deltas are its output tokens, logprobs and
finish reason, with the prompt's logprobs sent once; a prompt chunk with nothing new sends no
delta; sync and async scheduling, under chunked prefill and a pool small enough to preempt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.engine import LLMEngine
from hallm.core.engine_args import EngineArgs
from hallm.core.engine_process import EngineLoop, TokenIdsOnly
from hallm.core.engine_protocol import AddRequest, RequestDelta, StepOutputs, output_decoder
from hallm.core.sampling_params import SamplingParams

EOS = 1


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_engine(model_dir: str, async_scheduling: bool) -> LLMEngine:
    args = EngineArgs(
        model=model_dir,
        device="cpu",
        dtype="float32",
        seed=0,
        block_size=4,
        num_gpu_blocks_override=40,
        max_num_batched_tokens=24,
        max_model_len=64,
        async_scheduling=async_scheduling,
    )
    return LLMEngine(args.create_engine_config(), TokenIdsOnly([EOS]))


def prompt(i: int) -> list[int]:
    return [(7 * i + 13 * j) % 400 + 3 for j in range(5 + 3 * i)]


@pytest.fixture(scope="module")
def stop_token(model_dir: str) -> int:
    """The 4th greedy token of prompt(0): a stop token that ends that request within 4 tokens."""
    engine = make_engine(model_dir, async_scheduling=False)
    engine.add_request(
        "probe", prompt(0), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    )
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step(final_only=True)
    return outs[0].outputs[0].token_ids[3]


def workload(stop: int) -> list[tuple[str, list[int], SamplingParams]]:
    params = [
        # stops early on a token (with logprobs and prompt logprobs), before later requests end
        SamplingParams(
            temperature=0.0,
            max_tokens=12,
            stop_token_ids=[stop],
            logprobs=1,
            prompt_logprobs=1,
            detokenize=False,
        ),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2, detokenize=False),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, prompt_logprobs=1, detokenize=False),
        SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[300, 301], detokenize=False),
    ]
    return [(f"r{i}", prompt(i), params[i % len(params)]) for i in range(8)]


def logprob_rows(positions: Any) -> list[Any]:
    return [None if p is None else [(t, lp.logprob, lp.rank) for t, lp in p.items()] for p in positions]


def delta_rows(entries: Any) -> list[Any]:
    return [None if e is None else list(zip(e.token_ids, e.logprobs, e.ranks, strict=True)) for e in entries]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_deltas_add_up_to_the_whole_outputs(model_dir: str, stop_token: int, async_scheduling: bool) -> None:
    oracle = make_engine(model_dir, async_scheduling)
    for rid, ids, params in workload(stop_token):
        oracle.add_request(rid, ids, params)
    final = {}
    while oracle.has_unfinished_requests():
        final.update({o.request_id: o for o in oracle.step(final_only=True)})

    engine = make_engine(model_dir, async_scheduling)
    for rid, ids, params in workload(stop_token):
        engine.add_request(rid, ids, params)
    deltas: dict[str, list[RequestDelta]] = {rid: [] for rid, _, _ in workload(stop_token)}
    while engine.has_unfinished_requests():
        for d in engine.step_deltas():
            deltas[d.request_id].append(d)
    assert engine.scheduler.num_preemptions > 0  # the pool is small enough to preempt
    assert not engine.output_processor.parents  # finished requests are released

    assert final["r0"].outputs[0].finish_reason == "stop" and len(final["r0"].outputs[0].token_ids) <= 4
    for rid, ids, params in workload(stop_token):
        want = final[rid].outputs[0]
        got = deltas[rid]
        assert [t for d in got for t in d.token_ids] == want.token_ids, rid
        assert [d.finish_reason for d in got] == [None] * (len(got) - 1) + [want.finish_reason], rid
        assert got[-1].stop_reason == want.stop_reason
        for d in got[:-1]:  # nothing new, no delta
            assert d.token_ids or d.prompt_logprobs is not None, rid
        if params.logprobs is not None:
            assert delta_rows([e for d in got for e in d.logprobs or []]) == logprob_rows(want.logprobs)
        else:
            assert all(d.logprobs is None for d in got)
        sent = [d.prompt_logprobs for d in got if d.prompt_logprobs is not None]
        if params.prompt_logprobs is not None:
            assert len(sent) == 1 and len(sent[0]) == len(ids)
            assert delta_rows(sent[0]) == logprob_rows(final[rid].prompt_logprobs)
        else:
            assert sent == []


def test_step_deltas_refuses_a_request_with_several_sequences(model_dir: str) -> None:
    engine = make_engine(model_dir, async_scheduling=False)
    engine.add_request("pair", [5, 6, 7], SamplingParams(n=2, max_tokens=2, detokenize=False))
    with pytest.raises(ValueError, match="n=1"):
        while engine.has_unfinished_requests():
            engine.step_deltas()


class Outbox:
    """The engine loop's PUSH socket, keeping what is sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, data: Any, flags: int = 0, copy: bool = True) -> None:
        self.sent.append(output_decoder().decode(data))


def test_the_engine_loop_refuses_n_above_one_and_serves_the_rest(model_dir: str) -> None:
    outbox = Outbox()
    loop = EngineLoop(
        make_engine(model_dir, async_scheduling=False), inbox=None, outboxes=[outbox], parent_pid=0
    )
    loop._add(AddRequest("pair", [5, 6, 7], SamplingParams(n=2, max_tokens=2, detokenize=False)))
    loop._add(AddRequest("one", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)))
    (refusal,) = outbox.sent
    assert isinstance(refusal, StepOutputs)
    (delta,) = refusal.outputs
    assert delta.request_id == "pair" and delta.finish_reason == "abort"
    assert delta.error is not None and "n=1" in delta.error and "n=2" in delta.error
    tokens: list[int] = []
    while loop.engine.has_unfinished_requests():
        message = loop.step_message()
        tokens += [t for d in message.outputs for t in d.token_ids]
    assert len(tokens) == 2 and not loop.live
