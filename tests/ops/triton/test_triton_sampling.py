"""The one-pass temperature sampler (hallm.ops.triton.sampling) in Triton's interpreter.

The interpreter runs Philox in Python (tens of ms per block), so the shapes are small: a
vocabulary of a few blocks of 64 tokens split over several parts per row, and 160 rows for the
distribution check.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hallm.ops.triton.sampling import split, temperature_sample
from hallm.ops.triton.target import GENERIC, TritonTarget

NEG_INF = float("-inf")


def test_split_fills_the_target_with_whole_blocks_and_no_empty_part() -> None:
    for rows in (1, 7, 192, 4096):
        for vocab in (1, 64, 700, 32000, 128256, 151936):
            for target in (GENERIC, TritonTarget(num_sms=1), TritonTarget(num_sms=304)):
                parts, per_part = split(rows, vocab, target, 64)
                blocks = -(-vocab // 64)
                assert 1 <= parts <= 64
                assert (parts - 1) * per_part < blocks <= parts * per_part  # no empty part
    assert split(1, 128256, GENERIC)[0] > 1  # one row still spreads over the GPU
    assert split(4096, 128256, GENERIC)[0] == 1  # many rows: one program a row, no reduce


def test_greedy_rows_masks_and_seeds_across_blocks_and_parts() -> None:
    """Six rows of 700 tokens (11 blocks of 64, one part each): greedy rows take the first
    index of their maximum wherever it lies; random rows draw only unmasked tokens; the draw
    is a function of the seed."""
    vocab = 700
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, [40, 650]] = 9.0  # a tie in the first and the last block: the first index wins
    logits[1, [130, 131]] = 9.0  # a tie inside one block
    logits[2, 699] = 9.0  # the last token of a short last block
    live = [3, 64, 321, 699]  # random rows: everything else is masked
    for r in (3, 4, 5):
        logits[r] = NEG_INF
        logits[r, live] = torch.tensor([0.0, 0.5, 1.0, 0.2])
    temperature = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.7, 3.0])
    bf16 = logits.to(torch.bfloat16)
    assert split(6, vocab, GENERIC, 64) == (11, 1)

    got = temperature_sample(bf16, temperature, 1234, block=64)
    assert got.dtype == torch.int64 and got.shape == (6,)
    assert got[:3].tolist() == [40, 130, 699]
    assert all(t in live for t in got[3:].tolist())
    again = temperature_sample(bf16, temperature, 1234, block=64)
    assert torch.equal(got, again)


def test_different_seeds_draw_differently() -> None:
    logits = torch.zeros(16, 64)  # uniform over 64 tokens: 16 rows agree with odds 64^-16
    temperature = torch.ones(16)
    first = temperature_sample(logits, temperature, 1)
    assert not torch.equal(first, temperature_sample(logits, temperature, 2))
    assert torch.equal(first, temperature_sample(logits, temperature, 1))


def test_draws_follow_the_tempered_softmax() -> None:
    """160 rows of one distribution over three live tokens (at temperature 0.6 the
    probabilities are 0.09 / 0.24 / 0.67; ignoring the temperature would give 0.19 / 0.34 /
    0.47): the frequencies are within 0.1 total variation of softmax(logits / T)."""
    rows, vocab, temperature = 160, 64, 0.6
    row = torch.full((vocab,), NEG_INF)
    live = torch.tensor([2, 33, 63])
    row[live] = torch.tensor([0.0, 0.6, 1.2])
    got = temperature_sample(row.repeat(rows, 1), torch.full((rows,), temperature), 77)
    counts = torch.bincount(got, minlength=vocab).float()
    assert counts.sum() == counts[live].sum()  # nothing masked was drawn
    want = torch.softmax(row[live] / temperature, dim=0)
    tv = 0.5 * (counts[live] / rows - want).abs().sum().item()
    assert tv < 0.1, f"frequencies {counts[live] / rows} vs softmax(logits / T) {want}: TV {tv:.3f}"


def test_a_seed_outside_the_philox_range_is_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        temperature_sample(torch.zeros(1, 8), torch.ones(1), 2**31)
