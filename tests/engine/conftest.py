"""Engine tests run torch on one thread: their models are tiny (or small), and on a busy 2-core
machine a second OpenMP thread that is not scheduled stalls every op (measured 10-40x slower
end to end), which says nothing about the engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
