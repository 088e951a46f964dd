"""Triton kernel that writes one step's keys and values into the paged KV cache.

KV-cache layout (hallm's default, `AttentionBackend.kv_cache_shape`):
`[2, num_blocks, block_size, num_kv_heads, head_size]`, contiguous; index 0 keys, 1 values; a
token's flat slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.target import TritonTarget, warps_for


def _write_kv_kernel(  # type: ignore[no-untyped-def]
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    key_stride_t,
    key_stride_h,
    value_stride_t,
    value_stride_h,
    cache_stride_slot,
    cache_stride_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One program per token: copy its [NUM_KV_HEADS, HEAD_SIZE] key and value to its slot."""
    if USE_PDL:  # see hallm.ops.triton.runtime.pdl_launch
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding token: nothing to write
        return
    i = tl.arange(0, BLOCK_HD)
    h = i // HEAD_SIZE
    d = i % HEAD_SIZE
    m = i < NUM_KV_HEADS * HEAD_SIZE
    k = tl.load(key_ptr + t * key_stride_t + h * key_stride_h + d, mask=m)
    v = tl.load(value_ptr + t * value_stride_t + h * value_stride_h + d, mask=m)
    dst = slot * cache_stride_slot + h * cache_stride_h + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=m)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=m)


@functools.cache
def write_kv_kernel(interpret: bool) -> Any:
    """The KV-write kernel, interpreted or compiled."""
    return decorate(_write_kv_kernel, interpret)


def check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_size], got {tuple(kv_cache.shape)}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    target: TritonTarget | None = None,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_size] into the paged cache at `slot_mapping`.

    Same contract as `hallm.ops.reference.write_kv` (slot < 0: padding, not written), with no
    host synchronization. key/value may be strided views (last dimension contiguous).
    """
    check_cache(kv_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _, _, _, num_kv_heads, head_size = kv_cache.shape
    if tuple(key.shape[1:]) != (num_kv_heads, head_size) or key.shape != value.shape:
        raise ValueError(f"key/value {tuple(key.shape)} do not match the cache {tuple(kv_cache.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    write_kv_kernel(interpreting())[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),  # contiguous: a slot's stride (block stride = block_size * this)
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_size),
        num_warps=warps_for(target, 128 if num_kv_heads * head_size >= 512 else 32),
        **pdl_launch(target),
    )
