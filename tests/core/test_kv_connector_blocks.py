"""The connectors' block copies between a host pool and a device cache: `load_blocks` and
`store_blocks` against plain indexing, with runs of consecutive blocks, single blocks, and ids
out of order on either side."""

from __future__ import annotations

import pytest
import torch

from hallm.core.kv_connectors.blocks import load_blocks, store_blocks

CASES = [
    ([0, 1, 2, 3], [7, 8, 9, 10]),  # one run each side
    ([5, 6, 7, 1], [0, 2, 4, 6]),  # scattered destination, two source runs
    ([9, 3, 4, 0, 1, 2], [1, 2, 3, 11, 12, 5]),
    ([4], [0]),
]


@pytest.mark.parametrize(("src_ids", "dst_ids"), CASES)
def test_load_blocks_equals_indexing(src_ids: list[int], dst_ids: list[int]) -> None:
    torch.manual_seed(0)
    pool = torch.randn(2, 12, 4, 2, 8)
    cache = torch.randn(2, 16, 4, 2, 8)
    want = cache.clone()
    want[:, dst_ids] = pool[:, src_ids]
    load_blocks(pool, src_ids, cache, torch.tensor(dst_ids))
    assert torch.equal(cache, want)


@pytest.mark.parametrize(("dst_ids", "src_ids"), CASES)
def test_store_blocks_equals_indexing(src_ids: list[int], dst_ids: list[int]) -> None:
    torch.manual_seed(1)
    cache = torch.randn(2, 16, 4, 2, 8)
    pool = torch.randn(2, 12, 4, 2, 8)
    want = pool.clone()
    want[:, dst_ids] = cache[:, src_ids]
    store_blocks(cache, torch.tensor(src_ids), pool, dst_ids)
    assert torch.equal(pool, want)
