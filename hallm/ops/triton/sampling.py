"""Temperature sampling in one pass over the logits: the op table's `temperature_sample`.

Each row draws argmax(logits / T + G) with G ~ Gumbel(0, 1) i.i.d. per token (the Gumbel-max
form of the exponential race, exact for softmax(logits / T)); a greedy row (T = 0) adds no noise
and takes the first index of its largest logit. The noise comes from Philox (`tl.rand4x`) keyed
by (seed, row, token), so nothing is written but the sampled ids: the torch path reads and
writes the full [N, V] float32 logits once per stage (dtype conversion, scaling, softmax, noise,
divide, argmax).

Two launches: programs (row, part) each reduce a contiguous span of whole blocks of the row to
its best (score, index); one program per row then picks the best part, the leftmost on a tie so
that ties go to the lowest index as argmax does. A row is split into parts so that a small batch
still fills the GPU; a batch of many rows runs one part per row and skips the second launch.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from hallm.ops.triton.runtime import decorate, interpreting
from hallm.ops.triton.skinny_launch import CompileVariant
from hallm.ops.triton.target import GENERIC, TritonTarget

BLOCK = 4096  # tokens a program reads per iteration (four sub-blocks of one Philox call each)
MAX_PARTS = 64  # at most this many parts per row (the reduce launch loads them in one block)
_PROGRAMS_PER_SM = 4


def _race_parts_kernel(  # type: ignore[no-untyped-def]
    logits_ptr,
    temperature_ptr,
    score_ptr,
    index_ptr,
    row_stride,
    vocab,
    span,
    num_parts,
    seed,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    QUARTER: tl.constexpr = BLOCK // 4
    t = tl.load(temperature_ptr + row)
    greedy = t == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    base = logits_ptr + row.to(tl.int64) * row_stride
    lane = tl.arange(0, QUARTER)
    blocks_per_row = tl.cdiv(vocab, BLOCK)
    begin = part * span
    best = -float("inf")
    best_index = begin
    for start in range(begin, tl.minimum(begin + span, vocab), BLOCK):
        # One Philox call gives four uniforms per counter: counter i of this block feeds token
        # i of each quarter. Counters are unique per (row, block, i).
        counter = (row * blocks_per_row + start // BLOCK) * QUARTER + lane
        u0, u1, u2, u3 = tl.rand4x(seed, counter)
        for q in tl.static_range(4):
            # (a compile-time choice: older Triton cannot index a tuple in a static loop)
            if q == 0:
                u = u0
            elif q == 1:
                u = u1
            elif q == 2:
                u = u2
            else:
                u = u3
            cols = start + q * QUARTER + lane
            x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
            # u < 1, so the noise is finite or -inf (u == 0): never NaN, and -inf stays -inf.
            gumbel = -tl.log(-tl.log(u))
            score = tl.where(greedy, x, x * inv_t + gumbel)
            top, at = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = top > best  # strict: an earlier block keeps a tie
            best_index = tl.where(better, start + q * QUARTER + at, best_index)
            best = tl.where(better, top, best)
    tl.store(score_ptr + row * num_parts + part, best)
    tl.store(index_ptr + row * num_parts + part, best_index.to(tl.int64))


def _race_reduce_kernel(  # type: ignore[no-untyped-def]
    score_ptr,
    index_ptr,
    out_ptr,
    num_parts,
    PARTS: tl.constexpr,
):
    row = tl.program_id(0)
    k = tl.arange(0, PARTS)
    score = tl.load(score_ptr + row * num_parts + k, mask=k < num_parts, other=-float("inf"))
    _, at = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(index_ptr + row * num_parts + at))


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    # The seed and the split change from step to step: never specialise on their values.
    return SimpleNamespace(
        parts=decorate(_race_parts_kernel, interpret, do_not_specialize=["span", "num_parts", "seed"]),
        reduce=decorate(_race_reduce_kernel, interpret, do_not_specialize=["num_parts"]),
    )


def jit_kernels() -> SimpleNamespace:
    return _kernels(False)


def split(rows: int, vocab: int, target: TritonTarget, block: int = BLOCK) -> tuple[int, int]:
    """(parts per row, blocks per part): enough programs to fill `target`, whole blocks per part,
    no empty part."""
    blocks = triton.cdiv(vocab, block)
    parts = max(1, min(triton.cdiv(_PROGRAMS_PER_SM * target.num_sms, rows), MAX_PARTS, blocks))
    per_part = triton.cdiv(blocks, parts)
    return triton.cdiv(blocks, per_part), per_part


def temperature_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seed: int,
    *,
    target: TritonTarget = GENERIC,
    block: int | None = None,
) -> torch.Tensor:
    """See `hallm.platforms.ops.TemperatureSampleOp`. `block` (a power of two >= 64) overrides
    the tokens per iteration, for tests that need several blocks and parts in a small vocabulary."""
    rows, vocab = logits.shape
    if not 0 <= seed < 2**31:
        raise ValueError(f"temperature_sample: seed must be in [0, 2**31), got {seed}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = block or min(BLOCK, max(64, triton.next_power_of_2(vocab)))
    parts, per_part = split(rows, vocab, target, block)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    # With one part the first launch writes the answer: its index buffer is `out`.
    index = out if parts == 1 else torch.empty(rows, parts, dtype=torch.int64, device=logits.device)
    score = torch.empty(rows, parts, dtype=torch.float32, device=logits.device)
    kernels = _kernels(interpreting())
    kernels.parts[(rows, parts)](
        logits,
        temperature,
        score,
        index,
        logits.stride(0),
        vocab,
        per_part * block,
        parts,
        seed,
        BLOCK=block,
        num_warps=target.warps(min(256, block // 16)),
    )
    if parts > 1:
        kernels.reduce[(rows,)](score, index, out, parts, PARTS=MAX_PARTS, num_warps=1)
    return out


def compile_variants(sig_dtypes: tuple[str, ...], target: TritonTarget) -> list[CompileVariant]:
    """Both kernels for `compile_check`, the parts kernel for logits of each dtype named as in a
    Triton signature ("bf16", "fp16", "fp32"), with the launch parameters used on `target`."""
    k = jit_kernels()
    out: list[CompileVariant] = [
        (
            "race-reduce",
            k.reduce,
            {"score_ptr": "*fp32", "index_ptr": "*i64", "out_ptr": "*i64", "num_parts": "i32"},
            {"PARTS": MAX_PARTS},
            {"num_warps": 1},
        )
    ]
    for t in sig_dtypes:
        signature = {
            "logits_ptr": f"*{t}",
            "temperature_ptr": "*fp32",
            "score_ptr": "*fp32",
            "index_ptr": "*i64",
            "row_stride": "i32",
            "vocab": "i32",
            "span": "i32",
            "num_parts": "i32",
            "seed": "i32",
        }
        out.append(
            (
                f"race-parts-{t}",
                k.parts,
                signature,
                {"BLOCK": BLOCK},
                {"num_warps": target.warps(min(256, BLOCK // 16))},
            )
        )
    return out
