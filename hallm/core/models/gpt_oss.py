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

The expert MLP runs here (`GptOssExperts`), not through the op table's `fused_moe`: that op takes
bias-free SiLU experts in [E, 2I, H] layout and cannot express the clamped, biased, interleaved
SwiGLU. Like the reference `fused_moe` it loops over the experts some token chose (one host
read of the chosen ids per layer), so it reads no unused expert and is not graph-capturable.
The expert tensors keep transformers' layout ([E, H, 2I] and [E, I, H]), so a dequantized
checkpoint loads unchanged; MXFP4-quantized expert tensors (`*_blocks`, `*_scales`, as OpenAI
publishes gpt-oss) are refused at load with the way to dequantize them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hallm.core.layers.attention import Attention
from hallm.core.layers.rotary import RotaryEmbedding
from hallm.core.models.interface import CheckpointMismatchError, layer_sliding_window
from hallm.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from hallm.core.models.weights import ExpertShard, FusedShard, stacked_shards
from hallm.platforms import ConfigError


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


class GptOssExperts(nn.Module):
    """forward(x [T, H], weights [T, K], ids [T, K]) -> [T, H]: the routed sum of gpt-oss's
    clamped SwiGLU experts (see the module doc)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        e, h, i = int(config.num_local_experts), int(config.hidden_size), int(config.intermediate_size)
        self.alpha = float(config.swiglu_alpha)
        self.limit = float(config.swiglu_limit)
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))  # columns interleaved: gate, up
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.empty(e, h))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():  # ascending, as transformers adds them
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            gate_up = x[token] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]  # [n, 2I]
            gate = gate_up[:, ::2].clamp(max=self.limit)
            up = gate_up[:, 1::2].clamp(min=-self.limit, max=self.limit)
            hidden = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
            y = hidden @ self.down_proj[e] + self.down_proj_bias[e]  # [n, H]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        return out


class GptOssMLP(nn.Module):
    """x [T, H] -> [T, H]: router, then experts."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.router = GptOssRouter(
            config.hidden_size, int(config.num_local_experts), int(config.num_experts_per_tok)
        )
        self.experts = GptOssExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        return self.experts(x, weights, ids)


class GptOssDecoderLayer(LlamaDecoderLayer):
    attention_cls = GptOssAttention

    def build_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return GptOssMLP(config)


class GptOssForCausalLM(LlamaForCausalLM):
    """gpt-oss (20b, 120b) from a bf16/fp32 (dequantized) checkpoint."""

    layer_cls = GptOssDecoderLayer
    #: Sinks and experts are not sliced per rank: refused at TP > 1.
    supports_tensor_parallel = False
    #: The expert loop reads the chosen expert ids on the host (see the module doc).
    supports_step_graphs = False

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        bias = bool(getattr(config, "attention_bias", True))
        return bias, bias, False

    def checkpoint_shards(self) -> tuple[list[FusedShard], list[ExpertShard]]:
        """q/k/v -> qkv_proj only; the experts' tensors load as they are."""
        attn: LlamaAttention = self.model.layers[0].self_attn  # type: ignore[assignment]
        return stacked_shards(qkv={"q": attn.q_size, "k": attn.kv_size, "v": attn.kv_size}), []

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
                yield name, tensor

        return super().load_weights(checked())


__all__ = ["GptOssForCausalLM"]
