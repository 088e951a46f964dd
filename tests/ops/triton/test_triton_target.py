"""Launch parameters follow from the `TritonTarget` a plugin describes, never from a runtime query:
NVIDIA keeps the tuned launches; an AMD target gets the same threads per program in 64-wide
wavefronts, and launch counts scaled to its compute units."""

from __future__ import annotations

import pytest
import torch

from hallm.ops.triton.launch_config import kernel_config, split_kv_segments
from hallm.ops.triton.skinny_launch import skinny_config
from hallm.ops.triton.target import GENERIC, TritonTarget, amd_target, warps_for

MI300X = amd_target("gfx942", 304)
MI250X_DIE = amd_target("gfx90a", 110)


def test_same_threads_per_program_on_both_vendors() -> None:
    for decode_only in (True, False):
        nv = kernel_config(torch.bfloat16, 128, 4, decode_only, GENERIC)
        amd = kernel_config(torch.bfloat16, 128, 4, decode_only, MI300X)
        assert nv.num_warps * 32 == amd.num_warps * 64 == 128
        assert (nv.block_m, nv.tile_n) == (amd.block_m, amd.tile_n)
    assert skinny_config(1, 1152, 896, MI300X).num_warps == 2
    assert skinny_config(1, 1152, 896).num_warps == 4
    assert warps_for(None, 512) == 16 and warps_for(MI300X, 512) == 8 and warps_for(MI300X, 32) == 1


def test_split_kv_scales_with_the_compute_units() -> None:
    # tuned on 132 SMs: unchanged there
    assert split_kv_segments(1, 8, 1) == split_kv_segments(1, 8, 1, GENERIC) == 16
    assert split_kv_segments(32, 8, 1, GENERIC) == 1  # 256 programs fill an H100
    # 256 programs do not fill 304 CUs: split to at least the scaled 1179 programs
    assert split_kv_segments(32, 8, 1, MI300X) == 8
    # a smaller GPU splits less
    assert split_kv_segments(8, 8, 1, MI250X_DIE) < split_kv_segments(8, 8, 1, MI300X)
    assert split_kv_segments(1, 8, 4, MI300X) == 1  # never with prefill in the step


def test_skinny_split_k_follows_the_cu_count() -> None:
    assert skinny_config(1, 896, 4864, MI300X).split_k >= skinny_config(1, 896, 4864, MI250X_DIE).split_k


def test_targets_refuse_what_the_device_cannot_do() -> None:
    with pytest.raises(ValueError, match="CUDA feature"):
        TritonTarget(num_sms=304, pdl=True, backend="hip", warp_size=64)
    with pytest.raises(ValueError, match="warp_size must be 32 or 64"):
        TritonTarget(num_sms=8, warp_size=16)
    with pytest.raises(ValueError, match="no Triton target for AMD architecture 'gfx1100'"):
        amd_target("gfx1100", 48)
    assert (MI300X.backend, MI300X.warp_size, MI300X.shared_memory_bytes, MI300X.pdl) == (
        "hip",
        64,
        65536,
        False,
    )
