"""Sampler: greedy, temperature/top-k/top-p/min-p against a plain reference, penalties,
min_tokens, logit_bias, seeded reproducibility across batch compositions, and logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hallm.core.penalties import apply_penalties
from hallm.core.sampler import (
    RequestSamplingState,
    Sampler,
    SamplingMetadata,
    apply_top_k_top_p,
    apply_top_p_within_top_k,
    compute_prompt_logprobs,
)
from hallm.core.sampling_params import SamplingParams

EOS = 5
# The sampler is device-neutral: the tests that matter most also run on an accelerator when present.
DEVICES = pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))


def build(
    params: list[SamplingParams], vocab: int, outputs=None, prompts=None, device: str = "cpu"
) -> tuple[list, SamplingMetadata]:
    states = [
        RequestSamplingState(
            params=p,
            prompt_token_ids=(prompts[i] if prompts else [1, 2]),
            output_token_ids=list(outputs[i]) if outputs else [],
            eos_token_ids=frozenset({EOS}),
            device=device,
        )
        for i, p in enumerate(params)
    ]
    return states, SamplingMetadata.build(states, vocab, device)


# --------------------------------------------------------------------------- reference


def reference_probs(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """Straightforward per-token implementation of the same pipeline, for a small vocab."""
    scaled = [x / temperature for x in logits]
    keep = [True] * len(logits)

    def probs_of(mask):
        m = max(s for s, k in zip(scaled, mask, strict=True) if k)
        e = [math.exp(s - m) if k else 0.0 for s, k in zip(scaled, mask, strict=True)]
        z = sum(e)
        return [x / z for x in e]

    if min_p > 0:
        p = probs_of(keep)
        keep = [k and pi >= min_p * max(p) for k, pi in zip(keep, p, strict=True)]
    if top_k > 0:
        order = sorted((i for i in range(len(logits)) if keep[i]), key=lambda i: -scaled[i])
        allowed = set(order[:top_k])
        keep = [k and i in allowed for i, k in enumerate(keep)]
    if top_p < 1.0:
        p = probs_of(keep)
        order = sorted((i for i in range(len(logits)) if keep[i]), key=lambda i: -p[i])
        mass, allowed = 0.0, set()
        for i in order:
            if mass >= top_p:
                break
            allowed.add(i)
            mass += p[i]
        keep = [k and i in allowed for i, k in enumerate(keep)]
    return probs_of(keep)


LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0},
        {"temperature": 0.5},
        {"temperature": 2.0},
        {"temperature": 1.0, "top_k": 3},
        {"temperature": 0.7, "top_p": 0.8},
        {"temperature": 1.3, "top_k": 5, "top_p": 0.7},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 1.5, "min_p": 0.1, "top_k": 6, "top_p": 0.9},
    ],
)
@DEVICES
def test_empirical_distribution_matches_reference(kwargs: dict, device: str) -> None:
    torch.manual_seed(0)
    n = 20000
    _, meta = build([SamplingParams(**kwargs)] * n, len(LOGITS), device=device)
    logits = torch.tensor([LOGITS], device=device).expand(n, -1).contiguous()
    tokens = Sampler()(logits, meta).sampled_token_ids.cpu()
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    expected = torch.tensor(reference_probs(LOGITS, **kwargs), dtype=torch.float64)
    assert torch.all(freq[expected == 0] == 0), f"masked tokens drawn: {freq} vs {expected}"
    assert torch.allclose(freq, expected, atol=0.015), f"{freq} vs {expected}"


@pytest.mark.parametrize("method", ["_inverse_cdf_sample", "_exponential_race"])
def test_each_draw_method_samples_exactly(method: str) -> None:
    """Both ways `random_sample` draws (the CPU's inverse CDF, accelerators' exponential race),
    here on the CPU: frequencies match p, zero-mass tokens (the last one too) are never drawn,
    and a seeded row's token does not depend on the rows beside it."""
    from hallm.core import sampler
    from hallm.core.sampling_metadata import make_generator

    draw = getattr(sampler, method)
    p = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    torch.manual_seed(0)
    n = 40000
    tokens = draw(p.repeat(n, 1), {})
    freq = torch.bincount(tokens, minlength=len(p)).float() / n
    assert freq[1] == 0 and freq[4] == 0, freq
    assert torch.allclose(freq, p, atol=0.01), freq
    alone = [int(draw(p.repeat(1, 1), {0: make_generator(s, "cpu")})[0]) for s in range(40)]
    crowded = [int(draw(p.repeat(9, 1), {5: make_generator(s, "cpu")})[5]) for s in range(40)]
    assert alone == crowded and len(set(alone)) == 3


def test_inverse_cdf_across_chunks_samples_exactly() -> None:
    """The two-level inverse CDF over a vocabulary of several chunks and a short last one:
    mass on both sides of chunk boundaries, a chunk of zero mass, zero-mass tokens at a chunk's
    ends never drawn, frequencies match p."""
    from hallm.core import sampler

    c = sampler._CDF_CHUNK
    vocab = 3 * c + 7
    p = torch.zeros(vocab)
    heavy = [0, c - 2, c + 1, 3 * c + 5]  # chunk 2 ([2c, 3c)) holds nothing
    p[heavy] = torch.tensor([0.2, 0.3, 0.1, 0.4])
    p[3 * c + 6] = 0.0  # the last token, zero mass
    torch.manual_seed(0)
    n = 40000
    tokens = sampler._inverse_cdf_sample(p.repeat(n, 1), {})
    freq = torch.bincount(tokens, minlength=vocab).float() / n
    assert set(tokens.unique().tolist()) == set(heavy)
    assert torch.allclose(freq[heavy], p[heavy], atol=0.01), freq[heavy]
    edge = torch.zeros(2, vocab)
    edge[:, c - 1] = 1.0  # all mass on a chunk's last token
    edge[1, 3 * c + 6] = 1e-30  # and a sliver on the vocabulary's last
    assert sampler._inverse_cdf_sample(edge, {}).tolist() == [c - 1, c - 1]


def test_greedy_is_argmax_and_input_untouched() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 50)
    before = logits.clone()
    _, meta = build([SamplingParams(temperature=0.0)] * 8, 50)
    assert meta.all_greedy and not meta.all_random
    out = Sampler()(logits, meta)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.long and out.logprobs is None
    assert torch.equal(logits, before)


@DEVICES
def test_mixed_batch_and_flags(device: str) -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 30, device=device)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=1),  # top_k=1 is argmax too
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}, min_tokens=3, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1),
    ]
    _, meta = build(params, 30, device=device)
    assert not (meta.all_greedy or meta.all_random or meta.no_top_k or meta.no_top_p or meta.no_min_p)
    assert not meta.no_penalties and meta.max_top_k == 1
    out = Sampler()(logits, meta).sampled_token_ids
    assert out[0] == logits[0].argmax() and out[1] == logits[1].argmax() and out[2] == 7
    assert torch.equal(logits, before)


def test_top_k_larger_than_vocab_is_off_and_top_k_only_path() -> None:
    _, meta = build([SamplingParams(top_k=100)], 8)
    assert meta.no_top_k
    torch.manual_seed(3)
    n = 4000
    _, meta = build([SamplingParams(top_k=2), SamplingParams()] * (n // 2), 8)
    assert meta.no_top_p and not meta.no_top_k
    logits = torch.tensor([LOGITS]).expand(n, -1).contiguous()
    tokens = Sampler()(logits, meta).sampled_token_ids
    assert set(tokens[0::2].tolist()) <= {0, 1}
    assert len(set(tokens[1::2].tolist())) > 2  # unrestricted rows are not truncated


def test_top_p_without_full_sort_matches_sort_path() -> None:
    torch.manual_seed(8)
    n, vocab = 64, 1000
    logits = torch.randn(n, vocab) * 3
    top_k = torch.randint(1, 300, (n,))
    top_k[::7] = vocab  # rows without top-k (and without top-p, as the fast path requires)
    top_p = torch.rand(n) * 0.9 + 0.05
    top_p[::7] = 1.0
    top_p[1::9] = 1.0  # top-k only
    reference = apply_top_k_top_p(logits.clone(), top_k, top_p)
    fast = apply_top_p_within_top_k(logits.clone(), top_k, int(top_k[top_k < vocab].max()), top_p)
    assert torch.equal(torch.isinf(reference), torch.isinf(fast))
    # The sampler takes the fast path only when every top-p row has top-k.
    _, meta = build([SamplingParams(top_k=5, top_p=0.5), SamplingParams()], vocab)
    assert meta.top_p_within_top_k
    _, meta = build([SamplingParams(top_k=5, top_p=0.5), SamplingParams(top_p=0.5)], vocab)
    assert not meta.top_p_within_top_k


def test_bf16_logits() -> None:
    logits = torch.randn(3, 40).to(torch.bfloat16)
    _, meta = build([SamplingParams(temperature=0.0, logprobs=2)] * 3, 40)
    out = Sampler()(logits, meta)
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.logprobs is not None and out.logprobs.logprobs.dtype == torch.float32


# --------------------------------------------------------------------------- penalties / masks


@DEVICES
def test_penalties_match_hand_computation(device: str) -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.4, 0.0]] * 2, device=device)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(temperature=0.0),
    ]
    prompts = [[0, 1, 1, 99], np.array([0, 1])]  # ids outside the vocab are ignored; numpy works too
    _, meta = build(params, 6, outputs=[[2, 2, 3], [2, 2, 3]], prompts=prompts, device=device)
    got = apply_penalties(logits, meta)
    # token: 0 prompt 1.0/2 | 1 prompt -1*2 | 2 out x2: 2/2 - 0.5*2 - 0.25 | 3 out x1: -2*2 - 0.5 - 0.25
    expected = torch.tensor([0.5, -2.0, -0.25, -4.75, 0.4, 0.0], device=device)
    assert torch.allclose(got[0], expected)
    assert torch.equal(got[1], logits[1])  # a row without penalties is untouched
    # Greedy sees the penalties: argmax moves from token 2 to token 0.
    assert Sampler()(logits.clone(), meta).sampled_token_ids.tolist() == [0, 2]


@DEVICES
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(ignore_eos: bool, device: str) -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 9.0, 10.0]], device=device)  # EOS=5, stop id 4 dominate
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=ignore_eos)
    _, meta = build([p], 6, outputs=[[1]], device=device)
    assert Sampler()(logits, meta).sampled_token_ids.item() == 1
    _, meta = build([p], 6, outputs=[[1, 1]], device=device)  # min_tokens reached: nothing masked
    assert meta.min_tokens_mask is None
    assert Sampler()(logits, meta).sampled_token_ids.item() == EOS
    # Random sampling under min_tokens never draws EOS or a stop id.
    torch.manual_seed(4)
    params = [SamplingParams(min_tokens=5, stop_token_ids=[4])] * 2000
    _, meta = build(params, 6, outputs=[[1]] * 2000, device=device)
    tokens = Sampler()(logits.expand(2000, -1).contiguous(), meta).sampled_token_ids.cpu()
    assert not torch.isin(tokens, torch.tensor([4, EOS])).any()


def test_logit_bias() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 1] = 5.0
    _, meta = build(
        [SamplingParams(temperature=0.0, logit_bias={3: 10.0}), SamplingParams(temperature=0.0)], 10
    )
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [3, 1]


# --------------------------------------------------------------------------- seeds


def _run_steps(
    batch_logits: list[torch.Tensor], states: list[RequestSamplingState], vocab: int
) -> list[list[int]]:
    sampler = Sampler()
    for step_logits in batch_logits:
        meta = SamplingMetadata.build(states, vocab, step_logits.device)
        tokens = sampler(step_logits, meta).sampled_token_ids.tolist()
        for s, t in zip(states, tokens, strict=True):
            s.output_token_ids.append(t)
    return [s.output_token_ids for s in states]


@DEVICES
def test_seeded_reproducible_across_batch_positions_and_preemption(device: str) -> None:
    vocab, steps = 64, 8
    gen = torch.Generator().manual_seed(123)
    target_logits = [(torch.randn(vocab, generator=gen) * 0.3).to(device) for _ in range(steps)]  # flat-ish
    other_logits = [torch.randn(4, vocab, generator=gen).to(device) for _ in range(steps)]
    target = SamplingParams(seed=42, top_p=0.95)

    def new_target(output=()):
        return RequestSamplingState(target, [1, 2, 3], list(output), device=device)

    def other(p: SamplingParams) -> RequestSamplingState:
        return RequestSamplingState(p, [5], device=device)

    # Alone.
    (alone,) = _run_steps([t.unsqueeze(0) for t in target_logits], [new_target()], vocab)
    assert len(set(alone)) > 2  # genuinely random, or the test proves nothing
    # Again: identical.
    assert _run_steps([t.unsqueeze(0) for t in target_logits], [new_target()], vocab)[0] == alone

    # Position 2 of 5, among unseeded, seeded and greedy requests.
    torch.manual_seed(999)
    others = [
        SamplingParams(),
        SamplingParams(seed=7),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3),
    ]
    states = [other(p) for p in others[:2]] + [new_target()] + [other(p) for p in others[2:]]
    logits = [
        torch.cat([o[:2], t.unsqueeze(0), o[2:]]) for o, t in zip(other_logits, target_logits, strict=True)
    ]
    assert _run_steps(logits, states, vocab)[2] == alone

    # Position 0 of 2 with a different unseeded neighbour consuming the default generator.
    torch.manual_seed(5)
    states = [new_target(), other(SamplingParams(temperature=1.5))]
    logits = [torch.stack([t, o[0]]) for o, t in zip(other_logits, target_logits, strict=True)]
    assert _run_steps(logits, states, vocab)[0] == alone

    # Rebuilt after preemption with 3 tokens already out: the generator is fast-forwarded.
    resumed = _run_steps([t.unsqueeze(0) for t in target_logits[3:]], [new_target(alone[:3])], vocab)[0]
    assert resumed == alone

    # A different seed gives a different sequence.
    other_seed = other(SamplingParams(seed=43, top_p=0.95))
    assert _run_steps([t.unsqueeze(0) for t in target_logits], [other_seed], vocab)[0] != alone


# --------------------------------------------------------------------------- logprobs


@DEVICES
def test_logprobs_are_raw_with_topk_and_rank(device: str) -> None:
    torch.manual_seed(6)
    vocab = 40
    logits = torch.randn(4, vocab, device=device)
    params = [
        SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5, top_k=5),
        SamplingParams(logprobs=0, temperature=0.0, presence_penalty=1.0),
        SamplingParams(temperature=2.0),
        SamplingParams(logprobs=1, min_p=0.05),
    ]
    _, meta = build(params, vocab, outputs=[[1, 2]] * 4, device=device)
    assert meta.max_num_logprobs == 3
    out = Sampler()(logits.clone(), meta)
    lp = out.logprobs
    assert lp is not None
    assert lp.token_ids.shape == (4, 4) and lp.logprobs.shape == (4, 4) and lp.sampled_rank.shape == (4,)
    raw = torch.log_softmax(logits, -1)  # before penalties and temperature (vLLM's raw_logprobs)
    sampled = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], sampled)
    assert torch.allclose(lp.logprobs[:, 0], raw.gather(1, sampled[:, None]).squeeze(1))
    top = raw.topk(3, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top.indices)
    assert torch.allclose(lp.logprobs[:, 1:], top.values)
    assert torch.all(lp.logprobs[:, 1:-1] >= lp.logprobs[:, 2:])  # descending
    ranks = [int((raw[i] > raw[i, sampled[i]]).sum()) + 1 for i in range(4)]
    assert lp.sampled_rank.tolist() == ranks
    ids, values, r = lp.tolists()
    assert ids[0][0] == sampled[0].item() and len(values[0]) == 4 and r == ranks


def test_no_logprobs_requested() -> None:
    _, meta = build([SamplingParams()], 10)
    assert meta.max_num_logprobs is None
    assert Sampler()(torch.randn(1, 10), meta).logprobs is None


def test_prompt_logprobs() -> None:
    torch.manual_seed(7)
    logits = torch.randn(5, 12)
    targets = torch.tensor([3, 0, 11, 3, 7])
    lp = compute_prompt_logprobs(logits, targets, 2)
    raw = torch.log_softmax(logits, -1)
    assert lp.token_ids.shape == (5, 3)
    assert torch.equal(lp.token_ids[:, 0], targets)
    assert torch.allclose(lp.logprobs[:, 0], raw[torch.arange(5), targets])
    assert torch.equal(lp.token_ids[:, 1:], raw.topk(2, -1).indices)
    assert lp.sampled_rank.tolist() == [int((raw[i] >= raw[i, targets[i]]).sum()) for i in range(5)]
    only = compute_prompt_logprobs(logits.half(), targets, 0)
    assert only.token_ids.shape == (5, 1) and only.logprobs.dtype == torch.float32
    with pytest.raises(ValueError, match="target_token_ids must be"):
        compute_prompt_logprobs(logits, targets[:3], 1)


def test_shape_errors() -> None:
    _, meta = build([SamplingParams()], 10)
    with pytest.raises(ValueError, match="num_reqs=1"):
        Sampler()(torch.randn(2, 10), meta)
    with pytest.raises(ValueError, match="vocab_size 10"):
        Sampler()(torch.randn(1, 11), meta)
