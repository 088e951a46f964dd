"""`TemplateAttention`: the AttentionBackend contract, delegating to `hallm.ops.reference`.

To port: declare what your kernel supports (class data below), turn the step's BatchLayout into
what your kernel wants in `build_metadata` (once per step, shared by every layer), and replace
the two `hallm.ops.reference` calls in `forward` with your cache-write and attention kernels.
Check the result with the conformance kit; it compares against the same reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from hallm.ops import reference
from hallm.platforms import FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, AttentionBackend, BatchLayout


@dataclasses.dataclass(frozen=True)
class TemplateAttentionMetadata:
    """What `forward` needs from one step, as the kernel wants it. Valid for that step only."""

    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    context_lens: torch.Tensor  # int32 [num_reqs]
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req]
    slot_mapping: torch.Tensor  # int64 [num_tokens]; < 0 marks a padding token


class TemplateAttention(AttentionBackend):
    """Paged attention through the pure-torch reference kernel."""

    name: ClassVar[str] = "template_reference"
    # What the kernel supports, as data: the core's validate() checks each layer against it.
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "bfloat16"})
    head_sizes: ClassVar[frozenset[int] | None] = None  # e.g. frozenset({64, 128})
    block_sizes: ClassVar[frozenset[int] | None] = None  # e.g. frozenset({16, 32})
    block_size_multiple: ClassVar[int] = 1
    kv_cache_dtypes: ClassVar[frozenset[str]] = frozenset({"auto"})
    features: ClassVar[frozenset[str]] = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP})

    # kv_cache_shape() keeps the default [2, num_blocks, block_size, num_kv_heads, head_size];
    # override it (and the cache writes) if your kernel wants another layout.

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> TemplateAttentionMetadata:
        """Once per step: the layout's arrays as tensors (the runner's, when it made them)."""
        t = layout.tensors
        if t is not None:
            return TemplateAttentionMetadata(
                t.query_start_loc, t.seq_lens, t.context_lens, t.block_tables, t.slot_mapping
            )
        return TemplateAttentionMetadata(
            query_start_loc=torch.from_numpy(layout.query_start_loc),
            seq_lens=torch.from_numpy(layout.seq_lens),
            context_lens=torch.from_numpy(layout.context_lens),
            block_tables=torch.from_numpy(layout.block_tables),
            slot_mapping=torch.from_numpy(layout.slot_mapping),
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Write this step's keys/values into the cache, then causal attention into `out`.

        query, out [num_tokens, num_heads, head_size]; key, value [num_tokens, num_kv_heads,
        head_size]; kv_cache [2, num_blocks, block_size, num_kv_heads, head_size].
        """
        reference.write_kv(key, value, kv_cache, metadata.slot_mapping)
        return reference.paged_attention(
            query,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.context_lens,
            metadata.block_tables,
            self.spec.scale,
            self.spec.num_kv_heads,
            sliding_window=self.spec.sliding_window,
            logits_soft_cap=self.spec.logits_soft_cap,
            out=out,
        )
