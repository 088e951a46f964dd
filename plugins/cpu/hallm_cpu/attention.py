"""`CpuReferenceAttention`: `hallm.ops.reference` as the CPU's paged-attention backend.

The gather indices of a step are planned once in `build_metadata` and shared by every layer;
each layer's `forward` writes its new keys/values and runs the reference kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from hallm.ops.reference import (
    PagedAttentionPlan,
    paged_attention_with_plan,
    plan_paged_attention,
    write_kv,
)
from hallm.platforms import FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, AttentionBackend, BatchLayout


@dataclasses.dataclass(frozen=True)
class CpuAttentionMetadata:
    """One step's metadata, shared by all layers; valid for that step only."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]; < 0: padding token, not written
    plan: PagedAttentionPlan  # gather indices of the step (hallm.ops.reference)


class CpuReferenceAttention(AttentionBackend):
    """Pure-torch paged attention: any head size, any block size, sliding window, soft cap."""

    name: ClassVar[str] = "cpu_reference"
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "bfloat16"})
    head_sizes: ClassVar[frozenset[int] | None] = None
    block_sizes: ClassVar[frozenset[int] | None] = None
    block_size_multiple: ClassVar[int] = 1
    kv_cache_dtypes: ClassVar[frozenset[str]] = frozenset({"auto"})
    features: ClassVar[frozenset[str]] = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP})

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> CpuAttentionMetadata:
        """Plan the step's gathers once; lengths come from the host arrays (no device copy)."""
        if layout.tensors is not None:
            slot_mapping = layout.tensors.slot_mapping
            block_tables = layout.tensors.block_tables
        else:
            slot_mapping = torch.from_numpy(layout.slot_mapping)
            block_tables = torch.from_numpy(layout.block_tables)
        plan = plan_paged_attention(
            layout.query_start_loc,
            layout.seq_lens,
            layout.context_lens,
            block_tables,
            layout.block_size,
        )
        return CpuAttentionMetadata(slot_mapping=slot_mapping, plan=plan)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Write key/value at the step's slots, then causal attention over the cache into `out`.

        query, out [num_tokens, num_heads, head_size]; key, value [num_tokens, num_kv_heads,
        head_size]; kv_cache [2, num_blocks, block_size, num_kv_heads, head_size].
        """
        write_kv(key, value, kv_cache, metadata.slot_mapping)
        return paged_attention_with_plan(
            query,
            kv_cache,
            metadata.plan,
            self.spec.scale,
            self.spec.num_kv_heads,
            sliding_window=self.spec.sliding_window,
            logits_soft_cap=self.spec.logits_soft_cap,
            out=out,
        )
