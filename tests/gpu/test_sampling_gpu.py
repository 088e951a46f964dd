"""hallm.ops.triton.sampling (the op table's `temperature_sample`) compiled and run on a real GPU
(tests/gpu/run_all.sh sampler).

Skipped without a CUDA device (CI runs the same kernels in the interpreter, on small shapes).
Here at real sizes: greedy rows against torch's argmax over Llama-3's vocabulary, and the
frequencies of 262,144 draws against the tempered softmax, with the mass spread over the whole
vocabulary (so every part of a row and the reduce across parts decide draws).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

VOCAB = 128256


def _op():  # type: ignore[no-untyped-def]
    from hallm_cuda.platform import CudaPlatform

    return CudaPlatform().op_table().temperature_sample


@pytest.mark.parametrize("rows", [1, 7, 192, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_rows_match_torch_argmax(rows: int, dtype: torch.dtype) -> None:
    logits = torch.randn(rows, VOCAB, device="cuda").to(dtype)
    logits[0, [17, VOCAB - 3]] = 50.0  # a tie far apart: the first index wins
    got = _op()(logits, torch.zeros(rows, device="cuda"), 5)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.float().argmax(dim=-1))
    assert got[0] == 17


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_draws_follow_the_tempered_softmax_over_the_whole_vocabulary(dtype: torch.dtype) -> None:
    """32 live tokens spread over the vocabulary (the first and the last included), every other
    token masked: 16 launches of 16,384 rows, half at temperature 0.7 and half at 1.3. The
    frequencies are within 0.01 total variation of softmax(logits / T) (the sampling noise of
    131,072 draws over 32 tokens is ~0.004) and nothing masked is drawn."""
    op = _op()
    gen = torch.Generator().manual_seed(0)
    live = torch.cat([torch.tensor([0, VOCAB - 1]), torch.randperm(VOCAB - 2, generator=gen)[:30] + 1])
    row = torch.full((VOCAB,), float("-inf"))
    row[live] = torch.randn(32, generator=gen) * 1.5
    row = row.to(dtype)
    rows = 16384
    logits = row.cuda().expand(rows, -1).contiguous()
    temperature = torch.tensor([0.7, 1.3], device="cuda").repeat_interleave(rows // 2)
    counts = torch.zeros(2, VOCAB, dtype=torch.float64, device="cuda")
    for seed in range(16):
        drawn = op(logits, temperature, 1000 + seed).view(2, rows // 2)
        for half in range(2):
            counts[half] += torch.bincount(drawn[half], minlength=VOCAB).double()
    counts = counts.cpu()
    live_mask = torch.zeros(VOCAB, dtype=torch.bool)
    live_mask[live] = True
    assert counts[:, ~live_mask].sum() == 0, "tokens with logit -inf were drawn"
    for half, t in enumerate((0.7, 1.3)):
        want = torch.softmax(row.double() / t, dim=0)
        freq = counts[half] / counts[half].sum()
        tv = 0.5 * float((freq - want).abs().sum())
        assert tv < 0.01, f"temperature {t}: total variation {tv:.4f} from softmax(logits / T)"


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others() -> None:
    op = _op()
    logits = torch.randn(192, VOCAB, device="cuda").to(torch.bfloat16)
    temperature = torch.full((192,), 1.0, device="cuda")
    first = op(logits, temperature, 3)
    assert torch.equal(first, op(logits, temperature, 3))
    assert (first != op(logits, temperature, 4)).float().mean() > 0.9
