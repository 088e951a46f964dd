"""Mixture-of-experts members of the Llama family: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

They are Llama decoders whose MLP is a sparse block (`SparseMoeBlock`): a softmax top-k router
and stacked experts run through the op table's `fused_moe` (hallm.core.layers.moe), plus, for
Qwen2-MoE, a shared expert scaled by a sigmoid gate. Per family:
- Mixtral: router weights renormalized, kept float32; checkpoint names `block_sparse_moe` and
  per-expert w1 (gate), w3 (up), w2 (down);
- Qwen2-MoE: q/k/v bias (`qkv_bias`), shared expert, `norm_topk_prob`, dense layers where
  `mlp_only_layers` / `decoder_sparse_step` say;
- Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm), `norm_topk_prob`, dense layers as Qwen2-MoE;
- OLMoE: RMSNorm over the whole q and k projections (not per head), optional `clip_qkv`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from hallm.core.distributed import tp_all_reduce, tp_rank, tp_world_size
from hallm.core.distributed.sharding import Shard
from hallm.core.layers.linear import Linear
from hallm.core.layers.mlp import GatedMLP
from hallm.core.layers.moe import FusedMoE, SoftmaxTopKRouter
from hallm.core.layers.norm import RMSNorm
from hallm.core.layers.rotary import RotaryEmbedding
from hallm.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from hallm.core.models.weights import ExpertShard, FusedShard, expert_shards
from hallm.platforms import ConfigError


def _num_experts(config: Any) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0) or 0)


def _moe_intermediate(config: Any) -> int:
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


class SparseMoeBlock(nn.Module):
    """x [T, H] -> [T, H]: `experts(x, router(x))` (+ `sigmoid(shared_expert_gate(x)) *
    shared_expert(x)` when the block has a shared expert).

    Under tensor parallelism every rank routes in full (the router is replicated), holds its slice
    of every expert's intermediate dimension and of the shared expert's, and the experts' partial
    sums meet in one all-reduce (the shared expert's row-parallel down projection has its own)."""

    def __init__(self, config: Any, renormalize: bool, cast_weights: bool, shared_size: int = 0) -> None:
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ConfigError(
                f"MoE experts with activation {config.hidden_act!r} are not supported; only SiLU"
            )
        num_experts = _num_experts(config)
        self.gate = SoftmaxTopKRouter(
            config.hidden_size, num_experts, int(config.num_experts_per_tok), renormalize, cast_weights
        )
        world = tp_world_size()
        self.experts = FusedMoE(num_experts, config.hidden_size, _moe_intermediate(config), tp_rank(), world)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if shared_size:
            self.shared_expert = GatedMLP(config.hidden_size, shared_size // world, config.hidden_act)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = tp_all_reduce(self.experts(x, weights, ids))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def _is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule: sparse unless listed in `mlp_only_layers`, every `decoder_sparse_step`."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    only_dense = getattr(config, "mlp_only_layers", None) or []
    return layer_idx not in only_dense and _num_experts(config) > 0 and (layer_idx + 1) % step == 0


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(config, renormalize=True, cast_weights=False)


class QwenMoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse_layer(config, layer_idx):
            return super().build_mlp(config, layer_idx)
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        return SparseMoeBlock(config, bool(getattr(config, "norm_topk_prob", False)), True, shared)


class OlmoeAttention(LlamaAttention):
    """OLMoE: RMSNorm over the whole q [T, Hq*D] and k [T, Hk*D] projections, then clamp
    q/k/v to +-clip_qkv when set, then rope."""

    def __init__(self, config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__(config, layer_idx, qkv_bias, o_bias, qk_norm=False)
        self.q_full_norm = RMSNorm(self.q_size, config.rms_norm_eps)
        self.k_full_norm = RMSNorm(self.kv_size, config.rms_norm_eps)
        self.clip_qkv = getattr(config, "clip_qkv", None)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_full_norm(q), self.k_full_norm(k)
        if self.clip_qkv is not None:
            c = float(self.clip_qkv)
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k = rotary(
            positions, q.view(t, self.num_heads, self.head_size), k.view(t, self.num_kv_heads, self.head_size)
        )
        out = self.attn(q.reshape(t, self.q_size), k.reshape(t, self.kv_size), v.contiguous())
        return self.o_proj(out)


class OlmoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = OlmoeAttention

    def build_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(config, bool(getattr(config, "norm_topk_prob", False)), True)


class _MoeCausalLM(LlamaForCausalLM):
    """Shared checkpoint handling: per-expert gate/up/down (or stacked) expert tensors."""

    supports_tensor_parallel = True
    #: checkpoint names of an expert's gate, up and down linears
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def checkpoint_shards(self) -> tuple[list[FusedShard], list[ExpertShard]]:
        shards, _ = super().checkpoint_shards()
        shared = int(getattr(self.config, "shared_expert_intermediate_size", 0) or 0) // tp_world_size()
        if shared:
            # Before the plain gate/up shards: the first shard whose name matches wins.
            shards = [
                FusedShard("shared_expert.gate_proj", "shared_expert.gate_up_proj", 0, shared),
                FusedShard("shared_expert.up_proj", "shared_expert.gate_up_proj", shared, shared),
                *shards,
            ]
        gate, up, down = self.expert_names
        return shards, expert_shards(gate, up, down, _moe_intermediate(self.config) // tp_world_size())

    def tensor_parallel_shards(self) -> dict[str, Shard]:
        """The Llama family's shards, plus this rank's slice of every expert's intermediate
        dimension (per-expert checkpoint tensors, and stacked ones in transformers' layout:
        gate_up_proj [E, 2I, H], down_proj [E, H, I]) and of the shared expert's."""
        table = super().tensor_parallel_shards()
        world, r = tp_world_size(), tp_rank()
        inter = _moe_intermediate(self.config) // world
        gate, up, down = self.expert_names
        table[f"experts.*.{gate}.weight"] = Shard(0, r * inter, inter)
        table[f"experts.*.{up}.weight"] = Shard(0, r * inter, inter)
        table[f"experts.*.{down}.weight"] = Shard(1, r * inter, inter)
        table["experts.gate_up_proj"] = Shard(1, r * inter, inter, blocks=2)
        table["experts.down_proj"] = Shard(2, r * inter, inter)
        shared = int(getattr(self.config, "shared_expert_intermediate_size", 0) or 0) // world
        if shared:
            table["shared_expert.gate_proj.weight"] = Shard(0, r * shared, shared)
            table["shared_expert.up_proj.weight"] = Shard(0, r * shared, shared)
            table["shared_expert.down_proj.weight"] = Shard(1, r * shared, shared)
        return table


class MixtralForCausalLM(_MoeCausalLM):
    """Mixtral (and Mistral-format MoE checkpoints converted to HF names)."""

    layer_cls = MixtralDecoderLayer
    expert_names = ("w1", "w3", "w2")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                yield name.replace(".block_sparse_moe.", ".mlp."), tensor

        return super().load_weights(renamed())


class Qwen2MoeForCausalLM(_MoeCausalLM):
    layer_cls = QwenMoeDecoderLayer

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        return bool(getattr(config, "qkv_bias", True)), False, False


class Qwen3MoeForCausalLM(_MoeCausalLM):
    layer_cls = QwenMoeDecoderLayer

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias, True


class OlmoeForCausalLM(_MoeCausalLM):
    layer_cls = OlmoeDecoderLayer
    #: Its q/k RMSNorm spans all heads, which tensor parallelism splits across ranks.
    supports_tensor_parallel = False
    tensor_parallel_refusal = (
        "OLMoE normalizes q and k over all heads at once, which tensor parallelism splits across ranks"
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.replace(".self_attn.q_norm.", ".self_attn.q_full_norm.")
                yield name.replace(".self_attn.k_norm.", ".self_attn.k_full_norm."), tensor

        return super().load_weights(renamed())


__all__ = [
    "MixtralForCausalLM",
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
]
