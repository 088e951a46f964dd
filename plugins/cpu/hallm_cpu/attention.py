"""The CPU's paged-attention backends.

`CpuNativeAttention` (preferred) runs the plugin's C kernel (`hallm_cpu.native`), which reads
each request's K/V blocks in place with an online softmax. `CpuReferenceAttention` runs
`hallm.ops.reference`, planning the step's gather indices once in `build_metadata`; it serves
where the native kernels could not be built, and is the conformance kit's oracle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from hallm.ops.reference_backend import ReferenceAttention
from hallm.platforms import (
    FEATURE_SINKS,
    FEATURE_SLIDING_WINDOW,
    FEATURE_SOFT_CAP,
    AttentionBackend,
    AttentionSpec,
    BatchLayout,
)
from hallm_cpu import native


class CpuReferenceAttention(ReferenceAttention):
    """`hallm.ops.reference_backend.ReferenceAttention` in the dtypes the CPU runs: any head size,
    any block size, sliding window, soft cap, sinks; the step's gathers planned once per step."""

    name: ClassVar[str] = "cpu_reference"
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "bfloat16"})


@dataclasses.dataclass(frozen=True)
class CpuNativeMetadata:
    """One step's layout as the native kernel reads it (int32/int64 CPU tensors, rows contiguous)."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    context_lens: torch.Tensor  # int32 [num_reqs]
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req]


def _host_tensor(array: Any, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array) if not isinstance(array, torch.Tensor) else array
    return tensor.to(dtype).contiguous()


class CpuNativeAttention(AttentionBackend):
    """The plugin's C paged attention: fp32/bf16, any head and block size, GQA, sliding window,
    soft cap, sinks; prefill, chunked prefill and decode in one call, parallel over (request, KV
    head, 16-token query chunk)."""

    name: ClassVar[str] = "cpu_native"
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "bfloat16"})
    head_sizes: ClassVar[frozenset[int] | None] = None
    block_sizes: ClassVar[frozenset[int] | None] = None
    block_size_multiple: ClassVar[int] = 1
    kv_cache_dtypes: ClassVar[frozenset[str]] = frozenset({"auto"})
    features: ClassVar[frozenset[str]] = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, FEATURE_SINKS})

    @classmethod
    def validate(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().validate(spec)
        if not native.available():
            reasons.append("the native CPU kernels are not built (no C compiler, or HALLM_CPU_NATIVE=0)")
        return reasons

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> CpuNativeMetadata:
        """The host arrays as tensors, without copies where the dtypes already match."""
        src: Any = layout.tensors if layout.tensors is not None else layout
        return CpuNativeMetadata(
            slot_mapping=_host_tensor(src.slot_mapping, torch.int64),
            query_start_loc=_host_tensor(src.query_start_loc, torch.int32),
            context_lens=_host_tensor(src.context_lens, torch.int32),
            block_tables=_host_tensor(src.block_tables, torch.int32),
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
        """See `AttentionBackend.forward`; key/value rows may be strided views of a fused QKV."""
        return native.paged_attention(
            query,
            key,
            value,
            kv_cache,
            metadata.slot_mapping,
            metadata.query_start_loc,
            metadata.context_lens,
            metadata.block_tables,
            self.spec.scale,
            out,
            soft_cap=self.spec.logits_soft_cap,
            sliding_window=self.spec.sliding_window,
            sinks=sinks,
        )
