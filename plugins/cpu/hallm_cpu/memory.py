"""Host memory for weights that every decode step streams.

A one-row decode step reads every weight once, at copy bandwidth; with 4 KiB pages a 270 MB
model spans ~66k pages, far more than the TLB holds, so the stream also pays a page walk every
4 KiB. `empty_weight` allocates like `torch.empty` and asks Linux for transparent huge pages
(2 MiB) over the buffer before any page is touched: under THP's default "madvise" mode only
advised memory gets them. Elsewhere (another OS, THP "never") it is plain `torch.empty`.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

import torch

#: Linux's MADV_HUGEPAGE (asm-generic/mman-common.h).
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


@functools.cache
def _madvise() -> Any:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> int:
    """Advise the 2 MiB-aligned pages inside `t`'s storage as huge pages; returns the bytes
    advised (0 when the buffer is smaller than a huge page, or the OS cannot)."""
    madvise = _madvise()
    start = t.data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if madvise is None or hi <= lo:
        return 0
    return hi - lo if madvise(lo, hi - lo, MADV_HUGEPAGE) == 0 else 0


def empty_weight(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(shape, dtype)` for a weight streamed every step (see the module doc)."""
    t = torch.empty(shape, dtype=dtype)
    advise_huge_pages(t)
    return t
