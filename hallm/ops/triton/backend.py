"""`TritonPagedAttention`: the portable Triton kernels as an AttentionBackend.

Any platform whose torch device runs Triton (CUDA, ROCm, XPU) can list this class among its
attention backends. Metadata is built once per step from the layout's device tensors; `forward`
writes the step's keys/values and runs the unified paged-attention kernel. Nothing in `forward`
reads a device value back to the host, so a decode step runs unchanged inside a CUDA graph
(`graph_safe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from hallm.ops.triton.attention import paged_attention
from hallm.ops.triton.kv_write import write_kv
from hallm.ops.triton.target import TritonTarget
from hallm.platforms import (
    FEATURE_SINKS,
    FEATURE_SLIDING_WINDOW,
    FEATURE_SOFT_CAP,
    AttentionBackend,
    AttentionSpec,
    BatchLayout,
)

#: Head sizes above this would need more registers/shared memory than the tiles are sized for.
MAX_HEAD_SIZE = 256


@dataclasses.dataclass
class TritonAttentionMetadata:
    """One step's metadata, shared by every layer (valid for that step only).

    Host ints decide the launch (grid size, tile shape, split-KV); the tensors are read by the
    kernels only. `workspace` holds the split-KV buffers, allocated by the first layer and
    reused by the others.
    """

    num_reqs: int
    num_tokens: int
    num_real_tokens: int  # tokens owned by requests; later rows are padding
    max_query_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_tables: torch.Tensor  # int32 [num_reqs, >= max blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    workspace: dict[Any, Any] = dataclasses.field(default_factory=dict)


class TritonPagedAttention(AttentionBackend):
    """Unified prefill + decode paged attention in Triton (GQA-tiled, split-KV for small decode)."""

    name: ClassVar[str] = "triton"
    dtypes: ClassVar[frozenset[str]] = frozenset({"bfloat16", "float16", "float32"})
    head_sizes: ClassVar[frozenset[int] | None] = None  # any up to MAX_HEAD_SIZE (see validate)
    block_sizes: ClassVar[frozenset[int] | None] = None
    block_size_multiple: ClassVar[int] = 1
    kv_cache_dtypes: ClassVar[frozenset[str]] = frozenset({"auto"})
    features: ClassVar[frozenset[str]] = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, FEATURE_SINKS})
    #: forward() only launches kernels and reads no device value: safe to capture in a graph.
    graph_safe: ClassVar[bool] = True
    #: Describes the device the kernels launch on (see `for_target`); asked when a layer's
    #: backend is made, so listing the backend touches no device. None: the generic target.
    target_provider: ClassVar[Callable[[], TritonTarget] | None] = None

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        provider = type(self).target_provider
        self.target: TritonTarget | None = provider() if provider is not None else None

    @classmethod
    def for_target(cls, provider: Callable[[], TritonTarget]) -> type[TritonPagedAttention]:
        """This backend launching for the target `provider()` gives (the plugin that lists it
        describes its device)."""
        attrs = {"target_provider": staticmethod(provider), "__module__": cls.__module__}
        return type(cls.__name__, (cls,), attrs)

    @classmethod
    def validate(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().validate(spec)
        if spec.head_size > MAX_HEAD_SIZE:
            reasons.append(f"head size {spec.head_size} > {MAX_HEAD_SIZE}")
        return reasons

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> TritonAttentionMetadata:
        tensors = layout.tensors
        if tensors is None:
            from hallm.ops.testing import layout_tensors

            # a host-only layout (tests, the kit): its tensors on this process's accelerator
            accelerator = torch.accelerator.current_accelerator()
            tensors = layout_tensors(layout, accelerator if accelerator is not None else "cpu")
        return TritonAttentionMetadata(
            num_reqs=layout.num_reqs,
            num_tokens=layout.num_tokens,
            num_real_tokens=int(layout.query_start_loc[layout.num_reqs]) if layout.num_reqs else 0,
            max_query_len=layout.max_query_len,
            query_start_loc=tensors.query_start_loc,
            seq_lens=tensors.seq_lens,
            block_tables=tensors.block_tables,
            slot_mapping=tensors.slot_mapping,
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
        """Write key/value at the step's slots, then causal paged attention into `out`."""
        write_kv(key, value, kv_cache, metadata.slot_mapping, self.target)
        return paged_attention(
            query,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_tables,
            max_query_len=metadata.max_query_len,
            scale=self.spec.scale,
            sliding_window=self.spec.sliding_window,
            logits_soft_cap=self.spec.logits_soft_cap,
            out=out,
            num_real_tokens=metadata.num_real_tokens,
            workspace=metadata.workspace,
            target=self.target,
            sinks=sinks,
        )
