"""The attention layer models call: projections are the model's, paging is the backend's.

A model builds one `Attention` per layer with the layer's shape. After the model is built the
runner binds each layer to the selected backend instance and that layer's KV-cache tensor
(`bind`), so the model itself never names a device or a backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hallm.platforms import AttentionBackend
from hallm.platforms.forward_context import get_forward_context


class Attention(nn.Module):
    """Paged causal self-attention over the step's packed tokens.

    forward(q [T, num_heads*head_size], k/v [T, num_kv_heads*head_size], sinks [num_heads] | None)
        -> [T, num_heads*head_size]

    `sinks=True` makes a layer with attention sinks (see `AttentionSpec.sinks`): its model
    owns the learned sink logits and passes them to every call.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        layer_idx: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.sinks = sinks
        self.impl: AttentionBackend | None = None
        self.kv_cache: torch.Tensor | None = None

    def bind(self, impl: AttentionBackend, kv_cache: torch.Tensor) -> None:
        self.impl = impl
        self.kv_cache = kv_cache

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.impl is None or self.kv_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no backend bound; call bind()")
        if (sinks is not None) != self.sinks:
            raise RuntimeError(
                f"attention layer {self.layer_idx} was built with sinks={self.sinks} but called "
                f"{'with' if sinks is not None else 'without'} sink logits"
            )
        ctx = get_forward_context()
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_size)
        k = k.view(t, self.num_kv_heads, self.head_size)
        v = v.view(t, self.num_kv_heads, self.head_size)
        out = torch.empty_like(q)
        metadata = ctx.metadata[type(self.impl)]
        if sinks is None:
            self.impl.forward(q, k, v, self.kv_cache, metadata, out)
        else:  # only backends declaring FEATURE_SINKS are selected for such a layer
            forward: Any = self.impl.forward
            forward(q, k, v, self.kv_cache, metadata, out, sinks=sinks.float())
        return out.view(t, self.num_heads * self.head_size)
