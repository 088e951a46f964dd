"""The XPU platform's attention backends, most preferred first, each chosen by its `validate()`:

1. `xpu_triton` (`hallm.ops.triton`'s portable kernels) where Intel's Triton backend
   (pytorch-triton-xpu) is installed;
2. `ipex` (`hallm-xpu[ipex]`): IPEX's paged flash attention, where an IPEX built for the
   installed torch is there;
3. `reference` (`hallm.ops.reference_backend`): pure torch, always usable.

A backend that cannot run here is still listed, so `--attention-backend` names it and its
`validate()` says why, but declares no dtype (it claims nothing it cannot serve). Checking
availability imports neither triton nor IPEX (an IPEX built for another torch fails to import),
only package metadata; the kernels are imported when a layer runs them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from hallm.ops.reference_backend import ReferenceAttention, ReferenceMetadata
from hallm.ops.triton.target import TritonTarget
from hallm.platforms import AttentionBackend, AttentionSpec

IPEX = "intel-extension-for-pytorch"


def intel_triton_reason() -> str | None:
    """Why the Triton kernels cannot run on XPU here, or None when Intel's backend is installed."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (an XPU build of torch brings pytorch-triton-xpu)"
    if importlib.util.find_spec("triton.backends.intel") is None:
        return "triton has no Intel backend (install pytorch-triton-xpu from PyTorch's XPU index)"
    return None


def ipex_reason() -> str | None:
    """Why IPEX cannot serve here, or None. Reads package metadata only: importing an IPEX
    built for another torch fails (or exits)."""
    try:
        version = importlib.metadata.version(IPEX)
    except importlib.metadata.PackageNotFoundError:
        return f"{IPEX} is not installed (pip install 'hallm-xpu[ipex]')"
    built_for = ".".join(version.split("+")[0].split(".")[:2])
    installed = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built_for != installed:
        return (
            f"{IPEX} {version} is built for torch {built_for}.*, but torch {torch.__version__} is installed"
        )
    return None


class IpexPagedAttention(AttentionBackend):
    """IPEX's `PagedAttention` (`reshape_and_cache_flash`, `flash_attn_varlen_func`) over
    hallm's cache layout: keys and values each [num_blocks, block_size, num_kv_heads, head]."""

    name: ClassVar[str] = "ipex"
    dtypes: ClassVar[frozenset[str]] = frozenset({"bfloat16", "float16"})

    @classmethod
    def validate(cls, spec: AttentionSpec) -> list[str]:
        reason = ipex_reason()
        return [reason] if reason else super().validate(spec)

    @classmethod
    def build_metadata(cls, layout: Any) -> ReferenceMetadata:
        return ReferenceAttention.layout_metadata(layout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        out: torch.Tensor,
    ) -> torch.Tensor:
        from intel_extension_for_pytorch.llm.modules import PagedAttention

        qsl, seq_lens = metadata.query_start_loc, metadata.seq_lens
        real = int(qsl[-1])
        PagedAttention.reshape_and_cache_flash(
            key[:real], value[:real], kv_cache[0], kv_cache[1], metadata.slot_mapping[:real]
        )
        cu_q = torch.from_numpy(qsl).to(query.device, torch.int32)
        cu_k = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu_k[1:] = torch.from_numpy(seq_lens).cumsum(0)
        PagedAttention.flash_attn_varlen_func(
            out[:real],
            query[:real].contiguous(),
            kv_cache[0],
            kv_cache[1],
            cu_q,
            cu_k.to(query.device),
            int((qsl[1:] - qsl[:-1]).max(initial=0)),
            int(seq_lens.max(initial=0)),
            self.spec.scale,
            True,
            metadata.block_tables,
            None,
        )
        out[real:].zero_()  # padding rows (see AttentionBackend.forward)
        return out


def backends(target: Callable[[], TritonTarget]) -> list[type[AttentionBackend]]:
    """Triton (where triton is installed at all), IPEX, then the reference."""
    out: list[type[AttentionBackend]] = []
    if importlib.util.find_spec("triton") is not None:
        out.append(xpu_triton_backend(target))
    return [*out, _declared(IpexPagedAttention, ipex_reason()), ReferenceAttention]


def _declared(cls: type[AttentionBackend], reason: str | None) -> type[AttentionBackend]:
    """`cls`, or, when it cannot run here, `cls` declaring no dtype."""
    if reason is None:
        return cls
    return type(cls.__name__, (cls,), {"dtypes": frozenset(), "__module__": __name__})


def xpu_triton_backend(target: Callable[[], TritonTarget]) -> type[AttentionBackend]:
    """hallm's Triton backend for `target`, unusable (with the reason) without Intel's backend."""
    from hallm.ops.triton.backend import TritonPagedAttention

    base = TritonPagedAttention.for_target(target)

    def validate(cls: type[AttentionBackend], spec: AttentionSpec) -> list[str]:
        reason = intel_triton_reason()
        return [reason] if reason else base.validate(spec)

    attrs = {"name": "xpu_triton", "validate": classmethod(validate), "__module__": __name__}
    return _declared(type("XpuTritonPagedAttention", (base,), attrs), intel_triton_reason())
