"""The AttentionBackend contract and the backend-neutral description of one step.

A backend declares what it supports as data; the core (not the platform) selects the backend
per layer with `validate()`. Once per step the model runner builds a `BatchLayout`; each
backend turns it into its own metadata once (`build_metadata`), shared by every layer, and
`forward` writes the step's keys/values into the paged cache and computes causal attention.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Feature names a backend may declare in `AttentionBackend.features`.
FEATURE_SLIDING_WINDOW = "sliding_window"
FEATURE_SOFT_CAP = "soft_cap"
FEATURE_SINKS = "sinks"
KNOWN_FEATURES = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, FEATURE_SINKS})


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer needs from a backend.

    dtype: the query/key/value dtype by name ("float32", "bfloat16", "float16").
    kv_cache_dtype: "auto" (same as dtype) or a narrower cache dtype a backend declares.
    scale: the softmax scale, applied once to q.k (not necessarily 1/sqrt(head_size)).
    sliding_window: None, or W >= 1: the token at position p attends to positions
        (p - W, p] only, W positions itself included. Blocks holding only positions that no
        query of the step attends may be the null block (any block id, NaN-filled contents
        included): their keys and values must never reach the result.
    logits_soft_cap: None, or c > 0: the scaled logits s = scale * q.k become c * tanh(s / c)
        before the causal (and window) mask and the softmax.
    sinks: the layer has attention sinks (gpt-oss): a learned logit z_h per query head joins
        every softmax denominator of head h without a value, so the attention weights are
        exp(s_j) / (exp(z_h) + sum_k exp(s_k)) and sum to less than one. z_h is in the units of
        the scaled (and soft-capped) logits; the values come with each `forward` call.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    dtype: str
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.head_size <= 0:
            raise ValueError(f"AttentionSpec needs positive head counts and head size: {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def cache_dtype(self) -> str:
        """The dtype name the KV cache is stored in."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def features(self) -> frozenset[str]:
        """The features this layer needs."""
        needed = set()
        if self.sliding_window is not None:
            needed.add(FEATURE_SLIDING_WINDOW)
        if self.logits_soft_cap is not None:
            needed.add(FEATURE_SOFT_CAP)
        if self.sinks:
            needed.add(FEATURE_SINKS)
        return frozenset(needed)


@dataclasses.dataclass
class LayoutTensors:
    """`BatchLayout`'s arrays as tensors on the model's device (same meaning, same shapes).

    These may be views into persistent buffers that the runner reuses every step (and that a
    captured graph reads), so a backend must not keep references across steps.
    """

    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    context_lens: torch.Tensor  # int32 [num_reqs]
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    num_prompt_tokens: torch.Tensor | None = None  # int32 [num_reqs], as in BatchLayout


@dataclasses.dataclass
class BatchLayout:
    """One step's batch, described without reference to any backend.

    The step's new tokens of all requests are packed along one token axis; request i owns
    tokens `query_start_loc[i]:query_start_loc[i+1]`. For request i, `context_lens[i]` tokens
    are already in the KV cache and `seq_lens[i] = context_lens[i] + query_len_i`. Token j of
    request i sits at position `context_lens[i] + j` and attends causally to positions
    `0 .. context_lens[i] + j`. Its key/value goes to flat cache slot `slot_mapping[t]`
    (`block_id * block_size + offset`); a slot < 0 marks a padding token that must not be
    written. `block_tables[i, k]` is the block holding positions `k*block_size ..`; entries
    past a request's last block are unspecified.

    Host arrays (numpy) come first so a non-torch worker can consume the layout; `tensors`
    holds the same data on the device when the worker is torch-based.

    `num_prompt_tokens[i]` (optional) is request i's prompt length; models whose math depends
    on it (long-rope picks its factors per request from it) read it; None where unknown
    (e.g. a captured decode graph), and attention backends never need it.
    """

    num_reqs: int
    num_tokens: int
    num_prefill_reqs: int  # requests with more than one new token
    max_query_len: int
    max_seq_len: int
    query_start_loc: np.ndarray  # int32 [num_reqs + 1]
    seq_lens: np.ndarray  # int32 [num_reqs]
    context_lens: np.ndarray  # int32 [num_reqs]
    block_tables: np.ndarray  # int32 [num_reqs, max_blocks_per_req]
    slot_mapping: np.ndarray  # int64 [num_tokens]
    block_size: int
    tensors: LayoutTensors | None = None
    num_prompt_tokens: np.ndarray | None = None  # int32 [num_reqs]

    @property
    def num_decode_reqs(self) -> int:
        """Requests with exactly one new token."""
        return self.num_reqs - self.num_prefill_reqs


class AttentionBackend(ABC):
    """A paged-attention implementation.

    Declare support as class data; the default `validate()` checks a spec against it, and a
    subclass may add reasons of its own (call `super().validate(spec)` first). Required:
    `forward`. One instance is made per layer with that layer's spec.

    The KV cache of one layer is one tensor whose shape `kv_cache_shape()` decides; the default
    is `[2, num_blocks, block_size, num_kv_heads, head_size]` (index 0 keys, 1 values).

    `name` (the id users pass to `--attention-backend`) is required: a subclass that implements
    `forward` without a non-empty string `name` fails when the class is defined.
    """

    name: ClassVar[str]
    #: Query/key/value dtypes by name.
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32"})
    #: Supported head sizes; None means any.
    head_sizes: ClassVar[frozenset[int] | None] = None
    #: Supported block sizes as exact values; None means any multiple of `block_size_multiple`.
    block_sizes: ClassVar[frozenset[int] | None] = None
    block_size_multiple: ClassVar[int] = 1
    #: KV-cache dtypes beyond the model dtype ("auto" is always understood).
    kv_cache_dtypes: ClassVar[frozenset[str]] = frozenset({"auto"})
    #: Optional features, from `KNOWN_FEATURES`.
    features: ClassVar[frozenset[str]] = frozenset()
    #: `forward` only launches device work and reads no device value back to the host (no
    #: `.item()`, no host copy), so a step graph may capture it (`Platform.step_graphs`).
    graph_safe: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls.forward, "__isabstractmethod__", False):
            return  # an intermediate abstract base; its concrete subclasses are checked
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise TypeError(
                f"AttentionBackend subclass {cls.__qualname__} must set the class attribute `name` "
                f"(a non-empty str, the id --attention-backend selects), got {name!r}"
            )

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @classmethod
    def validate(cls, spec: AttentionSpec) -> list[str]:
        """Reasons this backend cannot serve a layer with `spec`; empty means it can."""
        reasons: list[str] = []
        if spec.dtype not in cls.dtypes:
            reasons.append(f"dtype {spec.dtype} not in {sorted(cls.dtypes)}")
        if cls.head_sizes is not None and spec.head_size not in cls.head_sizes:
            reasons.append(f"head size {spec.head_size} not in {sorted(cls.head_sizes)}")
        if cls.block_sizes is not None:
            if spec.block_size not in cls.block_sizes:
                reasons.append(f"block size {spec.block_size} not in {sorted(cls.block_sizes)}")
        elif spec.block_size % cls.block_size_multiple:
            reasons.append(f"block size {spec.block_size} is not a multiple of {cls.block_size_multiple}")
        if spec.kv_cache_dtype != "auto" and spec.kv_cache_dtype not in cls.kv_cache_dtypes:
            reasons.append(f"KV-cache dtype {spec.kv_cache_dtype} not in {sorted(cls.kv_cache_dtypes)}")
        missing = spec.features - cls.features
        if missing:
            reasons.append(f"features {sorted(missing)} not supported")
        return reasons

    @classmethod
    def kv_cache_shape(
        cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV-cache tensor."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def build_metadata(cls, layout: BatchLayout) -> Any:
        """Turn the step's layout into this backend's metadata, once per step for all layers.

        Default: the layout itself.
        """
        return layout

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Write this step's keys/values into the cache, then attend; return `out`.

        query [num_tokens, num_heads, head_size]; key/value [num_tokens, num_kv_heads,
        head_size]; out [num_tokens, num_heads, head_size], written in place. query, key and
        value may be views into one fused qkv projection's output: their token dim strided, the
        head and head_size dims contiguous (the conformance kit hands them over that way). Query head h
        reads KV head `h // (num_heads // num_kv_heads)`. The softmax scale is `spec.scale`;
        `spec.sliding_window` and `spec.logits_soft_cap` mean what `AttentionSpec` says.

        Sinks: a backend that declares `FEATURE_SINKS` takes a keyword argument
        `sinks: torch.Tensor | None = None`, float32 [num_heads] on the query's device, the sink
        logits of `AttentionSpec.sinks`; it is passed (and only then) for layers whose spec has
        `sinks=True`. Backends that do not declare the feature never receive it.

        Padding rows: tokens t >= `query_start_loc[-1]` belong to no request (their slot is
        -1). Their keys/values are not written, and their rows of `out` must be zeroed, so
        that no stale or NaN value from an earlier step flows into later layers (the
        reference kernel and the conformance kit hold backends to this).
        """
