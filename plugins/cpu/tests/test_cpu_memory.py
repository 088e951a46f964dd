"""Weights streamed every step get transparent huge pages where the kernel offers them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hallm_cpu.memory import HUGE_PAGE, advise_huge_pages, empty_weight

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    if not THP.exists():
        return None
    text = THP.read_text()
    return text[text.index("[") + 1 : text.index("]")]


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from the kernel's /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(
    sys.platform != "linux" or _thp_mode() in (None, "never"), reason="no transparent huge pages"
)
def test_a_streamed_weight_is_backed_by_huge_pages() -> None:
    w = empty_weight((8 * HUGE_PAGE // 4,), torch.float32)  # 16 MiB
    w.fill_(1.0)  # first touch: the faults take huge pages
    assert _anon_huge_kib(w.data_ptr() + 4 * HUGE_PAGE) >= 2048
    assert w.shape == (8 * HUGE_PAGE // 4,) and float(w.sum()) == w.numel()


def test_small_buffers_are_left_alone() -> None:
    assert advise_huge_pages(torch.empty(1000)) == 0
