"""The fused-MoE kernels' launch plan: the step's (token, expert) pairs sorted by expert and padded
to the kernels' row block, and the tile shape (`hallm.ops.triton.fused_moe` launches from these).

Sorting is a handful of torch ops on the device (a scatter-add count, a stable sort, a cumulative
sum, a search), with no host sync and no per-token Python: every size is a host value fixed by
the step's shape (T tokens, K experts each, E experts), so a decode step stays graph-capturable.
This module imports no kernel.
"""

from __future__ import annotations

import dataclasses

import torch

from hallm.ops.triton.target import GENERIC, TritonTarget

#: Threads per MoE GEMM program at the small row block (4 warps on NVIDIA, 2 wavefronts on AMD)
#: and at the large one.
MOE_THREADS_SMALL = 128
MOE_THREADS_LARGE = 256
#: Average (token, expert) pairs per expert above which a step uses the large row block: below
#: it most experts hold a handful of rows and a 64-row block would be mostly padding.
LARGE_BLOCK_MIN_ROWS_PER_EXPERT = 32


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Tile shape of both MoE GEMMs: BLOCK_M sorted rows (one expert per block) x BLOCK_N output
    columns, reducing over BLOCK_K inputs per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def moe_config(
    num_pairs: int, num_experts: int, dtype: torch.dtype, target: TritonTarget | None = None
) -> MoEConfig:
    """The tile shape for a step of `num_pairs` (token, expert) pairs over `num_experts` experts.

    Decode (few pairs per expert) takes 16-row blocks, the smallest a tensor-core dot takes: its
    cost is the chosen experts' weight bytes, each weight tile read once per block. Prefill takes
    64-row blocks. Shared memory (stages x (BLOCK_M x BLOCK_K + 2 x BLOCK_K x BLOCK_N) elements
    in the gate/up kernel) stays under an sm_86 block's 99 KiB with three stages and under AMD's
    64 KiB of LDS with two (the compile checks hold every variant to its target's limit)."""
    target = target or GENERIC
    large = num_pairs >= LARGE_BLOCK_MIN_ROWS_PER_EXPERT * num_experts
    block_k = 32 if dtype == torch.float32 else 64
    stages = 2 if target.backend == "hip" else 3
    if large:
        return MoEConfig(64, 64, block_k, target.warps(MOE_THREADS_LARGE), stages)
    return MoEConfig(16, 64, block_k, target.warps(MOE_THREADS_SMALL), stages)


@dataclasses.dataclass(frozen=True)
class MoEPlan:
    """The step's (token, slot) pairs sorted by expert, each expert's run padded to `block_m`.

    sorted_ids int32 [max_rows]: flat pair indices `t * K + k`, grouped by expert in expert order,
        padding entries hold `num_pairs` (masked off by the kernels);
    block_experts int32 [max_rows / block_m]: the expert of each row block, -1 for blocks past
        the last expert's run (their programs exit at once);
    num_pairs: T * K; block_m: the row block the runs are padded to.
    The length of sorted_ids is `max_padded_rows`, a bound from shapes only.
    """

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    num_pairs: int
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_experts.shape[0]


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """A host bound on the padded rows, from shapes only: every expert that has a pair pads its
    run by at most `block_m - 1`, and at most min(E, T * K) experts have one; whole blocks."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEPlan:
    """Sort topk_ids [T, K] (any int dtype, values in [0, E)) by expert and pad each expert's run
    to a multiple of `block_m`; see `MoEPlan`. An expert no token chose gets no block, so its
    weights are never read."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [N], N = T * K
    n = flat.shape[0]
    max_rows = max_padded_rows(n, num_experts, block_m)
    # counts by scatter-add, not bincount: bincount syncs with the host on CUDA
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E] end of each expert's padded run
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts  # [E] start of each expert's unpadded run
    order = torch.argsort(flat, stable=True)  # [N] pair indices grouped by expert
    expert_of = flat[order]
    rank = torch.arange(n, device=device) - start[expert_of]  # position within its expert's run
    sorted_ids = torch.full((max_rows,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, padded_start[expert_of] + rank, order.to(torch.int32))
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    experts = torch.searchsorted(padded_end, block_starts, right=True)  # [max_rows / block_m]
    block_experts = torch.where(experts < num_experts, experts, -1).to(torch.int32)
    return MoEPlan(sorted_ids, block_experts, n, block_m)
