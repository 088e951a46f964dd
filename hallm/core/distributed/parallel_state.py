"""The tensor-parallel group of this process: its rank, its size, and the two collectives the
sharded layers use (all-reduce of partial sums, all-gather of vocabulary shards).

A process that never calls `init_tensor_parallel` is rank 0 of a group of one, where both
collectives return their input: the single-device path runs no collective code at all.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int
    backend: str


_group = TensorParallelGroup(rank=0, world_size=1, backend="")


def init_tensor_parallel(
    backend: str, rank: int, world_size: int, init_method: str, timeout_s: float = 600
) -> None:
    """Join the group of `world_size` ranks over torch.distributed's `backend` (the platform's
    `dist_backend`: gloo, nccl, xccl). `init_method` is a rendezvous address, e.g.
    "tcp://127.0.0.1:29500"."""
    global _group
    if world_size > 1:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _group = TensorParallelGroup(rank=rank, world_size=world_size, backend=backend)


def destroy_tensor_parallel() -> None:
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = TensorParallelGroup(rank=0, world_size=1, backend="")


def tp_rank() -> int:
    return _group.rank


def tp_world_size() -> int:
    return _group.world_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place where the backend allows; returns the sum."""
    if _group.world_size == 1:
        return x
    if _group.backend == "gloo" and x.dtype in (torch.bfloat16, torch.float16):
        # gloo sums half types slowly or not at all; the sum in float32 is also more exact.
        wide = x.float()
        dist.all_reduce(wide)
        return wide.to(x.dtype)
    dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] on every rank -> [..., world_size * n], rank r's part at [r*n, (r+1)*n)."""
    if _group.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_group.world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)
