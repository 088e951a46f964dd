"""How a Llama-family model divides among tensor-parallel ranks.

Rank r of W holds query heads [r*H/W, (r+1)*H/W), the KV heads those query heads read (its own
slice of them when there are at least W KV heads; when there are fewer, W/Hkv ranks share each KV
head, a replica), rows [r*I/W, (r+1)*I/W) of gate and up and the same columns of down, and rows
[r*Vp, (r+1)*Vp) of the embedding and lm_head, Vp = ceil(V/W) (the last rank's rows past V are
zero padding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hallm.platforms import ConfigError


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows [start, start + size) of a checkpoint tensor's dimension `dim` (0: output rows,
    1: input columns); `pad_to` pads dimension 0 with zeros to that many rows. With `blocks` > 1
    the dimension holds that many equal blocks stacked (a fused gate/up: gate rows, then up
    rows), and the rank's part is [start, start + size) of each block, concatenated."""

    dim: int
    start: int
    size: int
    pad_to: int | None = None
    blocks: int = 1


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads [q_start, q_start + num_heads) and KV heads
    [kv_start, kv_start + num_kv_heads) of the checkpoint's."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
        local_q = num_heads // world_size
        if num_kv_heads >= world_size:
            local_kv = num_kv_heads // world_size
            kv_start = rank * local_kv
        else:  # fewer KV heads than ranks: each rank keeps the one its query heads read
            local_kv = 1
            kv_start = rank * num_kv_heads // world_size
        return cls(local_q, local_kv, rank * local_q, kv_start)


def padded_vocab_per_rank(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size)


def check_tensor_parallel(hf_config: Any, world_size: int) -> None:
    """Raise ConfigError when the model's heads or MLP do not divide among `world_size` ranks."""
    if world_size == 1:
        return
    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    inter = int(getattr(hf_config, "intermediate_size", 0) or 0)
    moe_inter = int(getattr(hf_config, "moe_intermediate_size", 0) or 0)
    shared = int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads {heads} is not divisible by it")
    if kv >= world_size and kv % world_size:
        problems.append(f"num_key_value_heads {kv} is not divisible by it")
    if kv < world_size and world_size % kv:
        problems.append(f"it is not a multiple of num_key_value_heads {kv}")
    if inter % world_size:
        problems.append(f"intermediate_size {inter} is not divisible by it")
    if moe_inter % world_size:
        problems.append(f"moe_intermediate_size {moe_inter} is not divisible by it")
    if shared % world_size:
        problems.append(f"shared_expert_intermediate_size {shared} is not divisible by it")
    if problems:
        raise ConfigError(
            f"tensor_parallel_size {world_size} does not divide this model: "
            + "; ".join(problems)
            + ". Choose a tensor_parallel_size that divides the number of attention heads."
        )
