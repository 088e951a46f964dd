"""The Sampler with a platform's `temperature_sample` op (OpTable): which steps go to it, what it
is given, and that its tokens keep the sampler's semantics. The op here is the reference
(hallm.ops.reference_ops.temperature_sample), wrapped to record its calls."""

from __future__ import annotations

import pytest
import torch

from hallm.core.sampler import RequestSamplingState, Sampler, SamplingMetadata
from hallm.core.sampling_params import SamplingParams
from hallm.ops import reference_ops

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


class RecordingOp:
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def __call__(self, logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
        self.calls.append((logits, temperature.clone(), seed))
        return reference_ops.temperature_sample(logits, temperature, seed)


def build(params: list[SamplingParams], vocab: int) -> SamplingMetadata:
    states = [
        RequestSamplingState(params=p, prompt_token_ids=[1, 2], output_token_ids=[3], device="cpu")
        for p in params
    ]
    return SamplingMetadata.build(states, vocab, "cpu")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_the_op_draws_from_the_tempered_softmax(temperature: float) -> None:
    n = 20000
    op = RecordingOp()
    meta = build([SamplingParams(temperature=temperature)] * n, len(LOGITS))
    tokens = Sampler(temperature_sample=op)(LOGITS.repeat(n, 1), meta).sampled_token_ids
    assert len(op.calls) == 1
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    want = torch.softmax(LOGITS.double() / temperature, dim=0)
    assert torch.allclose(freq, want, atol=0.015), f"{freq} vs {want}"


def test_unprocessed_logits_reach_the_op_in_their_own_dtype_untouched() -> None:
    op = RecordingOp()
    logits = torch.randn(3, 50).to(torch.bfloat16)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2),
    ]
    out = Sampler(temperature_sample=op)(logits, build(params, 50)).sampled_token_ids
    ((given, temperature, seed),) = op.calls
    assert given is logits  # no float32 copy: the op reads the model's logits once
    assert temperature.tolist() == pytest.approx([0.8, 0.0, 1.2])  # 0 marks the greedy row
    assert 0 <= seed < 2**31
    assert out[1] == logits[1].float().argmax()  # the greedy row is exact
    assert torch.equal(logits, before)


def test_processed_logits_reach_the_op_in_float32() -> None:
    """A repetition penalty changes the logits first: the op gets the processed float32 copy,
    and a greedy row beside it takes the penalized argmax."""
    op = RecordingOp()
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0  # token 3 is the output so far (build: output [3]); the penalty halves it
    logits[:, 7] = 4.0
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0), SamplingParams(temperature=1.0)]
    out = Sampler(temperature_sample=op)(logits, build(params, 10)).sampled_token_ids
    ((given, temperature, _),) = op.calls
    assert given.dtype == torch.float32 and given[0, 3] == 2.5
    assert temperature.tolist() == [0.0, 1.0]
    assert out[0] == 7
    assert logits[0, 3] == 5.0  # the caller's logits are not modified


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),  # all greedy: argmax, nothing to draw
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=1.0, seed=7),  # its own generator: batch-independent tokens
    ],
    ids=["greedy", "top_k", "top_p", "min_p", "seeded"],
)
def test_steps_the_op_does_not_take_run_the_torch_path(params: SamplingParams) -> None:
    op = RecordingOp()
    beside = SamplingParams(temperature=0.7)
    Sampler(temperature_sample=op)(
        LOGITS.repeat(2, 1), build([params, beside if params.temperature else params], 8)
    )
    assert op.calls == []


def test_logprobs_come_from_the_raw_logits_for_the_drawn_token() -> None:
    op = RecordingOp()
    meta = build([SamplingParams(temperature=1.0, logprobs=2)] * 4, len(LOGITS))
    out = Sampler(temperature_sample=op)(LOGITS.repeat(4, 1), meta)
    assert len(op.calls) == 1 and out.logprobs is not None
    raw = torch.log_softmax(LOGITS, dim=0)
    sampled = out.sampled_token_ids
    assert torch.allclose(out.logprobs.logprobs[:, 0], raw[sampled])


def test_each_step_gets_a_new_seed_from_the_stream_torch_is_seeded_with() -> None:
    def seeds() -> list[int]:
        torch.manual_seed(11)
        op = RecordingOp()
        sampler = Sampler(temperature_sample=op)
        meta = build([SamplingParams(temperature=1.0)], len(LOGITS))
        for _ in range(3):
            sampler(LOGITS.repeat(1, 1), meta)
        return [seed for _, _, seed in op.calls]

    first = seeds()
    assert len(set(first)) == 3
    assert seeds() == first
