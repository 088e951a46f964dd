"""Launch configuration of the paged-attention kernel: its tile shape and the split-KV choice.

Both are decided from host values that stay fixed for a captured decode batch size (dtype, head
shape, number of requests, whether any request prefills), never from sequence lengths, so a CUDA
graph captured for a batch size stays valid as the lengths change.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from hallm.ops.triton.target import GENERIC, TritonTarget

#: Most segments the split-KV path uses (a power of two).
SPLIT_KV_SEGMENTS = 16
#: Decode-only steps launching fewer (request, KV head) programs than this use split-KV...
SPLIT_KV_MAX_PROGRAMS = 256
#: ...with enough segments to launch about this many programs (a few per SM). Both counts are
#: for a GPU of `target.TUNED_SMS` SMs and scale with the target's (`TritonTarget.scaled`).
SPLIT_KV_TARGET_PROGRAMS = 512
#: Threads per attention program (4 warps on NVIDIA, 2 wavefronts on AMD): the tiles below were
#: tuned at this many.
ATTENTION_THREADS = 128
#: Split-KV steps with at most this many segments merge them in the attention launch; with more
#: (the smallest batches), the last program's pass over the partials is a serial tail that
#: measured slower than a second kernel launched with PDL (benchmarks/results/gpu.md).
MERGE_IN_KERNEL_MAX_SEGMENTS = 8
#: A split-KV segment covers at least this many KV tiles: a short context uses fewer segments
#: than the launch has (the rest exit at once), and with the in-kernel merge a request whose
#: keys fit one segment skips the merge. One tile measured fastest (benchmarks/results/gpu.md).
SPLIT_KV_MIN_TILES = 1
#: Most float32 elements of one [BLOCK_M, SEG_CHUNK, HEAD_PAD] tile of partials the in-kernel
#: merge loads at once (64 registers per thread at 4 warps). Within it the merge takes half the
#: segments per load (two rounds), the fastest chunk at 4 and at 8 segments for both head shapes
#: in the merge sweep (benchmarks/results/gpu.md).
MERGE_TILE_ELEMENTS = 8192


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of the attention kernel."""

    block_m: int  # query rows per program (a power of two >= 16)
    tile_n: int  # key positions per loop iteration (a power of two >= 16)
    num_warps: int = 4
    num_stages: int = 2


def head_pad(head_size: int) -> int:
    return max(16, triton.next_power_of_2(head_size))


def kernel_config(
    dtype: torch.dtype,
    head_size: int,
    num_q_per_kv: int,
    decode_only: bool,
    target: TritonTarget | None = None,
) -> KernelConfig:
    """The tile shape for a step: short query tiles for decode, taller ones when prefill is present.

    Decode streams keys/values: long KV tiles (128 positions at head size <= 64, 64 at 128: the
    fastest in the tile sweep, benchmarks/results/gpu.md). Shared memory stays under ~96 KB for every
    dtype and head size up to 256, so the same configuration compiles for sm_80/86/89/90 and
    fits AMD's 64 KiB of LDS (the compile checks hold every variant to its target's limit).
    The program has ATTENTION_THREADS threads on every target (`TritonTarget.warps`).
    """
    target = target or GENERIC
    warps = target.warps(ATTENTION_THREADS)
    rows = triton.next_power_of_2(num_q_per_kv)
    pad = head_pad(head_size)
    wide = dtype == torch.float32 or pad > 128
    if decode_only:
        tile_n = 32 if wide else (128 if pad <= 64 else 64)
        return KernelConfig(block_m=max(16, rows), tile_n=tile_n, num_warps=warps, num_stages=2)
    return KernelConfig(block_m=max(64 if not wide else 32, rows), tile_n=32, num_warps=warps, num_stages=2)


def split_kv_segments(
    num_reqs: int, num_kv_heads: int, max_query_len: int, target: TritonTarget | None = None
) -> int:
    """KV segments per (request, KV head) for a step; 1 = no split.

    Decode-only steps that launch too few programs to fill the GPU split each request's KV range
    (flash-decoding), with enough segments to launch about SPLIT_KV_TARGET_PROGRAMS programs.
    Decided from host ints that are fixed for a captured batch size, never from lengths.
    """
    if max_query_len > 1:
        return 1
    target = target or GENERIC
    programs = max(1, num_reqs * num_kv_heads)
    if programs >= target.scaled(SPLIT_KV_MAX_PROGRAMS):
        return 1
    wanted = target.scaled(SPLIT_KV_TARGET_PROGRAMS)
    return min(SPLIT_KV_SEGMENTS, triton.next_power_of_2(-(-wanted // programs)))


def use_split_kv(
    num_reqs: int, num_kv_heads: int, max_query_len: int, target: TritonTarget | None = None
) -> bool:
    """Whether a step uses split-KV (see `split_kv_segments`)."""
    return split_kv_segments(num_reqs, num_kv_heads, max_query_len, target) > 1


def merges_in_kernel(num_segments: int) -> bool:
    """Whether a split-KV step merges its segments in the attention launch (see
    MERGE_IN_KERNEL_MAX_SEGMENTS) rather than in a second kernel."""
    return 1 < num_segments <= MERGE_IN_KERNEL_MAX_SEGMENTS


def attention_constexprs(
    cfg: KernelConfig,
    num_q_per_kv: int,
    head_size: int,
    decode_only: bool,
    num_segments: int,
    merge_in_kernel: bool,
    min_segment_tiles: int | None = None,
) -> dict[str, int | bool]:
    """The attention kernel's launch-shape constexprs (the launcher and `compile_check` share them).
    min_segment_tiles: None is SPLIT_KV_MIN_TILES.

    BLOCK_M rows hold BLOCK_Q tokens x NUM_Q_PER_KV heads; a decode-only step gives each program
    one request's token (DECODE_ONLY: the program id is the request, no search).
    """
    block_m = max(cfg.block_m, triton.next_power_of_2(num_q_per_kv))
    pad = head_pad(head_size)
    split = num_segments > 1
    return {
        "HEAD_PAD": pad,
        "TILE_N": cfg.tile_n,
        "BLOCK_M": block_m,
        "BLOCK_Q": 1 if decode_only else block_m // num_q_per_kv,
        "DECODE_ONLY": decode_only,
        "NUM_SEGMENTS": num_segments,
        "MERGE_IN_KERNEL": split and merge_in_kernel,
        "MIN_SEGMENT_TILES": max(1, SPLIT_KV_MIN_TILES if min_segment_tiles is None else min_segment_tiles),
        "SEG_CHUNK": max(1, min(num_segments // 2, MERGE_TILE_ELEMENTS // (block_m * pad))),
    }
