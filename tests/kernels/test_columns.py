"""The column layout (activation sparsity): packing round-trips, every kernel path equals the reference with the
small inputs zeroed, skipped inputs are really skipped, bad input is refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.kernels import dispatch
from sparseforge.kernels.columns import WORD, column_dense, zero_small

PATHS = (*kernels.NATIVE_ISAS, "torch")


def usable_or_skip(isa: str) -> None:
    if isa != "torch" and isa not in dispatch._usable():
        pytest.skip(f"{isa} is not usable on this machine ({kernels.isa_info()})")


def reference(x, packed, threshold, bias):
    y = zero_small(x.double(), threshold) @ column_dense(packed).double().t()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("masked", (False, True), ids=("dense", "bitmask"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("isa", PATHS)
def test_every_path_equals_the_reference_with_small_inputs_zeroed(isa, dtype, masked):
    usable_or_skip(isa)
    gen = torch.Generator().manual_seed(0)
    for out, in_features in ((130, 70), (64, 64), (5, 300), (200, 33)):  # tails of 2, none, 59, 8 outputs
        weight = torch.randn(out, in_features, generator=gen)
        mask = torch.rand(out, in_features, generator=gen) > 0.5
        packed = kernels.pack_columns(weight, mask if masked else None, dtype)
        bias = torch.randn(out, generator=gen)
        for rows in (1, 3, 70):  # 70: prefill-sized, decoded once into torch's GEMM
            x = torch.randn(rows, in_features, generator=gen)
            for threshold in (0.0, 0.3, 1.0, 100.0):
                y = kernels.column_matmul(x, packed, threshold, bias, isa=isa)
                assert y.shape == (rows, out) and y.dtype == torch.float32
                torch.testing.assert_close(y.double(), reference(x, packed, threshold, bias), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 150), in_features=st.integers(1, 120), sparsity=st.sampled_from((0.0, 0.5, 0.9, 1.0)),
       threshold=st.floats(0, 2), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_column_layout_round_trips_and_multiplies_any_shape(out, in_features, sparsity, threshold, bf16, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float16
    weight = torch.randn(out, in_features, generator=gen)
    mask = torch.rand(out, in_features, generator=gen) >= sparsity
    packed = kernels.pack_columns(weight, mask, dtype)
    assert torch.equal(column_dense(packed), (weight * mask).to(dtype).float())
    assert int(packed.bases[-1]) == int(mask.sum())
    x = torch.randn(2, in_features, generator=gen)
    torch.testing.assert_close(kernels.column_matmul(x, packed, threshold).double(),
                               reference(x, packed, threshold, None), rtol=1e-5, atol=1e-4)


def test_threshold_zero_equals_the_row_kernels():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 80, generator=gen)
    x = torch.randn(1, 80, generator=gen)
    rows = kernels.matmul(x, kernels.pack_dense(weight))
    torch.testing.assert_close(kernels.column_matmul(x, kernels.pack_columns(weight)), rows, rtol=1e-5, atol=1e-5)


def test_zeroed_inputs_weights_are_not_read():
    """Poison the weights of the inputs that the threshold removes: the result must not see them."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(WORD * 2, 40, generator=gen)
    x = torch.randn(1, 40, generator=gen)
    small = x[0].abs() < 0.5
    poisoned = weight.clone()
    poisoned[:, small] = float("nan")
    for masked in (False, True):
        y = kernels.column_matmul(x, kernels.pack_columns(poisoned, masked=masked), 0.5)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, zero_small(x, 0.5) @ weight.half().float().t(), rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused():
    packed = kernels.pack_columns(torch.randn(8, 16))
    with pytest.raises(kernels.KernelInputError, match="16"):
        kernels.column_matmul(torch.randn(1, 15), packed)
    with pytest.raises(kernels.KernelInputError, match="at least 0"):
        kernels.column_matmul(torch.randn(1, 16), packed, -1.0)
    with pytest.raises(kernels.KernelInputError, match="differs"):
        kernels.pack_columns(torch.randn(8, 16), torch.ones(8, 15, dtype=torch.bool))
