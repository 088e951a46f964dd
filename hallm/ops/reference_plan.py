"""The plan of one step of the reference paged attention (`hallm.ops.reference`): which requests
are attended together and with which gather indices. The indices depend only on the step, not on
the layer, so a backend plans once per step and reuses the plan in every layer.

Requests with few new tokens (decode, short speculative chunks) form padded batched groups;
longer ones (prefill, chunked prefill) are planned one request at a time, unpadded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    import numpy as np

#: A 1-D array of ints: a torch tensor (any device), a numpy array, or a sequence. Host arrays
#: spare an accelerator the device-to-host copy that a device tensor costs.
IntArray = Union[torch.Tensor, "np.ndarray", Sequence[int]]

#: Requests with at most this many new tokens are attended together in one padded batch;
#: longer ones one at a time. Changes speed only, never results.
BATCHED_MAX_QUERY_LEN = 8

# Bounds on the temporaries of one call, in elements. They change speed and peak memory only.
_MAX_GROUP_KEY_POSITIONS = 1 << 14  # requests x padded sequence length of one batched group


# ---- planning one step --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Group:
    """Requests attended in one call: B requests, queries padded to Q rows, keys to S positions."""

    q_index: torch.Tensor  # int64 [B, Q]: packed-token index of each query row (padded rows repeat one)
    q_pos: torch.Tensor  # int64 [B, Q]: sequence position of each query row
    kv_slots: torch.Tensor  # int64 [B, S]: flat cache slot of each key position (0 where padded)
    kv_valid: torch.Tensor | None  # bool [B, S]: key position < seq_len; None when all are
    rows: torch.Tensor | None  # int64 [n]: real rows among the B*Q flattened rows; None when all are
    out_index: torch.Tensor  # int64 [n]: packed-token index of each real row, in `rows` order


@dataclasses.dataclass(frozen=True)
class PagedAttentionPlan:
    """One step's gather indices, independent of the layer: build once, use in every layer.

    The tensors live on the block table's device and may be reused for as long as the step's
    layout is unchanged. Build with `plan_paged_attention`.
    """

    block_size: int
    num_tokens: int  # tokens owned by requests; later tokens of `query` are padding
    groups: tuple[_Group, ...]


def plan_paged_attention(
    query_start_loc: IntArray,
    seq_lens: IntArray,
    context_lens: IntArray,
    block_tables: torch.Tensor,
    block_size: int,
) -> PagedAttentionPlan:
    """Compute the gather indices of one step (see `paged_attention` for the arguments).

    The three length arrays are read on the host (a device tensor is copied there once);
    `block_tables` ([num_reqs, max_blocks_per_req], any integer dtype) decides the device of the
    plan. Raises ValueError when the lengths disagree with each other or with the block table.
    """
    qsl = _host_ints(query_start_loc, "query_start_loc")
    seqs = _host_ints(seq_lens, "seq_lens")
    ctxs = _host_ints(context_lens, "context_lens")
    num_reqs = len(seqs)
    if len(qsl) != num_reqs + 1 or len(ctxs) != num_reqs:
        raise ValueError(
            f"need query_start_loc [num_reqs + 1] and context_lens [num_reqs] for num_reqs={num_reqs}, "
            f"got {len(qsl)} and {len(ctxs)}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] < num_reqs:
        raise ValueError(
            f"block_tables must be [num_reqs={num_reqs}, max_blocks], got {tuple(block_tables.shape)}"
        )
    qlens = [qsl[i + 1] - qsl[i] for i in range(num_reqs)]
    for i in range(num_reqs):
        if qlens[i] < 0 or ctxs[i] < 0 or seqs[i] != ctxs[i] + qlens[i]:
            raise ValueError(
                f"request {i}: need seq_len == context_len + query_len with both >= 0, got "
                f"seq_len={seqs[i]}, context_len={ctxs[i]}, query_len={qlens[i]}"
            )
        if -(-seqs[i] // block_size) > block_tables.shape[1]:
            raise ValueError(
                f"request {i}: seq_len {seqs[i]} needs {-(-seqs[i] // block_size)} blocks of "
                f"{block_size}, but block_tables has {block_tables.shape[1]} columns"
            )

    tables = block_tables.to(torch.long)
    groups: list[_Group] = []
    batched: list[int] = []
    for i in range(num_reqs):
        if qlens[i] == 0:
            continue  # nothing to compute for this request this step
        if qlens[i] <= BATCHED_MAX_QUERY_LEN:
            batched.append(i)
        else:
            groups.append(_single_group(tables[i], qsl[i], ctxs[i], seqs[i], block_size))
    # Similar lengths side by side keep the padding of each batched group small.
    batched.sort(key=lambda i: (seqs[i], qlens[i]))
    start = 0
    for end in range(1, len(batched) + 1):
        full = end - start > 1 and (end - start) * seqs[batched[end - 1]] > _MAX_GROUP_KEY_POSITIONS
        if full:
            groups.append(_batched_group(tables, batched[start : end - 1], qsl, ctxs, seqs, block_size))
            start = end - 1
    if start < len(batched):
        groups.append(_batched_group(tables, batched[start:], qsl, ctxs, seqs, block_size))
    return PagedAttentionPlan(block_size=block_size, num_tokens=qsl[-1] if qsl else 0, groups=tuple(groups))


def _single_group(table: torch.Tensor, start: int, ctx: int, seq: int, block_size: int) -> _Group:
    """One request, unpadded: its queries are rows start..start+qlen, its keys positions 0..seq."""
    device = table.device
    pos = torch.arange(seq, device=device)
    slots = table[pos // block_size] * block_size + pos % block_size  # [S]
    q_index = torch.arange(start, start + seq - ctx, device=device)  # [Q]
    return _Group(
        q_index=q_index[None],
        q_pos=torch.arange(ctx, seq, device=device)[None],
        kv_slots=slots[None],
        kv_valid=None,
        rows=None,
        out_index=q_index,
    )


def _batched_group(
    tables: torch.Tensor,
    reqs: list[int],
    qsl: list[int],
    ctxs: list[int],
    seqs: list[int],
    block_size: int,
) -> _Group:
    """Several requests, queries padded to the longest query, keys to the longest sequence."""
    device = tables.device
    qlens = [qsl[i + 1] - qsl[i] for i in reqs]
    max_q, max_s = max(qlens), max(seqs[i] for i in reqs)
    qlen = torch.tensor(qlens, device=device)[:, None]  # [B, 1]
    start = torch.tensor([qsl[i] for i in reqs], device=device)[:, None]
    ctx = torch.tensor([ctxs[i] for i in reqs], device=device)[:, None]
    seq = torch.tensor([seqs[i] for i in reqs], device=device)[:, None]
    j = torch.arange(max_q, device=device)[None]  # [1, Q]
    q_index = start + torch.minimum(j, qlen - 1)  # [B, Q]; padded rows repeat the last token
    pos = torch.arange(max_s, device=device)[None]  # [1, S]
    kv_valid = pos < seq  # [B, S]
    blocks = tables[torch.tensor(reqs, device=device)][:, pos[0] // block_size]  # [B, S]
    # Padding positions read slot 0 instead of whatever the table holds there (which may be
    # garbage); their values are zeroed after the gather.
    kv_slots = torch.where(kv_valid, blocks * block_size + pos % block_size, 0)
    all_q_real = all(n == max_q for n in qlens)
    rows = None if all_q_real else (j < qlen).flatten().nonzero().squeeze(1)
    out_index = q_index.flatten() if rows is None else q_index.flatten()[rows]
    return _Group(
        q_index=q_index,
        q_pos=ctx + j,
        kv_slots=kv_slots,
        kv_valid=None if all(seqs[i] == max_s for i in reqs) else kv_valid,
        rows=rows,
        out_index=out_index,
    )


# ---- attention ---------------------------------------------------------------------------------


def _host_ints(values: IntArray, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        return [int(x) for x in values.tolist()]
    return [int(x) for x in values]
