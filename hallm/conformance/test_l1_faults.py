"""L1 fault isolation: one property per test, so a failure names its cause.

The softmax scale (an unusual `AttentionSpec.scale`, so a hard-coded 1/sqrt(head_size) shows),
the GQA head mapping (MHA, GQA and MQA), and the block-table walk (a histogram of the blocks
each request reads, then of the in-block offsets, independent of scale and head mapping) at
every block size the matrix tests.
"""

from __future__ import annotations

import pytest

from hallm.conformance.blockwalk import run_block_walk, run_offset_walk
from hallm.conformance.cases import SHAPES_BY_NAME, preferred_block_size, preferred_head_size
from hallm.conformance.kernels import AttentionCase, check_case, run_case
from hallm.conformance.target import Target

pytestmark = [pytest.mark.hallm_level(1)]

#: Far from 1/sqrt(head_size) for every usual head size, and from 1/head_size.
ODD_SCALE = 0.3


@pytest.mark.hallm_group("L1 softmax scale")
@pytest.mark.hallm_params("backend_dtype")
def test_softmax_scale(target: Target, backend: str, dtype: str) -> None:
    """The kernel uses AttentionSpec.scale (here 0.3), whatever the head size."""
    cls = target.backend(backend)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        preferred_block_size(cls),
        SHAPES_BY_NAME["mixed"],
        scale=ODD_SCALE,
        seed=8,
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 GQA head mapping")
@pytest.mark.hallm_params("gqa")
def test_gqa_head_mapping(target: Target, backend: str, dtype: str, num_kv_heads: int) -> None:
    """8 query heads over 8, 2 and 1 KV heads: query head h reads KV head h // (8 // num_kv_heads)."""
    cls = target.backend(backend)
    case = AttentionCase(
        cls,
        dtype,
        preferred_head_size(cls),
        preferred_block_size(cls),
        SHAPES_BY_NAME["mixed"],
        num_heads=8,
        num_kv_heads=num_kv_heads,
        seed=9,
    )
    check_case(case, run_case(target, case))


@pytest.mark.hallm_group("L1 block-table walk")
@pytest.mark.hallm_params("walk")
def test_block_table_walk(target: Target, backend: str, dtype: str, block_size: int) -> None:
    """Each request reads exactly the blocks of its table, and each position at its in-block offset."""
    cls = target.backend(backend)
    head = preferred_head_size(cls)
    run_block_walk(target, cls, dtype, head, block_size)
    if cls.head_sizes is None:
        head = max(head, block_size)  # the offset walk one-hot encodes offsets in head_size dims
    if head >= block_size:  # else no declared head size can one-hot encode the offsets
        run_offset_walk(target, cls, dtype, head, block_size)
