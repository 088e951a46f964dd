"""What the kernel tests run over: named batch shapes, default sizes, tolerances, parameters.

Every parameter combination carries the requirement tokens that decide whether it applies to
the backend (see `hallm.conformance.target`), so a dtype the backend does not declare shows up
in the report as "not applicable" rather than vanishing. Standard library only (and pytest).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import pytest

from hallm.platforms.platform import DTYPE_NAMES


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """One step: request i has context_lens[i] cached tokens and query_lens[i] new ones."""

    name: str
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    padding: int = 0  # tokens with slot -1 at the end of the step, owned by no request


#: The named shapes of every L1 attention test (vLLM's BatchSpecs, adapted).
SHAPES: tuple[BatchShape, ...] = (
    BatchShape("pure_decode", (1, 1, 1, 1, 1, 1), (5, 17, 32, 1, 63, 100)),
    BatchShape("pure_prefill", (13, 31, 7, 16), (0, 0, 0, 0)),
    BatchShape("mixed", (11, 1, 10, 1, 3), (0, 19, 13, 4, 26), padding=3),
    BatchShape("chunked_prefill", (16, 20, 33), (32, 45, 17)),
    BatchShape("one_token", (1,), (0,)),
    BatchShape("long_context", (1, 64), (2047, 1500)),
    # Past 4096 keys: a kernel that stops at a power-of-two bound or tiles a fixed maximum.
    BatchShape("decode_8k", (1,), (8191,)),
)
#: Shapes the large head and block sizes run (the usual sizes run every shape).
LARGE_SIZE_SHAPES = ("mixed", "long_context")
#: Shapes that run at the preferred sizes only (length, not size, is what they test).
PREFERRED_SIZE_SHAPES = ("decode_8k",)
#: Shapes of the other tests, outside the matrix.
EXTRA_SHAPES: tuple[BatchShape, ...] = (
    # Sliding window over long contexts: blocks wholly outside every window become the null block.
    BatchShape("window_null_blocks", (1, 7, 1, 20), (95, 64, 200, 0)),
    # Long decodes at three lengths: precision lost in accumulation grows with the length.
    BatchShape("long_uniform", (1, 1, 1), (511, 2047, 8191)),
)
SHAPES_BY_NAME = {s.name: s for s in (*SHAPES, *EXTRA_SHAPES)}

#: Head sizes tried when a backend accepts any (None); block sizes when it accepts any multiple.
#: Every (head, block) pair of the first two tuples runs every shape; the large sizes run each
#: with the preferred other size, so large offsets and wide heads are tested without the product.
DEFAULT_HEAD_SIZES = (64, 80, 128)
DEFAULT_BLOCK_SIZES = (16, 32)
LARGE_HEAD_SIZES = (96, 256)
LARGE_BLOCK_SIZES = (64, 128)
#: Query and KV heads of the matrix tests: grouped-query attention, 4 query heads per KV head.
NUM_HEADS, NUM_KV_HEADS = 8, 2

#: (atol, rtol) per dtype, against float64 dense attention over exactly the kernel's inputs.
#: float32 leaves room for TF32 tensor-core accumulation; the bugs the kit hunts are >= 1e-1.
TOLERANCE = {"float32": (1e-3, 1e-3), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 2e-2)}
#: Extra slack for a narrower KV-cache dtype (fp8): the expected answer already uses the
#: rounded keys/values, so only the compute differs.
KV_TOLERANCE_FACTOR = 2.0

#: KV-cache dtype names the kit can build caches for (besides "auto": the model dtype).
KV_CACHE_TORCH_DTYPES = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def tolerance(dtype: str, kv_cache_dtype: str = "auto") -> tuple[float, float]:
    """(atol, rtol) for outputs in `dtype` (any unknown dtype gets the loosest)."""
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    if kv_cache_dtype not in ("auto", dtype):
        atol, rtol = atol * KV_TOLERANCE_FACTOR, rtol * KV_TOLERANCE_FACTOR
    return atol, rtol


def head_sizes(backend: Any) -> list[int]:
    """Head sizes to test: the declared ones, else the defaults."""
    return sorted(backend.head_sizes) if backend.head_sizes is not None else list(DEFAULT_HEAD_SIZES)


def block_sizes(backend: Any) -> list[int]:
    """Block sizes to test: the declared ones, else defaults that are multiples of the required one."""
    if backend.block_sizes is not None:
        return sorted(backend.block_sizes)
    m = max(1, int(backend.block_size_multiple))
    fitting = [b for b in DEFAULT_BLOCK_SIZES if b % m == 0]
    return fitting or [m, 2 * m]


def large_head_sizes(backend: Any) -> list[int]:
    """Extra head sizes for a backend that accepts any: wide heads a default set misses."""
    return [] if backend.head_sizes is not None else list(LARGE_HEAD_SIZES)


def large_block_sizes(backend: Any) -> list[int]:
    """Extra block sizes for a backend that accepts any multiple: offsets past 6 bits."""
    if backend.block_sizes is not None:
        return []
    m = max(1, int(backend.block_size_multiple))
    return [b for b in LARGE_BLOCK_SIZES if b % m == 0 and b not in block_sizes(backend)]


def size_pairs(backend: Any) -> list[tuple[int, int]]:
    """(head size, block size) pairs of the matrix: the product of the usual sizes, then each
    large size with the preferred other one."""
    return usual_pairs(backend) + large_pairs(backend)


def usual_pairs(backend: Any) -> list[tuple[int, int]]:
    """The product of the declared (or default) head and block sizes."""
    return list(itertools.product(head_sizes(backend), block_sizes(backend)))


def large_pairs(backend: Any) -> list[tuple[int, int]]:
    """Each large head or block size (see `large_head_sizes`) with the preferred other one."""
    head, block = preferred_head_size(backend), preferred_block_size(backend)
    return [(head, b) for b in large_block_sizes(backend)] + [(h, block) for h in large_head_sizes(backend)]


def matrix_combinations(backend: Any) -> list[tuple[BatchShape, tuple[int, int]]]:
    """(shape, (head size, block size)) of the full matrix of one backend."""
    preferred = (preferred_head_size(backend), preferred_block_size(backend))
    combos = []
    for shape in SHAPES:
        if shape.name in PREFERRED_SIZE_SHAPES:
            pairs = [preferred]
        else:
            pairs = usual_pairs(backend) + (large_pairs(backend) if shape.name in LARGE_SIZE_SHAPES else [])
        combos += [(shape, pair) for pair in pairs]
    return combos


def preferred_head_size(backend: Any) -> int:
    """One head size for the single-configuration tests: 64 if allowed, else the smallest."""
    sizes = head_sizes(backend)
    return 64 if 64 in sizes else sizes[0]


def preferred_block_size(backend: Any) -> int:
    """One block size for the single-configuration tests: 16 if allowed, else the smallest."""
    sizes = block_sizes(backend)
    return 16 if 16 in sizes else sizes[0]


def kv_cache_dtypes(backend: Any) -> list[str]:
    """ "auto" first, then every other KV-cache dtype the backend declares."""
    return ["auto", *sorted(set(backend.kv_cache_dtypes) - {"auto"})]


def dtype_marks(backend_name: str, dtype: str, kv: str = "auto") -> list[Any]:
    """The requirement marks of one (backend, dtype, KV dtype) combination on the device."""
    tokens = ["available", f"backend:{backend_name}:dtype:{dtype}"]
    if kv != "auto":
        tokens += [f"kv_cache_dtype:{kv}", f"backend:{backend_name}:kv_cache_dtype:{kv}"]
    return [pytest.mark.hallm_requires(*tokens)]


def attention_matrix(backends: Sequence[Any], quick: bool) -> list[Any]:
    """Parameters (backend, dtype, head_size, block_size, kv_cache_dtype, shape) of the matrix.

    Full: `matrix_combinations` x KV dtype, for every dtype name (undeclared dtypes become
    not-applicable). Quick: per (backend, dtype, KV dtype), every shape and every size pair at
    least once (shape k with pair k + rotation), the rotation moving on between dtypes so that
    they see different combinations.
    """
    params = []
    for backend in backends:
        sizes = size_pairs(backend)
        rotation = 0
        for dtype in DTYPE_NAMES:
            for kv in kv_cache_dtypes(backend):
                marks = dtype_marks(backend.name, dtype, kv)
                if quick:
                    count = max(len(SHAPES), len(sizes))
                    combos = [
                        (SHAPES[k % len(SHAPES)], sizes[(k + rotation) % len(sizes)]) for k in range(count)
                    ]
                    rotation += 1
                else:
                    combos = matrix_combinations(backend)
                for shape, (head, block) in combos:
                    params.append(
                        pytest.param(
                            backend.name,
                            dtype,
                            head,
                            block,
                            kv,
                            shape.name,
                            marks=marks,
                            id=f"{backend.name}-{dtype}-h{head}-b{block}-kv{kv}-{shape.name}",
                        )
                    )
    return params


def per_dtype(backends: Sequence[Any]) -> list[Any]:
    """Parameters (backend, dtype) for every backend and dtype name, with requirement marks."""
    return [
        pytest.param(b.name, dtype, marks=dtype_marks(b.name, dtype), id=f"{b.name}-{dtype}")
        for b in backends
        for dtype in DTYPE_NAMES
    ]


def unsupported_specs(backend: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, what is undeclared, AttentionSpec overrides) a backend's validate() must refuse.

    A dimension the backend accepts in full (any head size, say) has nothing to refuse; a
    KV-cache dtype no backend could declare is always refused.
    """
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for dtype in DTYPE_NAMES:
        if dtype not in backend.dtypes:
            cases.append((f"dtype-{dtype}", f"dtype {dtype}", {"dtype": dtype}))
    if backend.head_sizes is not None:
        bad = next(h for h in (24, 72, 200, 1000, 7) if h not in backend.head_sizes)
        cases.append((f"head_size-{bad}", f"head size {bad}", {"head_size": bad}))
    if backend.block_sizes is not None:
        bad = next(b for b in (1, 3, 48, 100, 1000) if b not in backend.block_sizes)
        cases.append((f"block_size-{bad}", f"block size {bad}", {"block_size": bad}))
    elif backend.block_size_multiple > 1:
        bad = backend.block_size_multiple + 1
        cases.append((f"block_size-{bad}", f"block size {bad}", {"block_size": bad}))
    cases.append(
        ("kv_cache_dtype-bogus", "KV-cache dtype no_such_kv_dtype", {"kv_cache_dtype": "no_such_kv_dtype"})
    )
    for feature, overrides in (
        ("sliding_window", {"sliding_window": 8}),
        ("soft_cap", {"logits_soft_cap": 30.0}),
        ("sinks", {"sinks": True}),
    ):
        if feature not in backend.features:
            cases.append((f"feature-{feature}", f"feature {feature}", overrides))
    return cases
