"""The split-KV merge as a second kernel: one program per (token, head) combines the segments'
partial outputs of `hallm.ops.triton.attention` (used when a step has more segments than the
attention launch merges itself, `launch_config.merges_in_kernel`).

Partials (float32, written by the attention kernel): out [tokens * heads * segments, HEAD_PAD]
unnormalized, max and sum [tokens * heads * segments] of the base-2 online softmax.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton.language as tl

from hallm.ops.triton.launch_config import head_pad
from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.target import TritonTarget, warps_for


def _reduce_kernel(  # type: ignore[no-untyped-def]
    out_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_sum_ptr,
    qsl_ptr,
    num_seqs,
    out_stride_t,
    out_stride_h,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Merge the split-KV partial results of one (token, head)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(qsl_ptr + num_seqs):  # a padding token: no partials were written
        return
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_PAD)
    row = (token * NUM_HEADS + head) * NUM_SEGMENTS + offs_s
    m = tl.load(segm_max_ptr + row)
    l_s = tl.load(segm_sum_ptr + row)
    g = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - g), 0.0)
    denom = tl.sum(l_s * w, axis=0)
    acc = tl.load(segm_out_ptr + row[:, None] * HEAD_PAD + offs_d[None, :])
    res = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + token * out_stride_t + head * out_stride_h + offs_d,
        res.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_SIZE,
    )


@functools.cache
def reduce_kernel(interpret: bool) -> Any:
    """The split-KV reduction kernel, interpreted or compiled."""
    return decorate(_reduce_kernel, interpret, do_not_specialize=["num_seqs"])


def merge_segments(
    out: torch.Tensor,
    segm_out: torch.Tensor,
    segm_max: torch.Tensor,
    segm_sum: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_reqs: int,
    num_segments: int,
    target: TritonTarget | None = None,
) -> None:
    """Write the merged attention output into out [num_tokens, num_heads, head_size] (padding
    tokens past query_start_loc[num_reqs] are left alone)."""
    num_tokens, num_heads, head_size = out.shape
    reduce_kernel(interpreting())[(num_tokens, num_heads)](
        out,
        segm_out,
        segm_max,
        segm_sum,
        query_start_loc,
        num_reqs,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad(head_size),
        NUM_SEGMENTS=num_segments,
        num_warps=warps_for(target, 128),
        **pdl_launch(target),
    )
