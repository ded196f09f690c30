"""Packed weights on transparent huge pages.

A column-layout product (activation sparsity) reads a few hundred scattered weight rows of 4-22 KiB each, and on
4 KiB pages nearly every row costs a TLB miss: on the TinyLlama geometry at 40% of inputs skipped, decode ran at
1.15-1.40x of runtime dense from one process to the next, and at 1.41-1.42x with PyTorch's own huge pages
(``THP_MEM_ALLOC_ENABLE=1``, which must be set before Python starts). The runtime therefore copies each large
packed tensor into memory advised ``MADV_HUGEPAGE`` before its first touch, so the kernel backs it with 2 MiB
pages where transparent huge pages are enabled (``always`` or ``madvise``). Elsewhere (THP ``never``, not Linux,
no libc) the tensor is returned as it was: the advice is an optimisation, never a requirement.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys

import torch

from ..memory import libc_function

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux's advice number


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise with its argument types declared, or None off Linux or without libc."""
    madvise = libc_function("madvise") if sys.platform == "linux" else None
    if madvise is not None:
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` copied into fresh memory advised for huge pages (same dtype, shape and values), or ``tensor``
    itself when it is smaller than one huge page or the advice is unavailable."""
    nbytes = tensor.numel() * tensor.element_size()
    madvise = _madvise()
    if nbytes < HUGE_PAGE or madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return tensor
    # not yet touched where glibc maps the allocation afresh (large sizes); pages it reuses from its heap keep
    # their 4 KiB pages until khugepaged collapses them, if ever
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    advised = (nbytes + HUGE_PAGE - start) // HUGE_PAGE * HUGE_PAGE
    if madvise(raw.data_ptr() + start, advised, MADV_HUGEPAGE) != 0:
        return tensor
    copy = raw[start:start + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy


def on_huge_pages(layout):
    """A packed layout (a dataclass of tensors) with each of its tensors of a huge page or more on huge pages: the
    values, and the masks or positions of a large matrix too (4096 x 4096 at 70%, fp16: 694 us a product with the
    values moved, 671 us with the masks as well, 780 us with neither; dense 1449 -> 1333 us)."""
    moved = {field.name: huge_page_copy(getattr(layout, field.name)) for field in dataclasses.fields(layout)
             if isinstance(getattr(layout, field.name), torch.Tensor)}
    return dataclasses.replace(layout, **moved)
