"""gpt-oss, natively: a Llama-shaped decoder with attention sinks and its own mixture of experts.

What differs from Llama (transformers' modeling_gpt_oss is the oracle):
- attention: biases on q/k/v/o, a learned sink logit per query head (`self_attn.sinks`, the
  `FEATURE_SINKS` attention feature), sliding/full layers alternating by `config.layer_types`,
  yarn rope (through `RotaryEmbedding`, like every scaled rope);
- router: `x @ weight.T + bias`, top-k of the logits, then a softmax over those k logits;
- experts: `gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e]` with gate and up interleaved
  (even columns gate, odd up), gate clamped above at `swiglu_limit`, up clamped to
  +-`swiglu_limit`, `h = (up + 1) * gate * sigmoid(alpha * gate)`, then
  `h @ down_proj[e] + down_proj_bias[e]`, weighted by the router and summed.

The experts run through the op table's `fused_moe` (`hallm.core.layers.moe.FusedMoE`) with the
declared `ClampedSwiGLU` activation and both biases, so a step reads no host value and is
graph-capturable. The op takes Mixtral's layout, so the checkpoint's expert tensors are converted
as they load (`to_op_layout`): transformers' gate_up_proj [E, H, 2I] with interleaved columns
becomes [E, 2I, H] with the gate rows first, its bias [E, 2I] likewise, and down_proj
[E, I, H] becomes [E, H, I]. Under tensor parallelism every rank then holds a slice of each
expert's intermediate dimension (as Mixtral), its query heads' sinks, and the replicated router.
MXFP4-quantized expert tensors (`*_blocks`, `*_scales`, as OpenAI publishes gpt-oss) are
refused at load with the way to dequantize them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hallm.core.distributed import tp_all_reduce, tp_rank, tp_world_size
from hallm.core.distributed.sharding import Shard
from hallm.core.layers.attention import Attention
from hallm.core.layers.moe import FusedMoE
from hallm.core.layers.rotary import RotaryEmbedding
from hallm.core.models.interface import CheckpointMismatchError, layer_sliding_window
from hallm.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, head_shard_of
from hallm.core.models.weights import ExpertShard, FusedShard, stacked_shards
from hallm.platforms import ClampedSwiGLU, ConfigError


class GptOssAttention(LlamaAttention):
    """Llama attention whose softmax has a learned sink logit per query head."""

    def __init__(self, config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__(config, layer_idx, qkv_bias, o_bias, qk_norm)
        self.attn = Attention(
            self.num_heads,
            self.head_size,
            self.head_size**-0.5,
            self.num_kv_heads,
            layer_idx,
            sliding_window=layer_sliding_window(config, layer_idx),
            sinks=True,
        )
        self.sinks = nn.Parameter(torch.empty(self.num_heads))  # [Hq] logits

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary(
            positions, q.view(t, self.num_heads, self.head_size), k.view(t, self.num_kv_heads, self.head_size)
        )
        out = self.attn(q.reshape(t, self.q_size), k.reshape(t, self.kv_size), v, sinks=self.sinks)
        return self.o_proj(out)


class GptOssRouter(nn.Module):
    """forward(x [T, H]) -> (weights [T, K] in x's dtype, ids [T, K]): softmax over the top-k
    logits of `x @ weight.T + bias`."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ConfigError(f"num_experts_per_tok {top_k} must be in [1, num_local_experts {num_experts}]")
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight, self.bias)  # [T, E]
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(top, dim=-1), ids


def to_op_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as the model holds it: the experts' tensors in `fused_moe`'s layout
    (see the module doc), every other tensor unchanged."""
    if name.endswith(".experts.gate_up_proj"):  # [E, H, 2I] interleaved -> [E, 2I, H] gate | up
        rows = tensor.transpose(1, 2)
        return torch.cat([rows[:, 0::2], rows[:, 1::2]], dim=1)
    if name.endswith(".experts.gate_up_proj_bias"):  # [E, 2I] interleaved -> gate | up
        return torch.cat([tensor[:, 0::2], tensor[:, 1::2]], dim=1)
    if name.endswith(".experts.down_proj"):  # [E, I, H] -> [E, H, I]
        return tensor.transpose(1, 2).contiguous()
    return tensor


class GptOssMLP(nn.Module):
    """x [T, H] -> [T, H]: router, then the experts through `fused_moe` (this rank's partial
    sums all-reduced under tensor parallelism)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = int(config.num_local_experts)
        self.router = GptOssRouter(config.hidden_size, num_experts, int(config.num_experts_per_tok))
        self.experts = FusedMoE(
            num_experts,
            config.hidden_size,
            int(config.intermediate_size),
            tp_rank(),
            tp_world_size(),
            activation=ClampedSwiGLU(alpha=float(config.swiglu_alpha), limit=float(config.swiglu_limit)),
            bias=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        return tp_all_reduce(self.experts(x, weights, ids))


class GptOssDecoderLayer(LlamaDecoderLayer):
    attention_cls = GptOssAttention

    def build_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return GptOssMLP(config)


class GptOssForCausalLM(LlamaForCausalLM):
    """gpt-oss (20b, 120b) from a bf16/fp32 (dequantized) checkpoint."""

    layer_cls = GptOssDecoderLayer

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        bias = bool(getattr(config, "attention_bias", True))
        return bias, bias, False

    def checkpoint_shards(self) -> tuple[list[FusedShard], list[ExpertShard]]:
        """q/k/v -> qkv_proj only; the experts' tensors load as they are."""
        attn: LlamaAttention = self.model.layers[0].self_attn  # type: ignore[assignment]
        return stacked_shards(qkv={"q": attn.q_size, "k": attn.kv_size, "v": attn.kv_size}), []

    def tensor_parallel_shards(self) -> dict[str, Shard]:
        """The Llama family's shards, plus this rank's query heads' sinks and its slice of every
        expert's intermediate dimension, in the op's layout (`to_op_layout` runs first). The
        router and the down projection's bias are whole on every rank."""
        table = super().tensor_parallel_shards()
        heads = head_shard_of(self.config)
        inter = int(self.config.intermediate_size) // tp_world_size()
        start = tp_rank() * inter
        table["self_attn.sinks"] = Shard(0, heads.q_start, heads.num_heads)
        table["experts.gate_up_proj"] = Shard(1, start, inter, blocks=2)
        table["experts.gate_up_proj_bias"] = Shard(1, start, inter, blocks=2)
        table["experts.down_proj"] = Shard(2, start, inter)
        return table

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.endswith(("_blocks", "_scales")):
                    raise CheckpointMismatchError(
                        f"checkpoint tensor {name} is MXFP4-quantized; hallm runs gpt-oss from "
                        "dequantized weights: load it in transformers with "
                        "quantization_config=Mxfp4Config(dequantize=True), save_pretrained, and "
                        "serve that directory"
                    )
                yield name, to_op_layout(name, tensor)

        return super().load_weights(checked())


__all__ = ["GptOssForCausalLM"]
