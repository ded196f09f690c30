"""Sparse-weight CPU kernels: every usable instruction set x layout x value type against a float64 reference,
the export-format converters, the PyTorch fallback and input errors.

Tolerance: an fp32 sum of n products accumulated in any order (FMA or not) is within gamma_n * sum|x_i w_i| of
the exact sum, gamma_n = n u / (1 - n u), u = 2**-24 (Higham, Accuracy and Stability, 3.1); the reference is
float64 from the same 16-bit weights, so that bound, with n = in + 1 for the bias, holds for every path. A wrong
or missing weight moves y by about one term, ~sum / in, far above it for the sizes used here.
"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.export.formats import ENCODINGS
from sparseforge.kernels import build, dispatch

DTYPES = (torch.float16, torch.bfloat16)
PATHS = (*kernels.NATIVE_ISAS, "torch")
SHAPES = ((37, 100), (8, 32), (19, 200), (64, 96))  # out, in: tails of 4, none, 8, none (and > 1 window)


def usable_or_skip(isa: str) -> None:
    if isa != "torch" and isa not in dispatch._usable():
        pytest.skip(f"{isa} is not usable on this machine ({kernels.isa_info()})")


def random_mask(out: int, in_features: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(out, in_features, generator=gen) >= sparsity


def nm_mask(out: int, in_features: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    lanes = torch.rand(out, in_features // m, m, generator=gen).argsort(dim=-1)
    return (lanes < n).reshape(out, in_features)


def assert_close(y: torch.Tensor, x: torch.Tensor, packed, bias: torch.Tensor | None) -> None:
    w = kernels.dequantize(packed).double()
    b = torch.zeros(packed.shape[0], dtype=torch.float64) if bias is None else bias.double()
    x2 = x.reshape(-1, packed.shape[1]).double()
    ref, scale = x2 @ w.T + b, x2.abs() @ w.abs().T + b.abs()
    n = packed.shape[1] + 1
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    err = (y.reshape(ref.shape).double() - ref).abs()
    assert bool((err <= gamma * scale).all()), f"max error {float((err - gamma * scale).max()):.3g} over the bound"


def packings(kind: str, out: int, in_features: int, dtype: torch.dtype, gen: torch.Generator):
    """(label, packed) for every sparsity the test covers for this layout kind."""
    weight = torch.randn(out, in_features, generator=gen)
    if kind == "dense":
        yield "dense", kernels.pack_dense(weight, dtype)
    elif kind == "bitmask":
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            yield f"{sparsity:.0%}", kernels.pack_bitmask(weight, random_mask(out, in_features, sparsity, gen), dtype)
    else:
        for n, m in ((2, 4), (1, 4), (4, 4), (3, 8), (7, 8), (2, 16), (15, 16)):
            if in_features % m == 0:
                yield f"{n}:{m}", kernels.pack_nm(weight, nm_mask(out, in_features, n, m, gen), n, m, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
@pytest.mark.parametrize("kind", ("bitmask", "nm", "dense"))
@pytest.mark.parametrize("isa", PATHS)
def test_matmul_matches_reference(isa, kind, dtype):
    usable_or_skip(isa)
    gen = torch.Generator().manual_seed(0)
    for out, in_features in SHAPES:
        bias = torch.randn(out, generator=gen)
        for label, packed in packings(kind, out, in_features, dtype, gen):
            # 1, 2, 3 and 12 rows run the kernels (AVX2 takes 4 features per work unit up to 2 rows, 2 beyond); 70
            # rows (prefill-sized) decode once and run torch's GEMM
            x = torch.randn(1 + 2 + 3 + 12 + 70, in_features, generator=gen)
            y = torch.cat([kernels.matmul(rows, packed, bias, isa=isa) for rows in x.split((1, 2, 3, 12, 70))])
            assert y.shape == (88, out) and y.dtype == torch.float32, label
            assert_close(y, x, packed, bias)


@pytest.mark.parametrize("isa", PATHS)
def test_fully_pruned_rows_give_the_bias_exactly(isa):
    usable_or_skip(isa)
    packed = kernels.pack_bitmask(torch.randn(9, 70), torch.zeros(9, 70, dtype=torch.bool))
    bias = torch.randn(9)
    assert torch.equal(kernels.matmul(torch.randn(2, 70), packed, bias, isa=isa), bias.expand(2, 9))


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), in_features=st.integers(1, 150), rows=st.integers(1, 70),
       sparsity=st.sampled_from((0.0, 0.3, 0.7, 0.95, 1.0)), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_bitmask_any_shape(out, in_features, rows, sparsity, bf16, seed):
    gen = torch.Generator().manual_seed(seed)
    packed = kernels.pack_bitmask(torch.randn(out, in_features, generator=gen),
                                  random_mask(out, in_features, sparsity, gen),
                                  torch.bfloat16 if bf16 else torch.float16)
    x = torch.randn(rows, in_features, generator=gen)
    assert_close(kernels.matmul(x, packed), x, packed, None)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), groups=st.integers(1, 40), rows=st.integers(1, 20), bf16=st.booleans(),
       seed=st.integers(0, 2**16))
def test_two_four_any_shape(out, groups, rows, bf16, seed):
    """2:4 has a kernel of its own on AVX2 (pairs of features, inputs permuted): odd feature counts, partial last
    windows and every row count of x go through it."""
    gen = torch.Generator().manual_seed(seed)
    in_features = 4 * groups
    packed = kernels.pack_nm(torch.randn(out, in_features, generator=gen), nm_mask(out, in_features, 2, 4, gen), 2, 4,
                             torch.bfloat16 if bf16 else torch.float16)
    x = torch.randn(rows, in_features, generator=gen)
    assert_close(kernels.matmul(x, packed), x, packed, None)


def test_leading_dims_other_dtypes_and_many_rows():
    gen = torch.Generator().manual_seed(1)
    packed = kernels.pack_nm(torch.randn(12, 64, generator=gen), nm_mask(12, 64, 2, 4, gen), 2, 4, torch.bfloat16)
    x = torch.randn(2, 3, 64, generator=gen, dtype=torch.float64)
    y = kernels.matmul(x, packed)
    assert y.shape == (2, 3, 12) and y.dtype == torch.float32
    assert_close(y, x.float(), packed, None)
    many = torch.randn(37, 64, generator=gen)  # beyond the 1..16 the kernels are tuned for: still exact
    assert_close(kernels.matmul(many, packed), many, packed, None)


def test_nbytes_counts_what_a_matmul_reads():
    weight, mask = torch.randn(64, 256), torch.rand(64, 256) >= 0.5
    kept = int(mask.sum())
    assert kernels.pack_dense(weight).nbytes == 64 * 256 * 2
    assert kernels.pack_bitmask(weight, mask).nbytes == kept * 2 + 64 * 8 * 4 + 65 * 8
    nm = kernels.pack_nm(weight, nm_mask(64, 256, 2, 4, torch.Generator()), 2, 4)
    assert nm.nbytes == 64 * 128 * 2 + 64 * 256 // 4 * 2 * 2 // 8  # 2 bits per kept value


# ---- export converters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ((7, 13), (3, 64), (5, 100), (33, 96)))
@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
def test_from_bitmask_export_equals_packing(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    weight, mask = torch.randn(shape, generator=gen).to(dtype), random_mask(*shape, 0.6, gen)
    tensors = ENCODINGS["bitmask"].encode(weight, mask, {})
    converted = kernels.from_bitmask_export(tensors["values"], tensors["bitmask"], shape)
    packed = kernels.pack_bitmask(weight, mask, dtype)
    for name in ("values", "masks", "offsets"):
        assert torch.equal(getattr(converted, name), getattr(packed, name)), name
    x = torch.randn(2, shape[1], generator=gen)
    assert torch.equal(kernels.matmul(x, converted), kernels.matmul(x, packed))


@pytest.mark.parametrize("nm", ((2, 4), (1, 4), (3, 8), (4, 8), (5, 16)), ids=lambda nm: f"{nm[0]}:{nm[1]}")
def test_from_nm_export_equals_packing(nm):
    n, m = nm
    gen = torch.Generator().manual_seed(3)
    for shape in ((9, 16 * 7), (1030, 48)):  # a partial window; more rows than one conversion block
        weight, mask = torch.randn(shape, generator=gen).half(), nm_mask(*shape, n, m, gen)
        params = {"n": n, "m": m}
        tensors = ENCODINGS["nm"].encode(weight, mask, params)
        converted = kernels.from_nm_export(tensors["values"], tensors["layouts"], shape, n, m)
        packed = kernels.pack_nm(weight, mask, n, m, torch.float16)
        assert torch.equal(converted.values, packed.values) and torch.equal(converted.positions, packed.positions)
        decoded, _ = ENCODINGS["nm"].decode(tensors, shape, params, torch.float16)
        assert torch.equal(kernels.dequantize(converted), decoded.float())


def test_export_converters_reject_inconsistent_tensors():
    weight, mask = torch.randn(4, 40).half(), torch.rand(4, 40) > 0.5
    tensors = ENCODINGS["bitmask"].encode(weight, mask, {})
    with pytest.raises(ValueError, match=f"keeps {int(mask.sum())} weights but {int(mask.sum()) - 1} values"):
        kernels.from_bitmask_export(tensors["values"][1:], tensors["bitmask"], (4, 40))
    with pytest.raises(kernels.KernelInputError, match="packed uint8 bytes"):
        kernels.from_bitmask_export(tensors["values"], tensors["bitmask"], (4, 48))
    with pytest.raises(kernels.KernelInputError, match="pass dtype"):
        kernels.from_bitmask_export(tensors["values"].float(), tensors["bitmask"], (4, 40))
    nm = ENCODINGS["nm"].encode(weight, nm_mask(4, 40, 2, 4, torch.Generator()), {"n": 2, "m": 4})
    with pytest.raises(kernels.KernelInputError, match="keeps 80 weights but 79 values"):
        kernels.from_nm_export(nm["values"].reshape(-1)[1:], nm["layouts"], (4, 40), 2, 4)
    with pytest.raises(kernels.KernelInputError, match="layouts must be"):
        kernels.from_nm_export(nm["values"], nm["layouts"][1:], (4, 40), 2, 4)


# ---- dispatch, build and fallback ----------------------------------------------------------------------------


def test_isa_info_and_auto():
    info = kernels.isa_info()
    if not info["native"]:
        pytest.skip("native kernels unavailable here")
    assert "portable" in info["cpu"] and "portable" in info["compiled"]
    order = dispatch.preference(dispatch.cpu_vendor())
    assert info["usable"] == [isa for isa in order if isa in info["cpu"] and isa in info["compiled"]]
    assert info["auto"] == info["usable"][0]
    assert dispatch.resolve_isa("torch") is None


def test_auto_prefers_the_16_bit_expand_on_intel_only():
    assert dispatch.preference("GenuineIntel")[:2] == ("avx512_vbmi2", "avx512")
    assert dispatch.preference("AuthenticAMD")[:2] == ("avx512", "avx512_vbmi2")
    assert sorted(dispatch.preference("")) == sorted(kernels.NATIVE_ISAS)


def test_environment_pins_the_auto_path(monkeypatch):
    monkeypatch.setenv(dispatch.ISA_ENV, "torch")
    assert dispatch.resolve_isa("auto") is None
    monkeypatch.setenv(dispatch.ISA_ENV, "portable")
    assert dispatch.resolve_isa("auto") == ("portable" if dispatch._usable() else None)


def test_forced_isa_missing_on_this_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_usable", lambda: ("portable",))
    dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="avx512 is not available on this CPU"):
        assert dispatch.resolve_isa("avx512") == "portable"


@pytest.fixture
def fresh_build_state():
    """Forget the loaded library (and the usable instruction sets) before and after the test."""
    build.native.cache_clear()
    dispatch._usable.cache_clear()
    yield
    build.native.cache_clear()
    dispatch._usable.cache_clear()


def test_build_failure_falls_back_to_pytorch_with_one_line(monkeypatch, fresh_build_state):
    def broken_build():
        raise RuntimeError("Error building extension 'sparseforge_kernels': c++: not found\nmore detail")

    monkeypatch.setattr(build, "_build", broken_build)
    packed = kernels.pack_bitmask(torch.randn(6, 40), torch.rand(6, 40) > 0.5)
    x = torch.randn(2, 40)
    with pytest.warns(RuntimeWarning) as record:
        y = kernels.matmul(x, packed, isa="avx2")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "\n" not in messages[0] and "c++: not found" in messages[0]
    assert kernels.isa_info()["native"] is False
    assert_close(y, x, packed, None)


def test_disabled_by_environment_uses_pytorch_silently(monkeypatch, recwarn, fresh_build_state):
    monkeypatch.setenv(build.DISABLE_ENV, "torch")
    packed = kernels.pack_dense(torch.randn(5, 33))
    x = torch.randn(1, 33)
    assert_close(kernels.matmul(x, packed), x, packed, None)
    assert kernels.isa_info()["auto"] == "torch" and not recwarn.list


def test_build_cache_lives_outside_git_keyed_by_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    key = build.build_key()
    assert len(key) == 16 and key == build.build_key()
    assert all((build.CSRC / source).is_file() for source in build.SOURCES)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_readable_value_error():
    weight = torch.randn(8, 64)
    packed = kernels.pack_bitmask(weight)
    cases = [
        (lambda: kernels.matmul(torch.randn(2, 63), packed), "x has 63 inputs per row but the weight takes 64"),
        (lambda: kernels.matmul(torch.randn(2, 64), packed, torch.randn(7)), r"bias must be a tensor of shape \[8\]"),
        (lambda: kernels.matmul(torch.randn(2, 64), packed, isa="sse9"), "unknown isa 'sse9'"),
        (lambda: kernels.pack_bitmask(weight, torch.ones(8, 65, dtype=torch.bool)), "mask shape"),
        (lambda: kernels.pack_bitmask(weight, dtype=torch.float32), "float16 or torch.bfloat16"),
        (lambda: kernels.pack_nm(weight, None, 2, 4), "mask is not 2:4: row 0, group 0 keeps 4"),
        (lambda: kernels.pack_nm(weight, None, 2, 6), "m in"),
        (lambda: kernels.pack_nm(torch.randn(8, 66), None, 2, 4), "not whole groups of 4"),
        (lambda: kernels.BitmaskWeight(packed.values, packed.masks, packed.offsets.flip(0), (8, 64)),
         "offsets disagree"),
        (lambda: kernels.BitmaskWeight(packed.values[:-1], packed.masks, packed.offsets, (8, 64)), "padding"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert isinstance(info.value, kernels.KernelInputError) and "\n" not in str(info.value)


def test_bits_past_the_row_are_rejected():
    packed = kernels.pack_bitmask(torch.randn(2, 40))
    masks = packed.masks.clone()
    masks[1, -1] |= 1 << 20  # the last row, so the offsets stay consistent except for the count
    offsets = packed.offsets.clone()
    offsets[-1] += 1
    values = torch.cat([packed.values, packed.values.new_zeros(1)])
    with pytest.raises(kernels.KernelInputError, match="past input 40"):
        kernels.BitmaskWeight(values, masks, offsets, (2, 40))


def test_tolerance_is_tight_enough_to_catch_a_wrong_weight():
    gen = torch.Generator().manual_seed(4)
    packed = kernels.pack_bitmask(torch.randn(4, 200, generator=gen), random_mask(4, 200, 0.5, gen))
    x = torch.randn(1, 200, generator=gen)
    y = kernels.matmul(x, packed)
    assert_close(y, x, packed, None)
    mean_term = float(x.abs() @ kernels.dequantize(packed).abs()[0]) / 200
    wrong = y.clone()
    wrong[0, 0] += mean_term / 10  # a tenth of an average term: ~40x the bound
    with pytest.raises(AssertionError):
        assert_close(wrong, x, packed, None)


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="no C++ compiler or not x86-64")
def test_native_kernels_build_where_a_compiler_exists():
    """A broken build must fail here, not hide behind the fallback (which every other test would accept)."""
    info = kernels.isa_info()
    assert info["native"] and "portable" in info["usable"] and "avx2" in info["compiled"], info
