"""FFN skipping while decoding (FFN-SkipLLM): the runtime's invariants, calibration, baselines, persistence, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.errors import SkipError
from sparseforge.export.saving import save_model
from sparseforge.models.cache import cache_of
from sparseforge.models.handle import LoadedModel
from sparseforge.models.loading import load_model
from sparseforge.models.surgery import remove_sublayer
from sparseforge.models.tiny import TINY_FAMILIES, build_tiny
from sparseforge.skip import (SkipPolicy, calibrate_skip, generate, install_policy, matched_baseline, read_policy,
                              uninstall_policy)
from sparseforge.skip.cost import ffn_macs, ideal_skip_speedup
from sparseforge.skip.policy import POLICY_FILE

LAYERS = 6
PROMPTS = ["the quick brown fox", "a b", "jumps over the lazy dog again"]
NEVER = SkipPolicy(threshold=2.0, cold_start=0, cold_end=0)


def deep(family: str = "llama", dtype=torch.float64) -> LoadedModel:
    """A six-layer tiny model in float64, so batched and single results compare exactly."""
    model, tokenizer = build_tiny(f"tiny-{family}", num_layers=LAYERS)
    return LoadedModel(model.to(dtype), tokenizer, f"tiny-{family}")


def _tokens(handle, prompts, n=10, **kwargs):
    return generate(handle, prompts, max_new_tokens=n, **kwargs)


# ---- the policy inside generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_policy_that_never_skips_generates_exactly_the_dense_tokens(family):
    handle = deep(family)
    dense_greedy = _tokens(handle, PROMPTS)["tokens"]
    dense_sampled = _tokens(handle, PROMPTS[0], do_sample=True, temperature=0.8, seed=3)["tokens"]
    install_policy(handle, NEVER)
    result = _tokens(handle, PROMPTS)
    assert torch.equal(result["tokens"], dense_greedy)
    assert torch.equal(_tokens(handle, PROMPTS[0], do_sample=True, temperature=0.8, seed=3)["tokens"], dense_sampled)
    assert result["skip"]["ratio"] == 0 and result["skip"]["governed_tokens"] == 3 * 9


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_skipping_an_ffn_equals_removing_it_for_every_family(family):
    """Scoring with a static policy from position 0 computes exactly the model without those FFNs."""
    handle, removed = deep(family), deep(family)
    for layer in (1, 4):
        remove_sublayer(removed.adapter, layer, "ffn")
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    controller = install_policy(handle, SkipPolicy(mode="static", layers=[1, 4]))
    with torch.no_grad(), controller.scoring(0):
        skipped = handle.model(input_ids=ids).logits
    expected = removed.model(input_ids=ids).logits
    torch.testing.assert_close(skipped, expected, rtol=0, atol=1e-10)
    assert controller.accounting.per_layer() == [0, 1, 0, 0, 1, 0]


def test_greedy_adaptive_rule_skips_k_after_a_saturated_ffn():
    handle = deep()
    install_policy(handle, SkipPolicy(threshold=-1.0, k=2, cold_start=1, cold_end=1))
    summary = _tokens(handle, PROMPTS)["skip"]
    # layer 1 is measured (always "saturated" at threshold -1), 2 and 3 skipped, 4 measured again
    assert summary["per_layer"] == [0, 0, 1, 1, 0, 0]
    assert summary["ratio"] == pytest.approx(2 / 6) and summary["ratio_of_eligible"] == pytest.approx(0.5)


def test_teacher_forced_scoring_equals_decoding_the_same_tokens():
    handle = deep()
    policy = SkipPolicy(threshold=0.0, k=1, cold_start=1, cold_end=1, warmup=2)
    controller = install_policy(handle, policy)
    prompt = handle.tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    out = handle.model.generate(prompt, max_new_tokens=8, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=0)
    decoded = controller.accounting.skipped.copy()
    assert sum(decoded) > 0
    controller.accounting.reset()
    sequence = out.sequences[:, :-1]
    with torch.no_grad(), controller.scoring(prompt.shape[1] + policy.warmup - 1):
        logits = handle.model(input_ids=sequence).logits
    assert controller.accounting.skipped == decoded
    generated = torch.stack(out.scores, dim=1)[0]
    torch.testing.assert_close(logits[0, prompt.shape[1] - 1:].float(), generated, rtol=0, atol=1e-5)


def test_a_batch_gives_the_results_of_its_sequences_one_at_a_time_and_skipping_rows_cost_nothing():
    handle = deep()
    controller = install_policy(handle, SkipPolicy(threshold=0.2, k=1, cold_start=1, cold_end=1))
    rows_computed = []
    down = handle.adapter.ffn(2).linears["down"].module
    hook = down.register_forward_hook(lambda m, args, out: rows_computed.append(args[0].reshape(-1, 128).shape[0]))
    batched = _tokens(handle, PROMPTS)
    decode_rows = sum(rows_computed[1:])  # the first call is the prompt
    hook.remove()
    assert decode_rows == batched["skip"]["governed_tokens"] - controller.accounting.skipped[2]
    skipped = [0] * LAYERS
    for index, prompt in enumerate(PROMPTS):
        single = _tokens(handle, prompt)
        width = single["tokens"].shape[1]
        assert torch.equal(single["tokens"][0], batched["tokens"][index, :width])
        skipped = [a + b for a, b in zip(skipped, controller.accounting.skipped)]
    assert 0 < sum(skipped) < 3 * 9 * 4
    assert skipped == [round(rate * 27) for rate in batched["skip"]["per_layer"]]


def test_prompt_and_warmup_run_densely():
    handle = deep()
    dense = _tokens(handle, PROMPTS[0])["tokens"]
    install_policy(handle, SkipPolicy(mode="static", layers=list(range(LAYERS)), warmup=4))
    result = _tokens(handle, PROMPTS[0])
    # generated tokens 0-3 come from the prompt's forward and 3 dense decoding steps; then every FFN is skipped
    assert torch.equal(result["tokens"][0, :4], dense[0, :4])
    assert result["skip"]["warmup_tokens"] == 3 and result["skip"]["governed_tokens"] == 6
    assert result["skip"]["ratio"] == 1.0 and result["skip"]["ratio_including_warmup"] == pytest.approx(6 / 9)


def test_random_baseline_skips_the_requested_share_reproducibly():
    handle = deep()
    policy = SkipPolicy(mode="random", probability=0.5, cold_start=1, cold_end=1, seed=7)
    install_policy(handle, policy)
    first = _tokens(handle, PROMPTS, n=30)
    install_policy(handle, policy)
    again = _tokens(handle, PROMPTS, n=30)
    assert torch.equal(first["tokens"], again["tokens"])
    assert first["skip"]["ratio_of_eligible"] == pytest.approx(0.5, abs=0.1)
    assert first["skip"]["per_layer"][0] == 0 and first["skip"]["per_layer"][-1] == 0


def test_early_exit_leaves_holes_in_the_kv_cache_and_cannot_score_text():
    handle = deep()
    controller = install_policy(handle, SkipPolicy(mode="early_exit", exit_layer=2))
    prompt = handle.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    out = handle.model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                pad_token_id=0)
    cache = cache_of(out)
    length = prompt.shape[1]
    for layer in range(LAYERS):
        keys = cache.layers[layer].keys
        assert keys.shape[2] == length + 5
        holes = keys[:, :, length:].abs().sum().item() == 0
        assert holes == (layer > 2) and keys[:, :, :length].abs().sum() > 0
    assert controller.accounting.per_layer() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(SkipError, match="generation-only"):
        with controller.scoring():
            pass


@settings(max_examples=8, deadline=None)
@given(st.sets(st.integers(0, LAYERS - 1), max_size=LAYERS))
def test_static_skip_sets_match_removed_ffns(layers):
    handle, removed = deep(), deep()
    for layer in layers:
        remove_sublayer(removed.adapter, layer, "ffn")
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(len(layers)))
    controller = install_policy(handle, SkipPolicy(mode="static", layers=sorted(layers)))
    with torch.no_grad(), controller.scoring(0):
        torch.testing.assert_close(handle.model(input_ids=ids).logits, removed.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-10)


def test_uninstall_restores_the_dense_model_and_state_dict_is_untouched():
    handle = deep()
    keys = list(handle.model.state_dict())
    dense = _tokens(handle, PROMPTS)["tokens"]
    install_policy(handle, SkipPolicy(mode="early_exit", exit_layer=1))
    assert list(handle.model.state_dict()) == keys
    uninstall_policy(handle)
    assert handle.attachment("skip") is None and torch.equal(_tokens(handle, PROMPTS)["tokens"], dense)


# ---- calibration and baselines -----------------------------------------------------------------------------------
# calibration prompts as token ids: tokenising the default corpus with the tiny byte tokenizer takes seconds
CALIBRATION = {"calibration": torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(1)),
               "new_tokens": 16, "progress": False}


def test_calibration_hits_the_target_ratio_and_installs_the_policy():
    handle = deep(dtype=torch.float32)
    policy = calibrate_skip(handle, 0.25, cold_start=1, cold_end=1, **CALIBRATION)
    calibration = policy.calibration
    assert abs(calibration["ratio_teacher_forced"] - 0.25) <= 0.01
    assert handle.attachment("skip") is not None and handle.attachment("skip").policy is policy
    assert {c["k"] for c in calibration["candidates"]} == {1, 2, 4}
    chosen = min(calibration["candidates"], key=lambda c: c["kl"])
    assert (policy.k, policy.threshold) == (chosen["k"], chosen["threshold"])
    assert len(calibration["similarity"]) == LAYERS and 0 <= calibration["ratio_in_generation"] <= 1
    assert handle.history[-1]["stage"] == "skip"
    fixed = calibrate_skip(handle, 0.2, k=2, similarity="ffn_only", **CALIBRATION)
    assert fixed.k == 2 and len(fixed.calibration["candidates"]) == 1
    assert fixed.cold_start >= 1 and fixed.cold_end >= 1  # chosen from the similarity profile


def test_matched_baselines_skip_the_same_share():
    handle = deep(dtype=torch.float32)
    policy = calibrate_skip(handle, 0.34, k=3, cold_start=1, cold_end=1, **CALIBRATION)
    static = matched_baseline(policy, "static")
    similarity = policy.calibration["similarity"]
    assert len(static.layers) == 2 and min(similarity[i] for i in static.layers) >= \
        max(similarity[i] for i in range(LAYERS) if i not in static.layers)
    assert matched_baseline(policy, "random").probability == pytest.approx(0.34 * 6 / 4)
    assert matched_baseline(policy, "early_exit").exit_layer == 3
    install_policy(handle, static)
    assert _tokens(handle, PROMPTS)["skip"]["ratio"] == pytest.approx(2 / 6)
    with pytest.raises(SkipError, match="unknown baseline"):
        matched_baseline(policy, "layerdrop")


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 1.0}, "outside (0, 1)"),
    ({"target": 0.0}, "outside (0, 1)"),
    ({"target": 0.2, "cold_start": 3, "cold_end": 3}, "cover all 6 layers"),
    ({"target": 0.6, "cold_start": 1, "cold_end": 1}, "at most 0.500"),
    ({"target": 0.2, "warmup": 16}, "warm-up 16 leaves nothing"),
])
def test_calibration_refuses_impossible_requests(kwargs, message):
    handle = deep(dtype=torch.float32)
    with pytest.raises(SkipError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calibrate_skip(handle, **{**CALIBRATION, **kwargs})
    assert handle.attachment("skip") is None


def test_generation_refuses_a_warmup_that_outlasts_it():
    handle = deep()
    install_policy(handle, SkipPolicy(warmup=10, cold_start=1, cold_end=1))
    with pytest.raises(SkipError, match="warm-up of 10 tokens"):
        _tokens(handle, PROMPTS[0], n=10)
    with pytest.raises(SkipError, match="empty prompt"):
        _tokens(handle, "", n=12)
    with pytest.raises(SkipError, match="cover all"):
        install_policy(handle, SkipPolicy(cold_start=4, cold_end=2))


def test_ideal_speedup_counts_skipped_ffns_and_similarity_checks():
    handle = deep()
    adapter = handle.adapter
    static = SkipPolicy(mode="static", layers=[2])
    nothing = {"governed_tokens": 10, "warmup_tokens": 0, "per_layer": [0.0] * LAYERS}
    assert ideal_skip_speedup(adapter, static, nothing, 20)["decode"] == 1.0
    adaptive = SkipPolicy(threshold=0.5, cold_start=1, cold_end=1)
    assert ideal_skip_speedup(adapter, adaptive, nothing, 20)["decode"] < 1.0  # checks cost, nothing saved
    one = {**nothing, "per_layer": [0, 0, 1.0, 0, 0, 0]}
    costs = ideal_skip_speedup(adapter, static, one, 20)
    assert costs["dense_macs_per_token"] - costs["skip_macs_per_token"] == ffn_macs(adapter, 2) == 3 * 64 * 128
    half_warm = {**one, "warmup_tokens": 10}
    assert ideal_skip_speedup(adapter, static, half_warm, 20)["skip_macs_per_token"] == \
        costs["dense_macs_per_token"] - ffn_macs(adapter, 2) / 2


# ---- persistence, evaluation, CLI, recipes -----------------------------------------------------------------------
def _saved_with_policy(tmp_path, policy=None):
    handle = deep(dtype=torch.float32)
    policy = policy or calibrate_skip(handle, 0.25, cold_start=1, cold_end=1, **CALIBRATION)
    install_policy(handle, policy)
    save_model(handle, tmp_path / "model")
    return handle, policy


def test_a_saved_policy_is_restored_by_load_model_and_refused_for_other_weights(tmp_path):
    handle, policy = _saved_with_policy(tmp_path)
    expected = _tokens(handle, PROMPTS)["tokens"]
    reloaded = load_model(str(tmp_path / "model"))
    assert reloaded.attachment("skip") is not None and reloaded.attachment("skip").policy.threshold == policy.threshold
    assert torch.equal(_tokens(reloaded, PROMPTS)["tokens"], expected)
    assert load_model(str(tmp_path / "model"), dtype="bfloat16").attachment("skip") is not None  # same model, other dtype
    other = deep(dtype=torch.float32)
    other.model.model.layers[3].mlp.down_proj.weight.data.mul_(1.5)
    save_model(other, tmp_path / "other")
    (tmp_path / "other" / POLICY_FILE).write_text((tmp_path / "model" / POLICY_FILE).read_text())
    with pytest.raises(SkipError, match="calibrated for a different model \\(weights differ\\)"):
        load_model(str(tmp_path / "other"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"mode": "adaptive", "treshold": 0.9}', "treshold"),
    ('{"mode": "skippy"}', "mode"),
])
def test_broken_policy_files_fail_with_one_line(tmp_path, content, message):
    (tmp_path / POLICY_FILE).write_text(content)
    with pytest.raises(SkipError, match=message):
        read_policy(tmp_path)
    with pytest.raises(SkipError, match="no skip policy"):
        read_policy(tmp_path / "missing.json")


def test_evaluation_runs_with_the_policy_active():
    handle = deep(dtype=torch.float32)
    dense = sf.evaluate(handle, windows=2, seqlen=64, progress=False)
    install_policy(handle, SkipPolicy(threshold=2.0, cold_start=1, cold_end=1))
    never = sf.evaluate(handle, windows=2, seqlen=64, progress=False)
    assert never["perplexity"]["perplexity"] == dense["perplexity"]["perplexity"]
    install_policy(handle, SkipPolicy(mode="static", layers=[2, 3]))
    skipping = sf.evaluate(handle, windows=2, seqlen=64, progress=False)
    assert skipping["skip"]["perplexity"]["ratio"] == pytest.approx(2 / 6)
    assert skipping["perplexity"]["perplexity"] != dense["perplexity"]["perplexity"]


def test_cli_calibrate_then_generate(capsys, monkeypatch, tmp_path):
    from helpers import assert_clean_failure, run_cli

    code, _, err = run_cli(capsys, monkeypatch, "skip", "calibrate", "tiny-llama", "--target", "0.2", "--cold-start",
                           "0", "--cold-end", "0", "--nsamples", "2", "--prompt-tokens", "8", "--new-tokens", "8",
                           "--eval-windows", "2", "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["stage"] == "skip" and "perplexity" in report["metrics"]["after"]["skip"]
    assert (tmp_path / "run" / "skip_profile.png").exists() and (tmp_path / "run" / "model" / POLICY_FILE).exists()
    assert "FFN skipping (adaptive)" in (tmp_path / "run" / "report.md").read_text()
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "run", "hello", "--max-new-tokens", "6")
    assert code == 0 and out.startswith("hello") and "skipped" in err
    code, _, err = run_cli(capsys, monkeypatch, "generate", "tiny-llama", "hello", "--max-new-tokens", "6",
                           "--no-skip")
    assert code == 0 and "every FFN block ran" in err
    code, _, err = run_cli(capsys, monkeypatch, "generate", "tiny-gpt2", "hello", "--policy", tmp_path / "run")
    assert_clean_failure(code, err, "calibrated for a different model")


@pytest.mark.parametrize("args, message", [
    (["skip", "calibrate", "tiny-llama", "--target", "1.2"], "outside (0, 1)"),
    (["skip", "calibrate", "tiny-llama", "--target", "0.2"], "cover all 2 layers"),
    (["skip", "calibrate", "tiny-llama", "--target", "0.6", "--cold-start", "0", "--cold-end", "0"], "at most 0.500"),
])
def test_cli_refuses_impossible_skip_requests_before_any_work(capsys, monkeypatch, tmp_path, args, message):
    from helpers import assert_clean_failure, run_cli

    code, _, err = run_cli(capsys, monkeypatch, *args, "--eval-windows", "2", "--out", tmp_path / "x")
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "x").exists() and "evaluating" not in err


def test_recipe_skip_stage(tmp_path):
    with pytest.raises(sf.SparseforgeError, match="must be the last stage"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"skip": {"target": 0.2}}, {"shrink": {"ffn": 0.2}}]})
    with pytest.raises(sf.SparseforgeError, match="unknown key 'stages.0.skip.ratio'"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"skip": {"ratio": 0.2}}]})
    recipe = sf.parse_recipe({
        "model": "tiny-mistral", "data": {"eval_windows": 2, "seqlen": 32},
        "stages": [{"shrink": {"ffn": 0.25}}, {"skip": {"target": 0.2, "cold_start": 0, "cold_end": 0, "k": 1,
                                                        "nsamples": 2, "prompt_tokens": 8, "new_tokens": 8}}],
        "evaluate": {"speed": True, "speed_new_tokens": 4, "speed_prompt_tokens": 8, "speed_repeats": 1}})
    report = sf.run_recipe(recipe, str(tmp_path / "run"), progress=False)
    assert "skip" in report["metrics"]["after"]["speed"]
    reloaded = load_model(str(tmp_path / "run"))
    assert reloaded.attachment("skip") is not None and reloaded.attachment("skip").policy.k == 1
