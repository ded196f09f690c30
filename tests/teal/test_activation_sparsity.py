"""Activation sparsity (TEAL): exactness at threshold 0, scoring equals decoding, calibration hits its target,
persistence with a fingerprint, bad input, CLI and recipe."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.errors import ActivationSparsityError
from sparseforge.export.saving import save_model
from sparseforge.models.handle import LoadedModel
from sparseforge.models.loading import load_model
from sparseforge.models.tiny import TINY_FAMILIES, build_tiny
from sparseforge.teal import calibrate_activation_sparsity, install_thresholds, read_thresholds
from sparseforge.teal.calibrate import site_statistics
from sparseforge.teal.sites import SITES, model_sites
from sparseforge.teal.thresholds import GRID, THRESHOLDS_FILE, threshold_at

PROMPT = "the quick brown fox jumps over the lazy dog"


def deep(family: str = "llama", dtype=torch.float64, layers: int = 4) -> LoadedModel:
    model, tokenizer = build_tiny(f"tiny-{family}", num_layers=layers)
    return LoadedModel(model.to(dtype), tokenizer, f"tiny-{family}")


def windows(handle, n: int = 4, length: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, handle.model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def statistics(handle):
    return site_statistics(handle, windows(handle), progress=False)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_target_zero_reproduces_the_dense_logits_exactly(family):
    handle = deep(family, layers=2)
    ids = windows(handle, 2, 24, seed=1)
    with torch.no_grad():
        dense = handle.model(input_ids=ids).logits
    stats = statistics(handle)
    assert all(set(block) <= set(SITES) and block for block in stats.weights)
    attachment = install_thresholds(handle, stats.uniform(0.0))
    with torch.no_grad():
        assert torch.equal(handle.model(input_ids=ids).logits, dense)
    assert attachment.summary()["overall"] == 0.0


def test_teacher_forced_scoring_equals_decoding_the_same_tokens():
    handle = deep()
    attachment = install_thresholds(handle, statistics(handle).uniform(0.4))
    prompt = handle.tokenizer(PROMPT, return_tensors="pt").input_ids
    out = handle.model.generate(prompt, max_new_tokens=8, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=0)
    assert attachment.summary()["overall"] > 0.2
    with torch.no_grad():
        logits = handle.model(input_ids=out.sequences[:, :-1]).logits
    generated = torch.stack(out.scores, dim=1)[0]  # generate keeps scores in float32: its rounding, 3e-8, is all
    torch.testing.assert_close(logits[0, prompt.shape[1] - 1:].float(), generated, rtol=0, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(target=st.floats(0.05, 0.9), seed=st.integers(0, 2**16))
def test_uniform_thresholds_zero_exactly_the_small_entries_at_the_target_rate(target, seed):
    handle = deep(layers=2)
    stats = site_statistics(handle, windows(handle, seed=seed), seed=seed, progress=False)
    attachment = install_thresholds(handle, stats.uniform(target))
    seen = []
    site = model_sites(handle.adapter)[1]["ffn_intermediate"].linears[0].module
    hook = site.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        handle.model(input_ids=windows(handle, seed=seed))  # the calibration text itself
    hook.remove()
    threshold = attachment.thresholds.thresholds[1]["ffn_intermediate"]
    # the hook registered after the attachment's sees the zeroed input: zero exactly where |x| fell below
    assert threshold > 0 and bool((seen[0].abs() >= threshold).logical_or(seen[0] == 0).all())
    realised = attachment.summary()
    # the first site sees the calibration distribution itself; later ones see inputs shifted by earlier zeroing
    assert realised["per_block"][0]["attention_input"] == pytest.approx(target, abs=0.01)
    assert realised["overall"] == pytest.approx(target, abs=0.08)


def test_threshold_interpolation_is_monotone_and_zero_at_zero():
    quantiles = [i * 0.1 for i in range(len(GRID))]
    assert threshold_at(quantiles, 0.0) == 0.0
    values = [threshold_at(quantiles, s / 200) for s in range(1, 200)]
    assert values == sorted(values) and threshold_at(quantiles, 0.5) == pytest.approx(5.0)


def test_greedy_allocation_reaches_the_target_per_block_and_beats_uniform_on_block_error():
    handle = deep(dtype=torch.float32)
    attachment = calibrate_activation_sparsity(handle, 0.4, "greedy", calibration=windows(handle), greedy_windows=2,
                                               progress=False)
    thresholds = attachment.thresholds
    for block, weights in zip(thresholds.sparsity, thresholds.weights):
        reached = sum(block[s] * weights[s] for s in block) / sum(weights.values())
        assert 0.4 - 1e-9 <= reached < 0.4 + 0.05
    assert len({tuple(sorted(b.items())) for b in thresholds.sparsity}) >= 1
    assert thresholds.overall() == pytest.approx(0.4, abs=0.05)
    record = handle.history[-1]
    assert record["stage"] == "activation_sparsity" and record["realised"]["overall"] > 0.2
    ids = windows(handle, 2, 64, seed=5)
    with torch.no_grad():
        greedy_logits = handle.model(input_ids=ids).logits
        attachment.set_thresholds(thresholds.uniform(0.4))
        uniform_logits = handle.model(input_ids=ids).logits
        handle.detach("activation_sparsity")
        dense_logits = handle.model(input_ids=ids).logits
    # both change the model; on random weights either may be closer, but neither is the dense model
    assert not torch.equal(greedy_logits, dense_logits) and not torch.equal(uniform_logits, dense_logits)


def test_searched_allocation_keeps_the_target_and_never_loses_to_its_uniform_start():
    from sparseforge.teal.allocation import block_sparsity

    handle = deep(dtype=torch.float32)
    attachment = calibrate_activation_sparsity(handle, 0.4, "searched", calibration=windows(handle), greedy_windows=2,
                                               generations=4, progress=False)
    thresholds = attachment.thresholds
    search = thresholds.calibration["search"]
    levels = search["block_levels"]
    assert thresholds.allocation == "searched" and sum(levels) / len(levels) == pytest.approx(0.4)
    for block, weights, level in zip(thresholds.sparsity, thresholds.weights, levels):
        assert level - 1e-9 <= block_sparsity(block, weights) < level + 0.05
    fitness = [entry["fitness"] for entry in search["history"]]
    assert fitness[-1] <= fitness[0]  # elitist: the balanced start stays in the race
    assert search["evaluations"] > 1


def test_saved_thresholds_are_restored_by_load_model_and_refused_for_other_weights(tmp_path):
    handle = deep(dtype=torch.float32)
    install_thresholds(handle, statistics(handle).uniform(0.3))
    save_model(handle, tmp_path / "model")
    assert (tmp_path / "model" / THRESHOLDS_FILE).exists()
    ids = windows(handle, 1, 32, seed=3)
    with torch.no_grad():
        expected = handle.model(input_ids=ids).logits
    reloaded = load_model(str(tmp_path / "model"))
    assert reloaded.attachment("activation_sparsity") is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, expected)
    other = deep(dtype=torch.float32)
    other.model.model.layers[1].mlp.down_proj.weight.data.mul_(1.5)
    save_model(other, tmp_path / "other")
    (tmp_path / "other" / THRESHOLDS_FILE).write_text((tmp_path / "model" / THRESHOLDS_FILE).read_text())
    with pytest.raises(ActivationSparsityError, match="calibrated for a different model"):
        load_model(str(tmp_path / "other"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"target": 0.4, "sparsity": [], "thresholds": [], "quantiles": [], "weights": [], "extra": 1}', "extra"),
    ('{"target": 1.4, "sparsity": [], "thresholds": [], "quantiles": [], "weights": []}', "target"),
])
def test_broken_threshold_files_fail_with_one_line(tmp_path, content, message):
    (tmp_path / THRESHOLDS_FILE).write_text(content)
    with pytest.raises(ActivationSparsityError, match=message):
        read_thresholds(tmp_path)
    with pytest.raises(ActivationSparsityError, match="no activation thresholds"):
        read_thresholds(tmp_path / "missing.json")


def test_thresholds_for_another_depth_or_out_of_range_are_refused():
    handle = deep()
    stats = statistics(handle)
    with pytest.raises(ActivationSparsityError, match="blocks of sparsity"):
        install_thresholds(deep(layers=3), stats)
    broken = stats.model_copy(update={"sparsity": [{**b, "ffn_input": 1.2} for b in stats.sparsity]})
    with pytest.raises(ActivationSparsityError, match="outside \\[0, 1\\)"):
        install_thresholds(handle, broken)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 1.0}, "outside \\[0, 1\\)"),
    ({"target": -0.1}, "outside \\[0, 1\\)"),
    ({"target": 0.3, "allocation": "magic"}, "unknown allocation"),
    ({"target": 0.3, "step": 0.0}, "greedy step"),
])
def test_calibration_refuses_bad_requests(kwargs, message):
    handle = deep()
    with pytest.raises(ActivationSparsityError, match=message):
        calibrate_activation_sparsity(handle, calibration=windows(handle), progress=False, **kwargs)


def test_calibration_text_too_short_is_refused():
    handle = deep()
    with pytest.raises(ActivationSparsityError, match="too short"):
        calibrate_activation_sparsity(handle, 0.3, calibration=windows(handle, 2, 16), progress=False)


def rounded_copy(handle) -> LoadedModel:
    """The same model with its linears' and embeddings' weights rounded to fp16: what the runtime holds (so that
    no input lands on the other side of a threshold by a rounding difference)."""
    import copy

    twin = LoadedModel(copy.deepcopy(handle.model), handle.tokenizer, handle.source)
    adapter = twin.adapter
    for module in [view.module for view in adapter.linears()] + [adapter.embed_tokens(), adapter.lm_head()]:
        module.weight.data.copy_(module.weight.data.half().float())
    twin.masks.update(handle.masks)
    return twin


@pytest.mark.parametrize("mode", ("dense", "sparse"))
def test_the_runtime_zeroes_and_skips_the_inputs_as_the_hooks_do(mode):
    handle = deep(dtype=torch.float32)
    if mode == "sparse":
        sf.prune(handle, method="magnitude", sparsity=0.5, progress=False)
    thresholds = statistics(handle).uniform(0.4)
    reference = rounded_copy(handle)
    install_thresholds(reference, thresholds)
    install_thresholds(handle, thresholds)
    runtime = sf.install_runtime(handle, mode, log=lambda message: None)
    layouts = {layer.layout for layer in runtime.layers[:-1]}
    assert layouts == ({"column"} if mode == "dense" else {"column bitmask"}) and runtime.native_step is not None
    assert runtime.summary()["activation_thresholds"]
    for length in (10, 70):  # the column kernels row by row; prefill-sized, through the GEMM
        ids = windows(handle, 1, length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(handle.model(input_ids=ids).logits, reference.model(input_ids=ids).logits,
                                       rtol=1e-3, atol=1e-3)
    prompt = handle.tokenizer(PROMPT, return_tensors="pt").input_ids
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ours, theirs = handle.model.generate(prompt, **options), reference.model.generate(prompt, **options)
    assert runtime.native_step.steps >= 7  # the native step decoded, with the thresholds
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), rtol=1e-3, atol=1e-3)
    handle.detach("runtime")  # ordinary linears again (from the fp16 layouts), hooked again
    attachment = handle.attachment("activation_sparsity")
    attachment.counter.reset()
    later = windows(handle, 1, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(handle.model(input_ids=later).logits, reference.model(input_ids=later).logits,
                                   rtol=1e-4, atol=1e-4)
    assert attachment.summary()["overall"] > 0.2


def test_thresholds_go_on_before_the_runtime():
    handle = deep(dtype=torch.float32)
    sf.install_runtime(handle, "dense", log=lambda message: None)
    with pytest.raises(ActivationSparsityError, match="before the sparse runtime"):
        install_thresholds(handle, statistics(deep(dtype=torch.float32)).uniform(0.3))


def test_cli_calibrate_then_generate_and_eval(capsys, monkeypatch, tmp_path):
    from helpers import run_cli

    code, _, err = run_cli(capsys, monkeypatch, "activations", "calibrate", "tiny-llama", "--target", "0.3",
                           "--nsamples", "4", "--seqlen", "64", "--greedy-windows", "2", "--eval-windows", "2",
                           "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["stage"] == "activation_sparsity"
    assert report["metrics"]["after"]["perplexity"]["perplexity"] != report["metrics"]["before"]["perplexity"]["perplexity"]
    assert (tmp_path / "run" / "activation_sparsity.png").exists()
    assert (tmp_path / "run" / "model" / THRESHOLDS_FILE).exists()
    assert "Activation sparsity (TEAL)" in (tmp_path / "run" / "report.md").read_text()
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "run", "hello", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("hello"), err
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "run", "hello", "--max-new-tokens", "4",
                             "--runtime", "dense")
    assert code == 0 and out.startswith("hello") and "column" in err, err


@pytest.mark.parametrize("args, message", [
    (["--target", "1.5"], "outside [0, 1)"),
    (["--target", "0.3", "--allocation", "magic"], "allocation"),
])
def test_cli_refuses_bad_requests_before_any_work(capsys, monkeypatch, tmp_path, args, message):
    from helpers import assert_clean_failure, run_cli

    code, _, err = run_cli(capsys, monkeypatch, "activations", "calibrate", "tiny-llama", *args,
                           "--eval-windows", "2", "--out", tmp_path / "x")
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "x").exists()


def test_recipe_stage_must_be_last_and_rejects_unknown_keys():
    with pytest.raises(sf.SparseforgeError, match="must be the last stage"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"activation_sparsity": {"target": 0.2}},
                                                            {"shrink": {"ffn": 0.2}}]})
    with pytest.raises(sf.SparseforgeError, match="unknown key"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"activation_sparsity": {"ratio": 0.2}}]})
