"""Packed weights copied onto huge pages keep their values, and small ones stay where they are."""

import sys

import torch

from sparseforge.kernels import matmul, pack_bitmask, pack_dense
from sparseforge.kernels.pages import HUGE_PAGE, huge_page_copy, on_huge_pages


def test_large_tensor_copy_is_equal_and_aligned_to_a_huge_page():
    tensor = torch.randn(1024, 1536).half()  # 3 MiB
    copy = huge_page_copy(tensor)
    assert torch.equal(copy, tensor) and copy.dtype == tensor.dtype and copy.is_contiguous()
    if sys.platform == "linux":
        assert copy.data_ptr() % HUGE_PAGE == 0 and copy.data_ptr() != tensor.data_ptr()


def test_small_tensor_is_returned_unchanged():
    tensor = torch.randn(16, 16).half()
    assert huge_page_copy(tensor) is tensor


def test_layout_on_huge_pages_multiplies_as_before():
    weight = torch.randn(1024, 1536)
    packed = pack_dense(weight)
    moved = on_huge_pages(packed)
    x = torch.randn(1, 1536)
    assert torch.equal(matmul(x, moved), matmul(x, packed))


def test_bitmask_layout_moves_values_and_masks_and_multiplies_as_before():
    weight = torch.randn(4096, 4096)  # masks 2 MiB, values (50% kept, fp16) 16 MiB: both a huge page or more
    packed = pack_bitmask(weight, torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) >= 0.5)
    moved = on_huge_pages(packed)
    for field in ("values", "masks"):
        assert torch.equal(getattr(moved, field), getattr(packed, field))
        if sys.platform == "linux":
            assert getattr(moved, field).data_ptr() % HUGE_PAGE == 0
    assert moved.offsets is packed.offsets  # 32 KiB: under a huge page, left where it was
    x = torch.randn(2, 4096)
    assert torch.equal(matmul(x, moved), matmul(x, packed))
