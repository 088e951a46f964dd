"""The Llama family, natively: Llama 2/3 (any rope scaling), Mistral, Qwen2, Qwen3, SmolLM2.

The members differ only in flags read from the config or fixed per class:
- Llama/SmolLM2/Mistral: biases on q/k/v/o iff `attention_bias`; Mistral may set a sliding
  window (per layer via `layer_types` where the config has them);
- Qwen2: bias on q/k/v only;
- Qwen3: biases iff `attention_bias`, and an RMSNorm over each head of q and k before rope.
Tied input/output embeddings follow `tie_word_embeddings`.

Layout: every tensor is over the step's packed tokens, T = all requests' new tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hallm.core.distributed import tp_rank, tp_world_size
from hallm.core.distributed.sharding import HeadShard, Shard, padded_vocab_per_rank
from hallm.core.layers.attention import Attention
from hallm.core.layers.linear import Linear
from hallm.core.layers.mlp import GatedMLP
from hallm.core.layers.norm import RMSNorm
from hallm.core.layers.op_context import current_ops
from hallm.core.layers.parallel_linear import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from hallm.core.layers.rotary import RotaryEmbedding
from hallm.core.models.interface import ModelBase, layer_sliding_window
from hallm.core.models.weights import (
    ExpertShard,
    FusedShard,
    load_checkpoint_weights,
    shard_for_rank,
    stacked_shards,
)
from hallm.platforms.ops import DecoderLayerWeights, DecoderStackKernel, DecoderStackWeights


def head_size_of(config: Any) -> int:
    """`config.head_dim` when set, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def head_shard_of(config: Any) -> HeadShard:
    """This rank's attention heads (all of them on a single device)."""
    heads = config.num_attention_heads
    return HeadShard.of(
        heads, getattr(config, "num_key_value_heads", None) or heads, tp_rank(), tp_world_size()
    )


class LlamaAttention(nn.Module):
    """x [T, hidden] -> [T, hidden]: fused qkv projection, (q/k norm), rope, paged attention, o_proj.

    Under tensor parallelism the layer holds this rank's heads (`head_shard_of`): qkv_proj is
    column-parallel (its rows are this rank's q, k and v heads), o_proj row-parallel (one
    all-reduce per block)."""

    def __init__(self, config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        shard = head_shard_of(config)
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_size = head_size_of(config)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        # Rows: [q (q_size) | k (kv_size) | v (kv_size)] -- one matmul instead of three.
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(
            self.num_heads,
            self.head_size,
            self.head_size**-0.5,
            self.num_kv_heads,
            layer_idx,
            sliding_window=layer_sliding_window(config, layer_idx),
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_size)
        k = k.view(t, self.num_kv_heads, self.head_size)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over head_size
        q, k = rotary(positions, q, k)
        out = self.attn(q.reshape(t, self.q_size), k.reshape(t, self.kv_size), v)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; carries the residual stream so each norm fuses the residual add.

    Subclasses change the attention (`attention_cls`) or the MLP (`build_mlp`: any module
    x [T, H] -> [T, H], e.g. a mixture of experts)."""

    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx, qkv_bias, o_bias, qk_norm)
        self.mlp = self.build_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def build_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return GatedMLP(
            config.hidden_size,
            config.intermediate_size // tp_world_size(),  # this rank's columns of gate/up, rows of down
            config.hidden_act,
            bias=bool(getattr(config, "mlp_bias", False)),
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def stack_weights(self) -> DecoderLayerWeights | None:
        """This layer as the op table's decoder stack sees it; None when its MLP is not SiLU."""
        attn, mlp = self.self_attn, self.mlp
        if type(attn) is not LlamaAttention or not isinstance(mlp, GatedMLP) or not mlp.silu:
            return None
        q_norm, k_norm = attn.q_norm, attn.k_norm
        return DecoderLayerWeights(
            input_norm=self.input_layernorm.weight.detach(),
            input_eps=self.input_layernorm.eps,
            qkv=attn.qkv_proj.bound(),
            q_norm=None if q_norm is None else q_norm.weight.detach(),
            k_norm=None if k_norm is None else k_norm.weight.detach(),
            qk_eps=q_norm.eps if q_norm is not None else 0.0,
            attention=attn.attn,
            o=attn.o_proj.bound(),
            post_norm=self.post_attention_layernorm.weight.detach(),
            post_eps=self.post_attention_layernorm.eps,
            gate_up=mlp.gate_up_proj.bound(),
            down=mlp.down_proj.bound(),
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_size=attn.head_size,
            intermediate_size=mlp.intermediate_size,
        )


class LlamaModel(nn.Module):
    """input_ids [T], positions [T] -> final-normed hidden states [T, hidden]."""

    def __init__(
        self,
        config: Any,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            layer_cls(config, i, qkv_bias, o_bias, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_size_of(config))
        self._make_stack = current_ops().llama_decoder_stack
        self.stack: DecoderStackKernel | None = None

    def stack_weights(self) -> DecoderStackWeights | None:
        """The decoder stack as the op table sees it; None when a layer or the rotary is not the
        plain Llama form the stack entry takes (non-SiLU MLP, long-rope or partial rotary)."""
        if not self.rotary_emb.plain:
            return None
        layers = [layer.stack_weights() for layer in self.layers]  # type: ignore[operator]
        if any(w is None for w in layers):
            return None
        return DecoderStackWeights(
            layers=tuple(layers),  # type: ignore[arg-type]
            final_norm=self.norm.weight.detach(),
            final_eps=self.norm.eps,
            inv_freq=self.rotary_emb.inv_freq,
            rotary_scaling=float(self.rotary_emb.attention_scaling),
        )

    def prepare_kernels(self) -> None:
        """Ask the op table for a kernel of the whole decoder stack (after the layers' own).

        Under tensor parallelism no stack kernel is asked for: the table's `llama_decoder_stack`
        entry (the CPU plugin's one-call stack, CUDA's FusedDecoderStack) runs whole layers with
        no collective between them, so on a shard it would skip the all-reduces; the layers run
        one by one instead, each `Linear` still on the table's `linear` kernel."""
        if tp_world_size() > 1:
            self.stack = None
            return
        weights = self.stack_weights() if self._make_stack is not None else None
        self.stack = None if weights is None or self._make_stack is None else self._make_stack(weights)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.stack is not None:
            out = self.stack(positions, hidden)
            if out is not None:
                return out
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, self.rotary_emb)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(ModelBase):
    """Llama 2/3 and SmolLM2. Subclasses change the attention flags, the decoder layer
    (`layer_cls`) and the checkpoint's fusions (`checkpoint_shards`)."""

    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    supports_tensor_parallel = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        qkv_bias, o_bias, qk_norm = self.attention_flags(config)
        self.model = LlamaModel(config, qkv_bias, o_bias, qk_norm, self.layer_cls)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        """(bias on q/k/v, bias on o, per-head q/k RMSNorm)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias, False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden_size]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size]."""
        return self.lm_head(hidden).float()

    def checkpoint_shards(self) -> tuple[list[FusedShard], list[ExpertShard]]:
        """Where split checkpoint tensors go: q/k/v -> qkv_proj, gate/up -> gate_up_proj (this
        rank's share of them under tensor parallelism)."""
        attn: LlamaAttention = self.model.layers[0].self_attn  # type: ignore[assignment]
        shards = stacked_shards(
            qkv={"q": attn.q_size, "k": attn.kv_size, "v": attn.kv_size},
            gate_up=self.config.intermediate_size // tp_world_size(),
        )
        return shards, []

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named weights, fusing q/k/v and gate/up; see `load_checkpoint_weights`.
        Under tensor parallelism each tensor is cut to this rank's shard as it arrives."""
        shards, experts = self.checkpoint_shards()
        if tp_world_size() > 1:
            weights = shard_for_rank(weights, self.tensor_parallel_shards())
        # Tied checkpoints sometimes still carry lm_head.weight (a copy of the embedding).
        ignore = frozenset({"lm_head.weight"}) if self.tie_word_embeddings else frozenset()
        loaded = load_checkpoint_weights(
            self,
            weights,
            shards,
            ignore_suffixes=("rotary_emb.inv_freq",),
            ignore_names=ignore,
            experts=experts,
        )
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded

    def tensor_parallel_shards(self) -> dict[str, Shard]:
        """Checkpoint module name (e.g. "q_proj") -> this rank's part of its weight; the bias of a
        row-parallel module is whole on every rank and has no entry ("o_proj.bias")."""
        attn: LlamaAttention = self.model.layers[0].self_attn  # type: ignore[assignment]
        shard = head_shard_of(self.config)
        d = attn.head_size
        inter = self.config.intermediate_size // tp_world_size()
        r = tp_rank()
        vocab = padded_vocab_per_rank(self.config.vocab_size, tp_world_size())
        rows = {
            "q_proj": Shard(0, shard.q_start * d, attn.q_size),
            "k_proj": Shard(0, shard.kv_start * d, attn.kv_size),
            "v_proj": Shard(0, shard.kv_start * d, attn.kv_size),
            "gate_proj": Shard(0, r * inter, inter),
            "up_proj": Shard(0, r * inter, inter),
            "embed_tokens": Shard(0, r * vocab, vocab, pad_to=vocab),
            "lm_head": Shard(0, r * vocab, vocab, pad_to=vocab),
        }
        table = {f"{name}.{kind}": s for name, s in rows.items() for kind in ("weight", "bias")}
        table["o_proj.weight"] = Shard(1, shard.q_start * d, attn.q_size)
        table["down_proj.weight"] = Shard(1, r * inter, inter)
        return table


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with an optional sliding window (handled by the attention layer)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: bias on q/k/v, none on o."""

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        return True, False, False


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: RMSNorm over each q and k head before rope."""

    @classmethod
    def attention_flags(cls, config: Any) -> tuple[bool, bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias, True
