"""`ReferenceAttention`: `hallm.ops.reference` as an AttentionBackend on any torch device.

The last resort of a platform without a kernel of its own for a layer (hallm-xpu without
Intel's Triton backend or IPEX, hallm-neuron on the XLA device): correct everywhere torch runs,
and slow. Lengths come from the step's host arrays, so `forward` reads nothing back from the
device; the block table and slot mapping are the runner's device tensors. The step's gather
indices are planned once, in `build_metadata`, and shared by every layer. hallm-cpu's fallback
backend is this class under its own name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch

from hallm.ops import reference
from hallm.ops.reference import PagedAttentionPlan
from hallm.platforms import (
    FEATURE_SINKS,
    FEATURE_SLIDING_WINDOW,
    FEATURE_SOFT_CAP,
    AttentionBackend,
    BatchLayout,
)

__all__ = ["ReferenceAttention", "ReferenceMetadata"]


@dataclasses.dataclass(frozen=True)
class ReferenceMetadata:
    """One step: lengths on the host, block table and slot mapping where the cache is."""

    query_start_loc: np.ndarray  # int32 [num_reqs + 1]
    seq_lens: np.ndarray  # int32 [num_reqs]
    context_lens: np.ndarray  # int32 [num_reqs]
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req]
    slot_mapping: torch.Tensor  # int64 [num_tokens]; < 0: padding token, not written
    plan: PagedAttentionPlan | None = None  # the step's gather indices (`build_metadata` plans them)


class ReferenceAttention(AttentionBackend):
    """Pure-torch paged attention: any head size and block size, sliding window, soft cap, sinks."""

    name: ClassVar[str] = "reference"
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "bfloat16", "float16"})
    features: ClassVar[frozenset[str]] = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, FEATURE_SINKS})

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> ReferenceMetadata:
        """The step's layout and its gather indices, planned once for every layer."""
        meta = cls.layout_metadata(layout)
        plan = reference.plan_paged_attention(
            meta.query_start_loc, meta.seq_lens, meta.context_lens, meta.block_tables, layout.block_size
        )
        return dataclasses.replace(meta, plan=plan)

    @classmethod
    def layout_metadata(cls, layout: BatchLayout) -> ReferenceMetadata:
        """The step's layout without a plan (for a backend that only needs the lengths)."""
        t = layout.tensors
        return ReferenceMetadata(
            query_start_loc=layout.query_start_loc,
            seq_lens=layout.seq_lens,
            context_lens=layout.context_lens,
            block_tables=t.block_tables if t is not None else torch.from_numpy(layout.block_tables),
            slot_mapping=t.slot_mapping if t is not None else torch.from_numpy(layout.slot_mapping),
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        out: torch.Tensor,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        reference.write_kv(key, value, kv_cache, metadata.slot_mapping)
        return reference.paged_attention_with_plan(
            query,
            kv_cache,
            metadata.plan,
            self.spec.scale,
            self.spec.num_kv_heads,
            sliding_window=self.spec.sliding_window,
            logits_soft_cap=self.spec.logits_soft_cap,
            out=out,
            sinks=sinks,
        )
