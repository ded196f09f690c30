"""ADMM weight updates, gradual ADMM and ALPS, and explicit per-block sparsities."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.errors import PatternError
from sparseforge.models.fingerprint import model_fingerprint
from sparseforge.prune import admm, sparsegpt
from sparseforge.sparsity.masks import is_valid_nm
from sparseforge.sparsity.patterns import parse_pattern

SOLVERS = ["admm", "admm-gradual", "alps"]


def windows(n=6, seqlen=24, seed=0):
    return torch.randint(0, 259, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _problem(seed: int, rows: int, inputs: int):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inputs, inputs, generator=generator) * 0.3 + torch.eye(inputs)
    x = torch.randn(4 * inputs, inputs, generator=generator) @ mixing
    return torch.randn(rows, inputs, generator=generator), x.T @ x


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 24), groups=st.integers(2, 8),
       pattern=st.sampled_from(["unstructured", "2:4", "4:8"]), sparsity=st.floats(0.2, 0.9))
def test_the_admm_update_never_loses_to_sparsegpt_on_the_same_mask(seed, rows, groups, pattern, sparsity):
    weight, hessian = _problem(seed, rows, 8 * groups)
    pat = parse_pattern(pattern)
    target = sparsity if pattern == "unstructured" else pat.fixed_sparsity()
    reference = sparsegpt.solve(weight, sparsegpt.factorize(hessian), pat, [target], [rows])
    h = admm.prepare(hessian, 0.01)
    updated, mask, _ = admm.solve(weight, h, pat, [target], [rows], admm.ADMMConfig(), "fixed", reference.mask)
    assert torch.equal(mask, reference.mask) and not bool(updated[~mask].any())
    ours = admm.reconstruction_error(weight, updated, h.matrix).sum()
    theirs = admm.reconstruction_error(weight, reference.weight, h.matrix).sum()
    assert ours <= theirs * (1 + 1e-5) + 1e-6


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), iterations=st.integers(0, 12))
def test_pcg_only_lowers_the_error_from_its_start(seed, iterations):
    weight, hessian = _problem(seed, 6, 32)
    h = admm.prepare(hessian, 0.01)
    mask = torch.rand(6, 32, generator=torch.Generator().manual_seed(seed)) > 0.5
    start = weight * mask
    polished = admm.pcg(weight, start, mask, h, iterations)
    assert not bool(polished[~mask].any())
    before = admm.reconstruction_error(weight, start, h.matrix)
    assert bool((admm.reconstruction_error(weight, polished, h.matrix) <= before * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored [in, out]
@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_every_solver_gives_exact_counts_and_valid_groups(family, method, pattern):
    tiny = sf.load_model(f"tiny-{family}")
    sf.prune(tiny, method=method, sparsity=0.7 if pattern == "unstructured" else None, pattern=pattern,
             calibration=windows(), batch_size=4, progress=False)
    per_row = method != "alps"
    for view in tiny.adapter.linears():
        mask = tiny.masks[view.name]
        assert not bool(view.weight.detach()[~mask].any())
        if pattern != "unstructured":
            assert is_valid_nm(mask, *map(int, pattern.split(":")))
        elif per_row:
            assert bool((mask.sum(1) == view.in_features - round(0.7 * view.in_features)).all())
        else:
            assert mask.sum().item() == mask.numel() - round(0.7 * mask.numel())


class Interrupt(Exception):
    pass


def test_resume_of_an_admm_run_equals_the_uninterrupted_run(tmp_path):
    options = dict(method="alps", sparsity=0.6, calibration=windows(), progress=False)
    reference = sf.load_model("tiny-llama")
    sf.prune(reference, **options)

    def stop(index):
        if index == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        sf.prune(sf.load_model("tiny-llama"), checkpoint_dir=tmp_path, after_block=stop, **options)
    resumed = sf.load_model("tiny-llama")
    sf.prune(resumed, checkpoint_dir=tmp_path, **options)
    assert resumed.history[-1]["resumed_from_block"] == 1
    state = resumed.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.model.state_dict().items())


@pytest.mark.parametrize("source", ["list", "text", "json", "search run"])
def test_explicit_block_sparsities_are_applied_per_block(tmp_path, source):
    handle = sf.load_model("tiny-llama")
    values = [0.55, 0.8]
    given_source = {"list": values, "text": "0.55,0.8"}.get(source)
    if source == "json":
        given_source = tmp_path / "allocation.json"
        given_source.write_text(json.dumps({"block_sparsity": values}))
    elif source == "search run":
        given_source = tmp_path / "run"
        given_source.mkdir()
        record = {"stage": "search", "model": model_fingerprint(handle.adapter), "picked": {"sparsities": values}}
        (given_source / "report.json").write_text(json.dumps({"stages": [record]}))
    sf.prune(handle, method="admm", block_sparsity=given_source, calibration=windows(), progress=False)
    assert handle.history[-1]["allocation"] == "explicit"
    for view in handle.adapter.linears():
        block = int(view.name.split(".")[2])
        mask = handle.masks[view.name]
        assert bool((mask.sum(1) == view.in_features - round(values[block] * view.in_features)).all())


@pytest.mark.parametrize("block_sparsity, options, message", [
    ([0.5], {}, "1 block sparsities given for a model with 2 blocks"),
    ([0.5, 1.0], {}, "outside \\[0, 1\\)"),
    ([0.5, float("nan")], {}, "outside \\[0, 1\\)"),
    ([0.5, 0.6], {"pattern": "2:4"}, "per-block sparsities need an unstructured pattern"),
    ([0.5, 0.6], {"allocation": "owl"}, "either an allocation"),
    ("0.5,zero", {}, "neither a comma-separated list"),
    (None, {"admm": {"iterations": 0}}, "iterations must be at least 1"),
    (None, {"admm": {"rho": -1.0, "rho_growth": 0.5}}, "rho must be positive.*rho_growth"),
    (None, {"admm": {"mask": "random"}}, "mask must be wanda or magnitude"),
    (None, {"admm": {"steps": 3}}, "unknown admm option"),
])
def test_bad_allocations_and_solver_options_are_refused_before_any_change(block_sparsity, options, message):
    handle = sf.load_model("tiny-llama")
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    with pytest.raises(PatternError, match=message):
        sf.prune(handle, method="admm", block_sparsity=block_sparsity, calibration=windows(), progress=False,
                 **options)
    assert all(torch.equal(before[k], v) for k, v in handle.model.state_dict().items())


def test_a_search_run_of_another_model_is_refused(tmp_path):
    other = sf.load_model("tiny-qwen2")
    run = tmp_path / "run"
    run.mkdir()
    record = {"stage": "search", "model": model_fingerprint(other.adapter), "picked": {"sparsities": [0.5, 0.6]}}
    (run / "report.json").write_text(json.dumps({"stages": [record]}))
    with pytest.raises(PatternError, match="searched on another model"):
        sf.prune(sf.load_model("tiny-llama"), method="wanda", block_sparsity=run, calibration=windows(),
                 progress=False)
    del record["model"]
    (run / "report.json").write_text(json.dumps({"stages": [record]}))
    with pytest.raises(PatternError, match="no model fingerprint"):
        sf.prune(sf.load_model("tiny-llama"), method="wanda", block_sparsity=run, calibration=windows(),
                 progress=False)
