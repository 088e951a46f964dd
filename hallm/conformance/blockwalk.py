"""The block-table walk probe: which cache blocks does the kernel read for each request?

Every key is zero, so every score is equal and attention is a plain mean of the values read;
every value in block b is the one-hot vector e_b. The output of a request's decode token is
then a histogram: component b is the share of the positions the kernel read from block b.
The right histogram follows the request's block table; a wrong one says which blocks were read
instead, and whether it is the table shifted by one entry. The probe is independent of the
softmax scale and of the GQA mapping (all heads see the same keys and values), and finite
everywhere, so a stray read shows up as a block id rather than as NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from hallm.conformance.cases import tolerance
from hallm.conformance.kernels import torch_dtype
from hallm.ops.testing import layout_tensors, make_paged_batch
from hallm.platforms import AttentionBackend, AttentionSpec

if TYPE_CHECKING:
    from hallm.conformance.target import Target

NUM_HEADS, NUM_KV_HEADS = 4, 2


def expected_histogram(table: list[int], seq_len: int, block_size: int, num_blocks: int) -> torch.Tensor:
    """Share of the positions 0..seq_len-1 that live in each block, following `table`."""
    hist = torch.zeros(num_blocks, dtype=torch.float64)
    for k in range(-(-seq_len // block_size)):
        block = table[k] if 0 <= k < len(table) else 0
        hist[block] += min(block_size, seq_len - k * block_size) / seq_len
    return hist


def run_block_walk(
    target: Target, backend_cls: type[AttentionBackend], dtype: str, head_size: int, block_size: int
) -> None:
    """Fail with the blocks each request really read, unless they follow its block table."""
    bs = block_size
    context = [4 * bs + 5, 2 * bs + 1]
    batch = make_paged_batch(
        [1, 1],
        context,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_size=head_size,
        block_size=bs,
        dtype=torch_dtype(dtype),
        seed=3,
        poison=0.0,
        with_tensors=False,
    )
    num_blocks = batch.kv_cache.shape[1]
    if num_blocks > head_size:
        pytest.skip(f"not applicable: the probe needs head_size >= {num_blocks} to one-hot encode the blocks")
    spec = AttentionSpec(NUM_HEADS, NUM_KV_HEADS, head_size, head_size**-0.5, dtype, block_size=bs)
    cache_dtype = torch_dtype(spec.cache_dtype)
    onehot = torch.eye(head_size, dtype=torch.float32)[:num_blocks]  # [num_blocks, head_size]
    cache = torch.zeros(batch.kv_cache.shape, dtype=torch.float32)
    cache[1] = onehot[:, None, None, :]
    slots = torch.from_numpy(batch.layout.slot_mapping)
    values = onehot[slots // bs][:, None, :].expand(-1, NUM_KV_HEADS, -1)

    platform = target.platform()
    device = platform.device(0)
    batch.layout.tensors = layout_tensors(batch.layout, device)
    query = batch.query.to(device)
    key = torch.zeros(values.shape, dtype=query.dtype, device=device)
    value = values.to(device, query.dtype).contiguous()
    kv_cache = cache.to(device, cache_dtype)
    out = torch.zeros_like(query)
    backend_cls(spec).forward(query, key, value, kv_cache, backend_cls.build_metadata(batch.layout), out)
    platform.synchronize()

    atol, _ = tolerance(dtype, spec.kv_cache_dtype)
    got = out.cpu().double()  # [2 tokens, heads, head_size]
    problems = []
    for i in range(2):
        seq_len = int(batch.layout.seq_lens[i])
        table = [int(b) for b in batch.layout.block_tables[i]]
        want = expected_histogram(table, seq_len, bs, num_blocks)
        hist = got[i].mean(dim=0)[:num_blocks]
        if torch.isfinite(hist).all() and (hist - want).abs().max() <= atol + 1e-3:
            continue
        problems.append(_explain(i, table, seq_len, bs, hist, want, atol))
    if problems:
        pytest.fail(
            f"block-table walk ({backend_cls.name}, dtype={dtype}, head_size={head_size}, block_size={bs}): "
            "with all keys zero and every value in block b equal to e_b, each request's output is the share "
            "of its positions read from each block.\n" + "".join(f"  - {p}\n" for p in problems),
            pytrace=False,
        )


def run_offset_walk(
    target: Target, backend_cls: type[AttentionBackend], dtype: str, head_size: int, block_size: int
) -> None:
    """Fail with the in-block offsets a decode really read, unless every position p was read at
    offset p % block_size of its block.

    The block walk's twin: every key zero, every value at in-block offset o equal to e_o, so a
    decode token's output is the share of its positions read at each offset (head_size must be
    >= block_size).
    """
    bs = block_size
    context = [3 * bs + 5]
    batch = make_paged_batch(
        [1],
        context,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_size=head_size,
        block_size=bs,
        dtype=torch_dtype(dtype),
        seed=4,
        poison=0.0,
        with_tensors=False,
    )
    spec = AttentionSpec(NUM_HEADS, NUM_KV_HEADS, head_size, head_size**-0.5, dtype, block_size=bs)
    cache_dtype = torch_dtype(spec.cache_dtype)
    onehot = torch.eye(head_size, dtype=torch.float32)[:bs]  # [block_size, head_size]
    cache = torch.zeros(batch.kv_cache.shape, dtype=torch.float32)
    cache[1] = onehot[None, :, None, :]
    slots = torch.from_numpy(batch.layout.slot_mapping)
    values = onehot[slots % bs][:, None, :].expand(-1, NUM_KV_HEADS, -1)

    platform = target.platform()
    device = platform.device(0)
    batch.layout.tensors = layout_tensors(batch.layout, device)
    query = batch.query.to(device)
    key = torch.zeros(values.shape, dtype=query.dtype, device=device)
    value = values.to(device, query.dtype).contiguous()
    out = torch.zeros_like(query)
    kv_cache = cache.to(device, cache_dtype)
    backend_cls(spec).forward(query, key, value, kv_cache, backend_cls.build_metadata(batch.layout), out)
    platform.synchronize()

    seq_len = int(batch.layout.seq_lens[0])
    hist = out.cpu().double()[0].mean(dim=0)[:bs]

    def offsets(period: int) -> torch.Tensor:
        want = torch.zeros(bs, dtype=torch.float64)
        for p in range(seq_len):
            want[p % bs % period] += 1 / seq_len
        return want

    want = offsets(bs)
    # A third of one position's share: any position read at a wrong offset shows, while the
    # rounding of the shares (one output rounding of values below 1) stays far below it.
    tol = 0.3 / seq_len
    if bool(torch.isfinite(hist).all()) and float((hist - want).abs().max()) <= tol:
        return
    missing = [o for o in range(bs) if float(want[o]) > 0 and float(hist[o]) < tol]
    extra = [o for o in range(bs) if float(hist[o]) > float(want[o]) + tol]
    text = (
        f"in-block offsets ({backend_cls.name}, dtype={dtype}, head_size={head_size}, block_size={bs}): with "
        "all keys zero and every value at in-block offset o equal to e_o, a decode's output is the share of "
        f"its positions read at each offset. A decode over {seq_len} positions never read offsets "
        f"{_ranges(missing)} and read offsets {_ranges(extra)} too often"
    )
    period = bs // 2
    while period >= 1:
        if float((hist - offsets(period)).abs().max()) <= tol:
            text += (
                f": position p was read at offset p % {period}, not p % block_size = p % {bs}; the in-block "
                f"offset breaks for block_size {bs} (a mask, shift or tile width that assumes a smaller block)"
            )
            break
        period //= 2
    pytest.fail(text, pytrace=False)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"; "none" when empty."""
    if not values:
        return "none"
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def _explain(
    i: int, table: list[int], seq_len: int, bs: int, hist: torch.Tensor, want: torch.Tensor, atol: float
) -> str:
    used = -(-seq_len // bs)

    def shares(h: torch.Tensor) -> str:
        return (
            "{" + ", ".join(f"{b}: {float(h[b]):.3f}" for b in range(len(h)) if abs(float(h[b])) > atol) + "}"
        )

    text = (
        f"request {i} (block table {table[:used]}, seq_len {seq_len}) read blocks {shares(hist)} "
        f"instead of {shares(want)} (block id: share of positions; block 0 is the null block, never assigned)"
    )
    for shift in (1, -1):
        shifted = [table[k + shift] if 0 <= k + shift < len(table) else 0 for k in range(used)]
        guess = expected_histogram(shifted, seq_len, bs, len(hist))
        if (hist - guess).abs().max() <= atol + 1e-3:
            return text + (
                f": positions of block-table entry k were read from entry k{shift:+d}, an off-by-one in the "
                "block-table walk (position p is in block_tables[i, p // block_size])"
            )
    if not torch.isfinite(hist).all():
        return (
            text + ": the result is not finite, so the kernel read outside the cache or left `out` unwritten"
        )
    return text
