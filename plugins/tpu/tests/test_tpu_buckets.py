"""Bucket choice: every step fits the smallest compiled (tokens, requests) program."""

from __future__ import annotations

import pytest
from hallm_tpu.buckets import Buckets


def test_buckets_cover_every_step() -> None:
    b = Buckets.for_limits(max_tokens=40, max_reqs=20)
    assert b.token == (8, 16, 32, 40) and b.request == (1, 4, 16, 20)
    assert b.pick(1, 1) == (8, 1)
    assert b.pick(9, 2) == (16, 4)
    assert b.pick(33, 17) == (40, 20)
    assert b.pick(8, 8) == (8, 8)  # a request bucket never exceeds its token bucket
    shapes = b.shapes()
    for t in range(1, 41):
        for r in range(1, min(t, 20) + 1):
            assert b.pick(t, r) in shapes
    with pytest.raises(ValueError, match="compiled buckets"):
        b.pick(41, 1)


def test_small_limits() -> None:
    b = Buckets.for_limits(max_tokens=4, max_reqs=256)
    assert b.token == (4,) and b.request == (1, 4)
    assert b.shapes() == [(4, 1), (4, 4)]
