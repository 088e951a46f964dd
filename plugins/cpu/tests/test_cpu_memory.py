"""Weights streamed every step ask for transparent huge pages where the kernel offers them.

The test checks the request (the mapping's `hg` flag, MADV_HUGEPAGE), which is what hallm
controls; whether the kernel grants a huge page at a fault depends on how fragmented memory is
at that moment, so the pages actually granted are not asserted."""

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


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping holding `address`, from the kernel's /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


@pytest.mark.skipif(
    sys.platform != "linux" or _thp_mode() in (None, "never"), reason="no transparent huge pages"
)
def test_a_streamed_weight_asks_for_huge_pages() -> None:
    w = empty_weight((8 * HUGE_PAGE // 4,), torch.float32)  # 16 MiB
    assert "hg" in _vm_flags(w.data_ptr() + 4 * HUGE_PAGE)  # asked before the first touch
    w.fill_(1.0)
    assert w.shape == (8 * HUGE_PAGE // 4,) and float(w.sum()) == w.numel()


def test_small_buffers_are_left_alone() -> None:
    assert advise_huge_pages(torch.empty(1000)) == 0
