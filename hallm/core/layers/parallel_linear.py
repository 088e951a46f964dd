"""Layers split across tensor-parallel ranks (`hallm.core.distributed`).

Column-parallel projections (merged qkv, gate/up) need no layer of their own: each rank builds a
plain `Linear` of its own rows (its heads, its slice of the intermediate size) and the loader
fills it with those rows (`hallm.core.distributed.sharding`), so the op table's `linear` kernel
sees an ordinary, smaller weight. The layers here are the ones that talk to the other ranks:

- `RowParallelLinear` (o_proj, down_proj): each rank multiplies its input columns; one
  all-reduce sums the partial products; the bias is added once, after the sum.
- `VocabParallelEmbedding`: each rank holds a block of the vocabulary; a token outside it looks
  up zeros; one all-reduce assembles the embedding.
- `ParallelLMHead`: each rank computes the logits of its block; an all-gather assembles them.

With one rank each is exactly its single-device counterpart (no collective, bias in the kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hallm.core.distributed import tp_all_gather, tp_all_reduce, tp_rank, tp_world_size
from hallm.core.distributed.sharding import padded_vocab_per_rank
from hallm.core.layers.linear import Linear
from hallm.platforms.ops import BoundLinear, LinearWeights


class RowParallelLinear(Linear):
    """y = all_reduce(x_r @ weight_r.T) + bias; x_r [..., in_features / W] (this rank's columns),
    weight_r [out, in / W], bias [out] (whole, on every rank)."""

    def __init__(self, in_features_per_rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features_per_rank, out_features, bias)
        self.world_size = tp_world_size()

    def prepare_kernels(self) -> None:
        if self.world_size == 1:
            super().prepare_kernels()
            return
        if self.weight is None:
            return
        # The kernel gets no bias: summed over W ranks it would count W times.
        weights = LinearWeights(self.weight.detach(), None)
        made = self._make_kernel(weights) if self._make_kernel is not None else None
        if made is None:
            self.kernel = None
            return
        if made.replaces_weight:
            self.weight = None
            weights = LinearWeights(None, None)  # type: ignore[arg-type]
        self.kernel = BoundLinear(weights, made)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return super().forward(x)
        y = self.kernel.kernel(x) if self.kernel is not None else F.linear(x, self.weight)  # type: ignore[arg-type]
        y = tp_all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> [T, hidden]; `weight` [ceil(V/W), hidden] holds rows [r*ceil(V/W), ...)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.world_size = tp_world_size()
        self.vocab_size = vocab_size
        self.per_rank = padded_vocab_per_rank(vocab_size, self.world_size)
        self.start = tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(Linear):
    """hidden [N, hidden] -> logits [N, V] on every rank; `weight` [ceil(V/W), hidden] holds this
    rank's block of the vocabulary (the embedding's block when the two are tied)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        world_size = tp_world_size()
        super().__init__(hidden_size, padded_vocab_per_rank(vocab_size, world_size), bias=False)
        self.world_size = world_size
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)
        if self.world_size == 1:
            return local
        return tp_all_gather(local)[..., : self.vocab_size]
