"""Tensor parallelism's process group and collectives (see `parallel_state`)."""

from hallm.core.distributed.parallel_state import (
    destroy_tensor_parallel,
    init_tensor_parallel,
    tp_all_gather,
    tp_all_reduce,
    tp_rank,
    tp_world_size,
)

__all__ = [
    "destroy_tensor_parallel",
    "init_tensor_parallel",
    "tp_all_gather",
    "tp_all_reduce",
    "tp_rank",
    "tp_world_size",
]
