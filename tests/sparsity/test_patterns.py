import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import PatternError
from sparseforge.sparsity.masks import is_valid_nm, sparsity_of
from sparseforge.sparsity.patterns import NM, Unstructured, parse_pattern, resolve_sparsity

shapes = st.tuples(st.integers(1, 24), st.integers(1, 12).map(lambda k: k * 8))


def _scores(shape, seed, grid):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=generator)
    # grid=True mimics de-quantised weights with many exact ties
    return (scores * 4).round() if grid else scores


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0, 0.99), seed=st.integers(0, 1000), grid=st.booleans())
def test_unstructured_hits_the_exact_target(shape, sparsity, seed, grid):
    mask = Unstructured().mask(_scores(shape, seed, grid), sparsity)
    assert int((~mask).sum()) == round(sparsity * mask.numel())


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0, 0.99), seed=st.integers(0, 1000), grid=st.booleans())
def test_per_row_hits_the_target_in_every_row(shape, sparsity, seed, grid):
    mask = Unstructured(per_row=True).mask(_scores(shape, seed, grid), sparsity)
    assert ((~mask).sum(dim=1) == round(sparsity * shape[1])).all()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 4), (1, 8)]), seed=st.integers(0, 1000),
       grid=st.booleans())
def test_nm_masks_are_valid_and_exact(shape, nm, seed, grid):
    n, m = nm
    mask = NM(n, m).mask(_scores(shape, seed, grid))
    assert is_valid_nm(mask, n, m)
    groups = mask.reshape(shape[0], -1, m).sum(-1)
    assert (groups == n).all()
    assert sparsity_of(mask) == pytest.approx(1 - n / m)


def test_magnitude_keeps_the_largest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert NM(2, 4).mask(scores).tolist() == [[False, True, True, False]]
    assert Unstructured().mask(scores, 0.25).tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "two:four", "dense"])
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(PatternError):
        parse_pattern(bad)


def test_nm_must_divide_the_input_width():
    with pytest.raises(PatternError, match="does not divide"):
        NM(2, 8).validate((4, 12), "layer")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(PatternError, match=r"\[0, 1\)"):
        Unstructured().mask(torch.rand(2, 8), sparsity)


def test_nm_fixes_the_sparsity():
    assert resolve_sparsity(NM(2, 4), None) == 0.5
    assert resolve_sparsity(NM(2, 4), 0.5) == 0.5
    with pytest.raises(PatternError, match="means sparsity"):
        resolve_sparsity(NM(2, 4), 0.7)
