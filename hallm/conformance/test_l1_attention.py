"""L1 kernels: every attention backend against hallm.ops.reference, over what it declares.

The matrix runs every declared dtype x head size x block size x KV-cache dtype on the named
batch shapes (large block and head sizes too when a backend accepts any, and an 8k decode);
the other tests each isolate one property (the KV write, non-contiguous inputs, the optional
features, out-of-window null blocks, precision over long sums) and what validate() must refuse.
Every test also holds the padding rows of `out` to zero.
"""

from __future__ import annotations

import pytest

from hallm.conformance.cases import (
    SHAPES_BY_NAME,
    preferred_block_size,
    preferred_head_size,
    unsupported_specs,
)
from hallm.conformance.kernels import AttentionCase, check_case, run_case
from hallm.conformance.precision import check_precision
from hallm.conformance.target import Target

pytestmark = [pytest.mark.hallm_level(1)]


@pytest.mark.hallm_group("L1 paged attention")
@pytest.mark.hallm_params("attention_matrix")
def test_paged_attention(
    target: Target, backend: str, dtype: str, head_size: int, block_size: int, kv_cache_dtype: str, shape: str
) -> None:
    """Output, cache contents and untouched slots match the reference on one named shape."""
    case = AttentionCase(
        target.backend(backend), dtype, head_size, block_size, SHAPES_BY_NAME[shape], kv_cache_dtype
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 validate() rejects")
@pytest.mark.hallm_params("rejects")
def test_validate_rejects_undeclared(
    target: Target, backend: str, dtype: str | None, undeclared: str
) -> None:
    """validate() refuses, with a reason, each configuration the backend does not declare."""
    from hallm.platforms import AttentionSpec

    cls = target.backend(backend)
    (what, overrides) = next((w, o) for cid, w, o in unsupported_specs(cls) if cid == undeclared)
    base = {
        "num_heads": 8,
        "num_kv_heads": 2,
        "head_size": preferred_head_size(cls),
        "scale": 0.125,
        "dtype": sorted(cls.dtypes)[0],
        "block_size": preferred_block_size(cls),
    }
    spec = AttentionSpec(**{**base, **overrides})
    reasons = cls.validate(spec)
    if not reasons or not all(isinstance(r, str) and r.strip() for r in reasons):
        pytest.fail(
            f"{backend} does not declare {what}, but validate() returned {reasons!r} for it: it must return "
            "the reasons it cannot serve the layer (the core would otherwise select it)",
            pytrace=False,
        )


@pytest.mark.hallm_group("L1 KV write + read back")
@pytest.mark.hallm_params("backend_dtype")
def test_kv_write_then_read_back(target: Target, backend: str, dtype: str) -> None:
    """The backend writes the context itself (a prefill), then reads it back (decode + chunks)."""
    cls = target.backend(backend)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        preferred_block_size(cls),
        SHAPES_BY_NAME["mixed"],
        prime_through_backend=True,
        seed=5,
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 non-contiguous inputs")
@pytest.mark.hallm_params("backend_dtype")
def test_noncontiguous_inputs(target: Target, backend: str, dtype: str) -> None:
    """q, k and v as slices of one fused QKV buffer (strided rows), as models hand them over."""
    cls = target.backend(backend)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        preferred_block_size(cls),
        SHAPES_BY_NAME["mixed"],
        noncontiguous=True,
        seed=6,
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 sliding window / soft cap / sinks")
@pytest.mark.hallm_params("features")
def test_features(target: Target, backend: str, dtype: str, feature: str) -> None:
    """The optional features a backend declares, against the reference's definitions (sinks:
    per-head sink logits from strongly negative to dominating, see `AttentionCase.sink_logits`)."""
    cls = target.backend(backend)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        preferred_block_size(cls),
        SHAPES_BY_NAME["chunked_prefill"],
        sliding_window=8 if feature in ("sliding_window", "both", "sinks_window") else None,
        logits_soft_cap=2.0 if feature in ("soft_cap", "both") else None,
        sinks=feature in ("sinks", "sinks_window"),
        seed=7,
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 sliding window / soft cap / sinks")
@pytest.mark.hallm_params("window")
def test_sliding_window_null_blocks(target: Target, backend: str, dtype: str) -> None:
    """Blocks wholly outside every query's window point at the NaN-filled null block; none may leak."""
    cls = target.backend(backend)
    block = preferred_block_size(cls)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        block,
        SHAPES_BY_NAME["window_null_blocks"],
        sliding_window=max(8, block // 2),
        null_out_of_window=True,
        seed=10,
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 precision over long sums")
@pytest.mark.hallm_params("backend_dtype")
def test_long_sum_precision(target: Target, backend: str, dtype: str) -> None:
    """Near-uniform attention over 512, 2048 and 8192 keys stays within about one ulp at 1.0."""
    cls = target.backend(backend)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        preferred_block_size(cls),
        SHAPES_BY_NAME["long_uniform"],
        near_uniform=True,
        seed=11,
    )
    ran = run_case(target, case)
    check_precision(case, ran)  # first: the ordinary tolerance cannot tell precision loss apart
    check_case(case, ran)
