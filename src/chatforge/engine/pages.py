"""Decode copies and KV caches on 2 MB pages (Linux transparent huge pages).

A decode step streams every weight copy from memory once per token (SmolLM2-135M: 66 MB of int4
copies and a 30 MB output layer) and reads its cache rows. On the 2-core machine a sequential read
ran at 26-27 GB/s through 4 KB pages and at 35 GB/s through 2 MB ones, and the one-call step over
copies moved onto 2 MB pages took 0.3-0.6 ms less (benchmarks/README.md). Where the kernel only
gives huge pages to memory that asks for them (`madvise` mode, the common default), the copies, each
a few hundred KB, have to be gathered into one buffer that asks: `onto_huge_pages` moves them there
in place, in the order a step reads them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import sys

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux or where it cannot be found."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """nbytes of untouched CPU memory (uint8) starting on a 2 MB boundary that the kernel was asked
    to back with huge pages (it does so as the memory is first written), or None where it cannot be
    asked (not Linux, madvise refused, less than a huge page)."""
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE:
        return None
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -buf.data_ptr() % HUGE_PAGE
    if madvise(buf.data_ptr() + start, nbytes, _MADV_HUGEPAGE) != 0:
        return None
    return buf[start:start + nbytes]


def onto_huge_pages(tensors: list[torch.Tensor]) -> bool:
    """Move `tensors` (contiguous CPU tensors that nothing else views) into one huge-page buffer,
    in this order, each on a 64-byte boundary, in place (Tensor.set_): whatever holds them reads the
    moved memory, same values. False, and nothing moved, where huge_page_buffer gives no buffer."""
    if not tensors or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = list(itertools.accumulate((-(-s // 64) * 64 for s in sizes), initial=0))
    buf = huge_page_buffer(offsets[-1])
    if buf is None:
        return False
    for t, offset, size in zip(tensors, offsets, sizes):
        moved = buf[offset:offset + size].view(t.dtype).view(t.shape)
        moved.copy_(t)
        t.set_(moved)  # the old memory goes once nothing else holds it
    return True
