"""Structured pruning: shape surgery on every family, width pruning, FinerCut, block removal, export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import sparseforge as sf
from sparseforge.errors import CorruptCheckpointError, RetrainError, StructureError
from sparseforge.evaluation.macs import ideal_speedups, macs_per_token
from sparseforge.models.loading import load_model
from sparseforge.models.structure import STRUCTURE_KEY
from sparseforge.models.surgery import attention_heads, ffn_width, keep_ffn_neurons, keep_heads, remove_sublayer
from sparseforge.structured.blocks import choose_blocks
from sparseforge.structured.divergence import Reference
from sparseforge.structured.finercut import _Zeroed

DATA = torch.randint(3, 250, (8, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(1))
QUIET = {"progress": False}


def logits(handle, ids=IDS):
    with torch.no_grad():
        return handle.model(input_ids=ids).logits


def zero_output_columns(handle, index: int, kind: str, channels: list[int]) -> None:
    """The masked equivalent of removing channels: zero those input columns of the output projection."""
    adapter = handle.adapter
    sub = adapter.ffn(index) if kind == "ffn" else adapter.attention(index)
    role = adapter.spec.ffn_output_role if kind == "ffn" else adapter.spec.attention_output_role
    with torch.no_grad():
        sub.linears[role].weight[:, channels] = 0


def test_logits_from_hidden_reproduce_the_model(tiny):
    adapter = tiny.adapter
    hidden, kwargs = adapter.capture_inputs_per_block(IDS)
    with torch.no_grad():
        for index in range(adapter.num_blocks):
            hidden = adapter.run_block(index, hidden, kwargs[index])
        assert torch.allclose(adapter.logits_from_hidden(hidden), logits(tiny), atol=1e-5)


def test_removing_neurons_equals_zeroing_them(tiny):
    reference = load_model(tiny.source)
    removed = [1, 5, 6, 40, 127]
    zero_output_columns(reference, 0, "ffn", removed)
    keep_ffn_neurons(tiny.adapter, 0, torch.tensor([i for i in range(128) if i not in removed]))
    assert ffn_width(tiny.adapter, 0) == 123
    assert torch.allclose(logits(tiny), logits(reference), atol=1e-5)


@pytest.mark.parametrize("unit", ["within", "group"])
def test_removing_heads_equals_zeroing_them(tiny, unit):
    adapter = tiny.adapter
    reference = load_model(tiny.source)
    queries, kvs = attention_heads(adapter, 1)
    head_dim = adapter.head_geometry().head_dim
    group = queries // kvs
    if unit == "group" or group == 1:
        kept_kv = [kvs - 1]
        kept_q = [kvs - 1] if group == 1 else [(kvs - 1) * group + h for h in range(group)]
    else:
        kept_kv, kept_q = list(range(kvs)), [g * group + 1 for g in range(kvs)]
    removed = [h * head_dim + d for h in range(queries) if h not in kept_q for d in range(head_dim)]
    zero_output_columns(reference, 1, "attention", removed)
    if unit == "group" and group > 1:  # whole groups: their keys/values go too, which no zeroing of o shows
        keep_heads(adapter, 1, kept_q, kept_kv)
        assert attention_heads(adapter, 1) == (group, 1)
        return
    keep_heads(adapter, 1, kept_q, kept_kv)
    assert attention_heads(adapter, 1) == (len(kept_q), len(kept_kv))
    assert torch.allclose(logits(tiny), logits(reference), atol=1e-5)


def test_whole_group_removal_keeps_the_surviving_groups_exact(tiny_llama):
    """Removing a key/value group equals a model where that group's heads contribute nothing (GQA stays valid)."""
    reference = load_model("tiny-llama")
    adapter = tiny_llama.adapter
    head_dim = adapter.head_geometry().head_dim
    zero_output_columns(reference, 0, "attention", list(range(2 * head_dim)))  # query heads 0, 1 = group 0
    keep_heads(adapter, 0, [2, 3], [1])
    assert torch.allclose(logits(tiny_llama), logits(reference), atol=1e-5)


def test_a_removed_sublayer_is_the_residual_path(tiny):
    adapter = tiny.adapter
    reference = load_model(tiny.source)
    hidden, kwargs = reference.adapter.capture_block_inputs(IDS)
    with _Zeroed(reference.adapter, 0, "attention"):
        with torch.no_grad():
            expected = reference.adapter.run_block(0, hidden, kwargs)
    remove_sublayer(adapter, 0, "attention")
    assert adapter.is_removed(0, "attention") and not adapter.is_removed(0, "ffn")
    with torch.no_grad():
        assert torch.allclose(adapter.run_block(0, hidden, kwargs), expected, atol=1e-5)
        remove_sublayer(adapter, 0, "ffn")
        assert torch.equal(adapter.run_block(0, hidden, kwargs), hidden)  # both gone: the block is the identity
    assert adapter.block_linears(0) == {}
    assert all(view.block == 1 for view in adapter.linears())


def test_generation_with_removed_attention_matches_uncached_greedy(tiny):
    """The KV cache stays consistent when whole attention sub-layers (block 0 included) are gone."""
    remove_sublayer(tiny.adapter, 0, "attention")
    remove_sublayer(tiny.adapter, 1, "ffn")
    prompt = IDS[:1, :8]
    generated = tiny.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sequence = prompt
    for _ in range(6):
        step = tiny.model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, step], 1)
    assert torch.equal(generated, sequence)


def test_ratio_zero_changes_nothing(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    expected = logits(tiny)
    sf.shrink(tiny, ffn=0.0, heads=0.0, calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    assert torch.equal(logits(tiny), expected)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_uniform_shrink_loads_with_plain_transformers(tiny, tmp_path):
    sf.shrink(tiny, ffn=0.25, heads=0.5 if tiny.adapter.spec.head_dim_attr else 0.0, calibration=DATA, nsamples=4,
              seqlen=16, **QUIET)
    record = tiny.history[-1]
    assert record["transformers_loadable"]
    assert record["parameters"]["after"] < record["parameters"]["before"]
    expected = logits(tiny)
    sf.save_model(tiny, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, expected)
    assert torch.equal(logits(load_model(str(tmp_path / "m"))), expected)


def test_non_uniform_structure_reloads_through_sparseforge(tiny, tmp_path):
    sf.shrink(tiny, ffn=[0.5, 0.25], heads=[0.0, 0.5], score="wanda", compensate=True, calibration=DATA,
              nsamples=4, seqlen=16, **QUIET)
    sf.finercut(tiny, remove=1, calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    assert not tiny.history[-1]["transformers_loadable"]
    expected = logits(tiny)
    sf.save_model(tiny, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config[STRUCTURE_KEY]["blocks"] == tiny.history[-1]["blocks"]
    assert {b["ffn"] for b in config[STRUCTURE_KEY]["blocks"]} - {0} <= {64, 96}
    reloaded = load_model(str(tmp_path / "m"))
    assert torch.equal(logits(reloaded), expected)
    assert sum(p.numel() for p in reloaded.model.parameters()) == sum(p.numel() for p in tiny.model.parameters())


def test_a_structure_that_disagrees_with_the_tensors_is_refused(tiny_llama, tmp_path):
    sf.shrink(tiny_llama, ffn=[0.5, 0.25], calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    sf.save_model(tiny_llama, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config[STRUCTURE_KEY]["blocks"][0]["ffn"] = 80
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="does not match its config and recorded structure"):
        load_model(str(tmp_path / "m"))
    config[STRUCTURE_KEY]["blocks"] = config[STRUCTURE_KEY]["blocks"][:1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="lists 1 blocks"):
        load_model(str(tmp_path / "m"))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ratios=st.lists(st.floats(0.0, 0.8), min_size=2, max_size=2), multiple=st.sampled_from([1, 8]),
       score=st.sampled_from(["magnitude", "wanda", "fluctuation"]))
def test_kept_widths_follow_ratios_and_multiples(ratios, multiple, score):
    handle = load_model("tiny-qwen2")
    sf.shrink(handle, ffn=ratios, score=score, round_to=multiple, calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    for index, ratio in enumerate(ratios):
        expected = min(128, multiple * round(128 * (1 - ratio) / multiple))
        assert ffn_width(handle.adapter, index) == expected and expected % multiple == 0
    assert torch.isfinite(logits(handle)).all()


def test_compensation_lowers_the_ffn_output_error(tiny_llama):
    """Replacing removed neurons by their mean contribution is never worse on the data it was measured on."""
    errors = {}
    reference = load_model("tiny-llama")
    hidden, _ = reference.adapter.capture_block_inputs(DATA)
    ffn_input = reference.adapter.ffn(0).norms["input"](hidden)
    with torch.no_grad():
        expected = reference.adapter.ffn(0).module(ffn_input)
        for compensate in (False, True):
            handle = load_model("tiny-llama")
            sf.shrink(handle, ffn=[0.5, 0.0], compensate=compensate, calibration=DATA, nsamples=8, seqlen=24, **QUIET)
            errors[compensate] = float((handle.adapter.ffn(0).module(ffn_input) - expected).pow(2).mean())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("kwargs, message", [
    ({"ffn": 1.0}, "outside [0, 1)"),
    ({"ffn": -0.1}, "outside [0, 1)"),
    ({"ffn": [0.1]}, "1 values for a model with 2 blocks"),
    ({"ffn": 0.95, "round_to": 64}, "would leave none"),
    ({"heads": 0.9}, "leaves none"),
    ({"heads": 0.8, "head_unit": "group"}, "key/value groups leaves none"),
    ({"score": "taylor"}, "unknown importance score"),
    ({"head_unit": "pairs"}, "unknown head unit"),
])
def test_bad_shrink_requests_are_refused_untouched(tiny_llama, kwargs, message):
    expected = logits(tiny_llama)
    with pytest.raises(StructureError, match=message.replace("[", r"\[").replace(")", r"\)")):
        sf.shrink(tiny_llama, calibration=DATA, nsamples=4, seqlen=16, **QUIET, **kwargs)
    assert torch.equal(logits(tiny_llama), expected)


def test_a_pruned_model_is_refused(tiny_llama):
    sf.prune(tiny_llama, method="magnitude", sparsity=0.5, progress=False)
    for call in (lambda: sf.shrink(tiny_llama, ffn=0.25, **QUIET), lambda: sf.finercut(tiny_llama, remove=1, **QUIET),
                 lambda: sf.remove_blocks(tiny_llama, count=1, **QUIET)):
        with pytest.raises(StructureError, match="has pruning masks"):
            call()


def test_finercut_records_order_curve_and_resumes(tmp_path):
    fresh = load_model("tiny-opt")
    sf.finercut(fresh, remove=3, calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    order = [(r["block"], r["kind"]) for r in fresh.history[-1]["removed"]]
    assert len(order) == len(set(order)) == 3
    curve = [r["divergence"] for r in fresh.history[-1]["removed"]]
    assert all(value >= 0 for value in curve)
    # an interrupted search (here: one that stopped after 1 removal) resumes to the same order
    partial = load_model("tiny-opt")
    sf.finercut(partial, remove=1, calibration=DATA, nsamples=4, seqlen=16, checkpoint_dir=tmp_path, **QUIET)
    resumed = load_model("tiny-opt")
    sf.finercut(resumed, remove=3, calibration=DATA, nsamples=4, seqlen=16, checkpoint_dir=tmp_path, **QUIET)
    assert [(r["block"], r["kind"]) for r in resumed.history[-1]["removed"]] == order
    assert torch.equal(logits(resumed), logits(fresh))
    shorter = load_model("tiny-opt")  # a longer search's checkpoint serves a shorter one
    sf.finercut(shorter, remove=2, calibration=DATA, nsamples=4, seqlen=16, checkpoint_dir=tmp_path, **QUIET)
    assert [(r["block"], r["kind"]) for r in shorter.history[-1]["removed"]] == order[:2]
    with pytest.raises(StructureError, match="other settings"):
        sf.finercut(load_model("tiny-opt"), remove=2, distance_name="kl", calibration=DATA, nsamples=4, seqlen=16,
                    checkpoint_dir=tmp_path, **QUIET)


def test_finercut_greedy_choice_is_the_minimum(tiny_llama):
    """The first removal is the candidate whose removal alone diverges least (checked by brute force)."""
    reference = load_model("tiny-llama")
    windows = DATA[:4, :16]
    target = Reference("js", logits(reference, windows))
    scores = {}
    for index in range(2):
        for kind in ("attention", "ffn"):
            with _Zeroed(reference.adapter, index, kind):
                scores[(index, kind)] = target.distance(logits(reference, windows))
    sf.finercut(tiny_llama, remove=1, calibration=windows, nsamples=4, seqlen=16, batch_size=2, **QUIET)
    chosen = tiny_llama.history[-1]["removed"][0]
    assert (chosen["block"], chosen["kind"]) == min(scores, key=scores.get)
    assert chosen["divergence"] == pytest.approx(min(scores.values()), rel=1e-4)


@pytest.mark.parametrize("name", ["js", "js_reference", "kl", "l2", "angular"])
def test_distances_are_zero_for_identical_and_positive_otherwise(name):
    a, b = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    reference = Reference(name, a)
    assert reference.distance(a) == pytest.approx(0.0, abs=1e-3 if name == "angular" else 1e-5)  # arccos near 1
    assert reference.distance(b) > 1e-3
    if name == "js":
        assert reference.distance(b) <= torch.log(torch.tensor(2.0)).item() + 1e-6


def test_finercut_bad_targets_are_refused(tiny_llama):
    for remove, message in ((5, "only 4 candidates"), (1.5, "count of sub-layers"), (-1, "positive count")):
        with pytest.raises(StructureError, match=message):
            sf.finercut(tiny_llama, remove=remove, calibration=DATA, **QUIET)
    with pytest.raises(StructureError, match="unknown distance"):
        sf.finercut(tiny_llama, remove=1, distance_name="cosine", calibration=DATA, **QUIET)


def test_block_removal_by_count_and_budget(tiny_llama):
    assert choose_blocks([0.1, 0.9, 0.5], [10, 10, 10], count=2, parameters=None) == [1, 2]
    assert choose_blocks([0.1, 0.9, 0.5], [10, 10, 10], count=None, parameters=14) == [1]
    assert choose_blocks([0.1, 0.9, 0.5], [10, 10, 10], count=None, parameters=16) == [1, 2]
    sf.remove_blocks(tiny_llama, count=1, calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    index = tiny_llama.history[-1]["removed"][0]["block"]
    assert tiny_llama.adapter.is_removed(index, "attention") and tiny_llama.adapter.is_removed(index, "ffn")
    with pytest.raises(StructureError, match="at least one must remain"):
        sf.remove_blocks(load_model("tiny-llama"), count=2, calibration=DATA, **QUIET)


def test_ideal_speedup_counts_removed_multiply_accumulates(tiny_llama):
    dense = load_model("tiny-llama")
    assert ideal_speedups(dense.adapter, tiny_llama.adapter, 16, 8)["decode"] == 1.0
    before = macs_per_token(tiny_llama.adapter, 10)
    keep_ffn_neurons(tiny_llama.adapter, 0, torch.arange(64))
    assert before - macs_per_token(tiny_llama.adapter, 10) == 3 * 64 * 64  # gate, up, down lose 64 of 128 neurons
    remove_sublayer(tiny_llama.adapter, 1, "attention")
    head_dim = dense.adapter.head_geometry().head_dim
    attention_macs = (64 * 4 * head_dim) * 2 + (64 * 2 * head_dim) * 2 + 2 * 4 * head_dim * 10
    assert before - macs_per_token(tiny_llama.adapter, 10) == 3 * 64 * 64 + attention_macs
    assert ideal_speedups(dense.adapter, tiny_llama.adapter, 16, 8)["decode"] > 1.0


def test_perp_recovers_a_shrunk_model_but_a_dense_one_is_refused(tiny_llama):
    with pytest.raises(RetrainError, match="was not shrunk"):
        sf.retrain(load_model("tiny-llama"), method="perp", steps=1, batch=2, seqlen=16, data=DATA, progress=False)
    sf.shrink(tiny_llama, ffn=0.25, calibration=DATA, nsamples=4, seqlen=16, **QUIET)
    sf.retrain(tiny_llama, method="perp", params=["norm", "lora"], lora={"rank": 4}, steps=2, batch=2, seqlen=16,
               data=DATA, progress=False)
    assert tiny_llama.history[-1]["stage"] == "retrain"
    assert ffn_width(tiny_llama.adapter, 0) == 96 and not tiny_llama.masks


def test_cli_shrink_and_finercut_end_to_end(capsys, monkeypatch, tmp_path):
    from helpers import run_cli

    code, out, err = run_cli(capsys, monkeypatch, "shrink", "tiny-llama", "--ffn", "0.25", "--heads", "0.5",
                             "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--out", tmp_path / "s")
    assert code == 0, err
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    before, after = (report["metrics"][k]["parameters"]["total"] for k in ("before", "after"))
    assert after < before and report["stages"][0]["parameters"] == {
        "before": before, "after": after, "removed_fraction": pytest.approx(1 - after / before)}
    assert (tmp_path / "s" / "structure.png").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "model").config.intermediate_size == 96
    code, out, err = run_cli(capsys, monkeypatch, "finercut", "tiny-gpt2", "--remove", "0.5", "--nsamples", "4",
                             "--seqlen", "16", "--eval-seqlen", "32", "--eval-windows", "2", "--out", tmp_path / "f")
    assert code == 0, err
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert len(report["stages"][0]["removed"]) == 2
    assert (tmp_path / "f" / "finercut_divergence.png").exists() and "removed in this order" in \
        (tmp_path / "f" / "report.md").read_text()
    reloaded = load_model(str(tmp_path / "f"))
    assert sum(reloaded.adapter.is_removed(i, k) for i in range(2) for k in ("attention", "ffn")) == 2


@pytest.mark.parametrize("args, message", [
    (["shrink", "tiny-llama", "--ffn", "1.2"], "outside [0, 1)"),
    (["shrink", "tiny-llama", "--ffn", "a,b"], "comma-separated list of fractions"),
    (["finercut", "tiny-llama", "--remove", "9"], "only 4 candidates"),
    (["finercut", "tiny-llama", "--distance", "cos"], "distance"),
])
def test_cli_refuses_bad_structural_requests(capsys, monkeypatch, tmp_path, args, message):
    from helpers import assert_clean_failure, run_cli

    code, _, err = run_cli(capsys, monkeypatch, *args, "--nsamples", "4", "--out", tmp_path / "x")
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "x").exists()


def test_recipe_with_shrink_finercut_and_perp(tmp_path):
    recipe = sf.parse_recipe({
        "model": "tiny-mistral", "data": {"nsamples": 4, "seqlen": 32, "eval_windows": 2},
        "stages": [{"shrink": {"ffn": 0.25, "heads": [0.5, 0.0]}}, {"finercut": {"remove": 1, "nsamples": 4,
                                                                                 "seqlen": 16}},
                   {"retrain": {"method": "perp", "steps": 2, "batch": 2, "seqlen": 16, "lora": {"rank": 4}}}],
        "evaluate": {"speed": True, "speed_new_tokens": 4, "speed_prompt_tokens": 8, "speed_repeats": 1}})
    report = sf.run_recipe(recipe, str(tmp_path / "run"), progress=False)
    assert [s["stage"] for s in report["stages"]] == ["shrink", "finercut", "retrain"]
    assert report["metrics"]["after"]["parameters"]["total"] < report["metrics"]["before"]["parameters"]["total"]
    reloaded = load_model(str(tmp_path / "run"))
    assert sum(reloaded.adapter.is_removed(i, k) for i in range(2) for k in ("attention", "ffn")) == 1
    with pytest.raises(sf.SparseforgeError, match="unknown key 'stages.0.shrink.neurons'"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"shrink": {"neurons": 0.2}}]})
    with pytest.raises(sf.SparseforgeError, match="outside"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"shrink": {"ffn": [0.2, 1.5]}}]})
    with pytest.raises(sf.SparseforgeError, match="must come before pruning"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"prune": {"sparsity": 0.5}}, {"finercut": {}}]})


def test_impossible_structural_stages_fail_before_evaluation(tmp_path, monkeypatch):
    import sparseforge.pipeline as pipeline

    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: pytest.fail("evaluated before refusing"))
    for stage, message in (({"shrink": {"ffn": [0.1, 0.2, 0.3]}}, "3 values for a model with 2 blocks"),
                           ({"finercut": {"remove": 5}}, "only 4 candidates"),
                           ({"finercut": {"remove": 2, "unit": "block"}}, "at least one must remain")):
        recipe = sf.parse_recipe({"model": "tiny-llama", "stages": [stage]})
        with pytest.raises(StructureError, match=message):
            sf.run_recipe(recipe, str(tmp_path / "run"), progress=False)
        assert not (tmp_path / "run").exists()
