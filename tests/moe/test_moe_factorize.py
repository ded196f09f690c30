"""FactorLLM end to end on tiny models: the two training stages, saving and reloading the routers, the CLI and the
recipe stage, the cost model, and every refusal."""

from __future__ import annotations

import json

import pytest
import torch

import sparseforge as sf
from sparseforge.evaluation.macs import macs_per_token
from sparseforge.errors import CorruptCheckpointError, FactorizeError, StructureError
from sparseforge.export.saving import save_model
from sparseforge.models.loading import load_model
from sparseforge.models.surgery import keep_ffn_neurons, remove_sublayer
from sparseforge.moe import factorize, factorize_model, train_experts, train_routers
from sparseforge.moe.cost import ffn_macs_per_token, ideal_expert_speedups
from sparseforge.moe.storage import ROUTERS_FILE, SETTINGS_FILE
from sparseforge.retrain.trainer import TrainConfig
from sparseforge.models.attachments import AttachmentConflict
from sparseforge.skip import SkipPolicy, install_policy

WINDOWS = torch.randint(3, 250, (16, 24), generator=torch.Generator().manual_seed(0))
IDS = WINDOWS[:2]


def _config(steps: int, lr: float) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, batch=4, seqlen=24, warmup=0)


def _snapshot(handle) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in handle.model.named_parameters()}


def _ffn_names(handle) -> set[str]:
    return {f"{view.name}.{kind}" for layer in range(handle.adapter.num_blocks)
            for view in handle.adapter.ffn(layer).linears.values() for kind in ("weight", "bias")}


def test_stage_one_trains_only_the_routers_and_lowers_the_pa_loss(tiny_llama):
    routing = factorize(tiny_llama, experts=4, topk=1)
    before, routers_before = _snapshot(tiny_llama), [r.weight.detach().clone() for r in routing.routers]
    report = train_routers(tiny_llama, _config(40, 3e-2), WINDOWS, balance_weight=0.0, progress=False)
    assert report["losses"][-1] < report["losses"][0]
    assert all(torch.equal(p, before[name]) for name, p in _snapshot(tiny_llama).items())  # model untouched
    assert all(not torch.equal(r.weight, b) for r, b in zip(routing.routers, routers_before))
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())


def test_the_lm_only_router_needs_the_straight_through_gate(tiny_llama):
    routing = factorize(tiny_llama, experts=4, topk=1)
    with pytest.raises(FactorizeError, match="no loss that reaches the routers"):
        train_routers(tiny_llama, _config(2, 1e-2), WINDOWS, pa_weight=0, balance_weight=0, lm_weight=1.0,
                      progress=False)
    start = routing.routers[0].weight.detach().clone()
    train_routers(tiny_llama, _config(3, 1e-2), WINDOWS, pa_weight=0, balance_weight=0, lm_weight=1.0,
                  router_grad="straight_through", progress=False)
    assert not torch.equal(routing.routers[0].weight, start)


def test_stage_two_trains_only_the_experts_and_pruned_weights_stay_zero(tiny_llama):
    sf.prune(tiny_llama, method="magnitude", sparsity=0.5, progress=False)
    routing = factorize(tiny_llama, experts=2, topk=1)
    masks = {name: mask.clone() for name, mask in tiny_llama.masks.items()}
    before, routers_before = _snapshot(tiny_llama), [r.weight.detach().clone() for r in routing.routers]
    report = train_experts(tiny_llama, _config(4, 1e-2), WINDOWS, progress=False)
    after = _snapshot(tiny_llama)
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and changed <= _ffn_names(tiny_llama)
    assert all(torch.equal(r.weight, b) for r, b in zip(routing.routers, routers_before))
    for view in tiny_llama.adapter.linears():
        if view.name in masks:
            assert torch.equal(tiny_llama.masks[view.name], masks[view.name])
            assert not view.weight[~masks[view.name]].any()
    assert report["trainable"] == sum(before[name].numel() for name in changed)


def test_masks_are_permuted_with_the_neurons(tiny_llama):
    sf.prune(tiny_llama, method="magnitude", sparsity=0.5, progress=False)
    kept = {name: int(mask.sum()) for name, mask in tiny_llama.masks.items()}
    factorize(tiny_llama, experts=4, topk=4, partition="random")
    for view in tiny_llama.adapter.linears():
        mask = tiny_llama.masks[view.name]
        assert int(mask.sum()) == kept[view.name] and not view.weight[~mask].any()


def test_coactivation_groups_neurons_that_fire_together(tiny_llama):
    """Against contiguous experts, co-activation clustering concentrates each token's activation mass in fewer
    experts (what lets a router pick few of them)."""
    from sparseforge.moe.partition import activation_features

    activations = activation_features(tiny_llama, WINDOWS[:8])[0]  # [width, tokens]

    def top_expert_mass(groups):
        per_expert = torch.stack([activations[g].sum(0) for g in groups])  # [experts, tokens]
        return (per_expert.max(0).values / per_expert.sum(0)).mean()

    coactivation = factorize(load_model("tiny-llama"), 4, 1, "coactivation", calibration=WINDOWS[:8]).partitions[0]
    assert top_expert_mass(coactivation) > top_expert_mass(torch.arange(128).reshape(4, 32))


def test_factorize_model_records_the_budget_and_round_trips_through_save_and_load(tiny_llama, tmp_path):
    routing = factorize_model(tiny_llama, experts=4, topk=2, partition="coactivation", router_steps=3, expert_steps=2,
                              batch=2, seqlen=24, data=WINDOWS, progress=False)
    record = tiny_llama.history[-1]
    assert record["stage"] == "factorize" and len(record["losses"]["routers"]) == 3
    assert routing.settings.training["train_tokens"] == 5 * 2 * 24
    assert record["cost"]["ffn_macs_per_token"]["routed"] < record["cost"]["ffn_macs_per_token"]["dense"]
    logits = tiny_llama.model(input_ids=IDS).logits.detach()
    save_model(tiny_llama, tmp_path / "model")
    assert (tmp_path / "model" / SETTINGS_FILE).exists() and (tmp_path / "model" / ROUTERS_FILE).exists()
    reloaded = load_model(str(tmp_path / "model"))
    assert reloaded.attachment("experts") is not None and reloaded.attachment("experts").settings.topk == 2
    torch.testing.assert_close(reloaded.model(input_ids=IDS).logits.detach(), logits, rtol=0, atol=1e-5)
    # transformers alone loads the dense model: every expert active
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    reloaded.attachment("experts").remove()
    torch.testing.assert_close(plain(input_ids=IDS).logits.detach(), reloaded.model(input_ids=IDS).logits.detach(),
                               rtol=0, atol=1e-5)


def test_router_checkpoints_that_do_not_match_are_refused(tiny_llama, tmp_path):
    factorize_model(tiny_llama, experts=4, topk=1, router_steps=0, expert_steps=0, progress=False)
    save_model(tiny_llama, tmp_path / "model")
    settings_path = tmp_path / "model" / SETTINGS_FILE
    original = settings_path.read_text()
    # the weights changed after the routers were trained (another model's routers)
    settings = json.loads(original)
    settings["model"]["weights"] = "0" * 16
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(FactorizeError, match="trained for different weights"):
        load_model(str(tmp_path / "model"))
    # routers for another expert count
    settings = json.loads(original)
    settings["experts"] = 8
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(FactorizeError, match="does not match this model"):
        load_model(str(tmp_path / "model"))
    settings_path.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not a valid experts file"):
        load_model(str(tmp_path / "model"))
    settings_path.write_text(original)
    (tmp_path / "model" / ROUTERS_FILE).write_bytes(b"truncated")
    with pytest.raises(CorruptCheckpointError):
        load_model(str(tmp_path / "model"))
    (tmp_path / "model" / ROUTERS_FILE).unlink()
    settings_path.unlink()
    with pytest.raises(CorruptCheckpointError, match="router files .* are missing"):
        load_model(str(tmp_path / "model"))


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": 3}, "3 experts do not divide the FFN width 128"),
    ({"experts": 4, "topk": 0}, "between 1 and the number of routed experts"),
    ({"experts": 4, "topk": 5}, "between 1 and the number of routed experts"),
    ({"experts": 4, "topk": 4, "shared_expert": True}, "between 1 and the number of routed experts \\(3\\)"),
    ({"experts": 4, "partition": "spectral"}, "unknown partition 'spectral'"),
    ({"experts": 4, "partition": "coactivation"}, "give calibration tokens"),
])
def test_bad_requests_are_refused(tiny_llama, kwargs, message):
    with pytest.raises(FactorizeError, match=message):
        factorize(tiny_llama, **kwargs)
    assert tiny_llama.attachment("experts") is None


def test_factorizing_a_factorized_shrunk_skipping_or_ffn_less_model_is_refused(tmp_path):
    handle = load_model("tiny-llama")
    factorize(handle, experts=4, topk=1)
    with pytest.raises(FactorizeError, match="factorized into experts already"):
        factorize(handle, experts=2, topk=1)
    save_model(handle, tmp_path / "model")
    with pytest.raises(FactorizeError, match="factorized into experts already"):
        factorize(load_model(str(tmp_path / "model")), experts=2, topk=1)
    shrunk = load_model("tiny-llama")
    sf.shrink(shrunk, ffn=0.25, score="magnitude", progress=False)
    with pytest.raises(FactorizeError, match="structurally shrunk"):
        factorize(shrunk, experts=4, topk=1)
    skipping = load_model("tiny-llama")
    install_policy(skipping, SkipPolicy(threshold=1.01, cold_start=0, cold_end=0))
    with pytest.raises(AttachmentConflict, match="skip and experts both take over the FFN"):
        factorize(skipping, experts=4, topk=1)
    removed = load_model("tiny-llama")
    remove_sublayer(removed.adapter, 1, "ffn")
    with pytest.raises(FactorizeError, match="has no FFN"):
        factorize(removed, experts=4, topk=1)


def test_shrinking_or_skipping_a_factorized_model_is_refused():
    handle = load_model("tiny-llama")
    factorize(handle, experts=4, topk=1)
    with pytest.raises(StructureError, match="has experts attached"):
        sf.shrink(handle, ffn=0.25, score="magnitude", progress=False)
    with pytest.raises(AttachmentConflict, match="experts and skip both take over the FFN"):
        install_policy(handle, SkipPolicy(threshold=1.01, cold_start=0, cold_end=0))


def test_cost_counts_k_of_n_experts_plus_the_router(tiny_llama):
    dense = ffn_macs_per_token(tiny_llama.adapter)
    assert dense == 2 * 3 * 64 * 128
    routing = factorize(tiny_llama, experts=4, topk=1, shared_expert=True)
    assert ffn_macs_per_token(tiny_llama.adapter, routing) == 2 * (3 * 64 * 128 * 2 / 4 + 64 * 3)
    ideal = ideal_expert_speedups(tiny_llama.adapter, routing, 8, 4)
    saved = dense - ffn_macs_per_token(tiny_llama.adapter, routing)
    decode = macs_per_token(tiny_llama.adapter, 8 + 5 / 2)  # context: the prompt plus half the new tokens
    assert ideal["decode"] == pytest.approx(decode / (decode - saved))
    assert ideal["decode_macs_per_token"]["dense"] - ideal["decode_macs_per_token"]["routed"] == pytest.approx(saved)


def test_cli_factorize_then_generate_and_eval(capsys, monkeypatch, tmp_path):
    from helpers import assert_clean_failure, run_cli

    code, _, err = run_cli(capsys, monkeypatch, "factorize", "tiny-llama", "--experts", "4", "--topk", "1",
                           "--partition", "kmeans", "--router-steps", "2", "--expert-steps", "1", "--batch-size", "2",
                           "--seqlen", "16",
                           "--eval-windows", "2", "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["stage"] == "factorize"
    assert len(report["metrics"]["after"]["experts"]["per_layer"]) == 2
    assert (tmp_path / "run" / "expert_usage.png").exists() and (tmp_path / "run" / "retrain_loss.png").exists()
    assert "factorized into experts (factorllm)" in (tmp_path / "run" / "report.md").read_text()
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "run", "hello", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("hello") and "1 of 4 routed experts ran per token" in err
    code, _, err = run_cli(capsys, monkeypatch, "factorize", tmp_path / "run", "--experts", "2",
                           "--eval-windows", "2", "--out", tmp_path / "again")
    assert_clean_failure(code, err, "factorized into experts already")
    assert not (tmp_path / "again").exists() and "evaluating" not in err


@pytest.mark.parametrize("args, message", [
    (["--experts", "3"], "3 experts do not divide"),
    (["--experts", "4", "--topk", "5"], "topk must be between 1 and the number of routed experts"),
    (["--partition", "spectral"], "partition"),
])
def test_cli_refuses_bad_requests_before_any_work(capsys, monkeypatch, tmp_path, args, message):
    from helpers import assert_clean_failure, run_cli

    code, _, err = run_cli(capsys, monkeypatch, "factorize", "tiny-llama", *args, "--eval-windows", "2",
                           "--out", tmp_path / "x")
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "x").exists()


def test_recipe_factorize_stage(tmp_path):
    with pytest.raises(sf.SparseforgeError, match="must be the last stage"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"factorize": {}}, {"shrink": {"ffn": 0.2}}]})
    with pytest.raises(sf.SparseforgeError, match="unknown key 'stages.0.factorize.n_experts'"):
        sf.parse_recipe({"model": "tiny-llama", "stages": [{"factorize": {"n_experts": 4}}]})
    recipe = sf.parse_recipe({
        "model": "tiny-qwen2", "data": {"eval_windows": 2, "seqlen": 32},
        "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                   {"factorize": {"experts": 2, "topk": 1, "router_steps": 2, "expert_steps": 1, "batch": 2,
                                  "seqlen": 16}}],
        "evaluate": {"speed": True, "speed_new_tokens": 4, "speed_prompt_tokens": 8, "speed_repeats": 1}})
    report = sf.run_recipe(recipe, str(tmp_path / "run"), progress=False)
    assert "experts" in report["metrics"]["after"] and report["sparsity"]["overall"] > 0.45
    reloaded = load_model(str(tmp_path / "run" / "model"))
    assert reloaded.attachment("experts") is not None and reloaded.attachment("experts").settings.experts == 2


def test_keep_ffn_neurons_with_a_permutation_is_how_factorizing_reorders(tiny_llama):
    """The reordering primitive factorization uses changes nothing a model computes."""
    tiny_llama.model.double()
    dense = tiny_llama.model(input_ids=IDS).logits
    keep_ffn_neurons(tiny_llama.adapter, 0, torch.randperm(128, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(tiny_llama.model(input_ids=IDS).logits, dense, rtol=0, atol=1e-10)
