"""Recovery training: exact sparsity after merging every adapter variant, reconstruction, baselines, and faults."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.errors import RetrainError
from sparseforge.models.loading import load_model
from sparseforge.retrain.data import batch_for_step
from sparseforge.retrain.lora import Adapters, LoRAConfig
from sparseforge.retrain.selection import select_parameters
from sparseforge.retrain.trainer import TrainConfig, train
from sparseforge.sparsity.masks import check_masks_hold, is_valid_nm, sparsity_of

DATA = torch.randint(3, 250, (24, 16), generator=torch.Generator().manual_seed(0))
TRAIN = dict(steps=3, batch=2, seqlen=16, data=DATA, progress=False)


def pruned(name: str = "tiny-llama", **prune_options):
    handle = load_model(name)
    sf.prune(handle, **({"method": "magnitude", "sparsity": 0.5} | prune_options), progress=False)
    return handle


def logits(handle, ids=DATA[:2]):
    with torch.no_grad():
        return handle.model(input_ids=ids).logits


def assert_pattern_kept(handle, masks_before, nm=None):
    assert set(handle.masks) == set(masks_before)
    assert check_masks_hold(handle.adapter, masks_before) == []
    for view in handle.adapter.linears():
        kept = view.weight.detach() != 0
        assert torch.equal(kept, masks_before[view.name] & kept)  # nothing pruned came back
        assert sparsity_of(kept) >= sparsity_of(masks_before[view.name]) - 1e-12
        if nm:
            assert is_valid_nm(kept, *nm)


@pytest.mark.parametrize("variant", ["mask", "scale", "prune_at_merge"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_merge_keeps_the_exact_sparsity_pattern(tiny, variant, pattern):
    sf.prune(tiny, method="magnitude", sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
             progress=False)
    before = {name: mask.clone() for name, mask in tiny.masks.items()}
    sf.retrain(tiny, params=["bias", "norm", "lora"], lora={"variant": variant, "rank": 4}, lr=1e-2, **TRAIN)
    record = tiny.history[-1]
    assert record["sparsity_preserved"] is True
    assert record["training"]["loss_last"] != record["training"]["loss_first"]  # it really trained
    assert_pattern_kept(tiny, before, (2, 4) if pattern == "2:4" else None)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sparsity=st.floats(0.1, 0.9), rank=st.integers(1, 8), alpha=st.floats(0.5, 64),
       variant=st.sampled_from(["mask", "scale"]))
def test_merged_model_is_the_trained_model(sparsity, rank, alpha, variant):
    """MaskLoRA and ScaleLoRA merge exactly the weight they trained: logits before and after merging agree."""
    handle = pruned(sparsity=sparsity)
    before = {name: mask.clone() for name, mask in handle.masks.items()}
    selection = select_parameters(handle, ["lora"], LoRAConfig(variant, rank, alpha))
    with torch.no_grad():
        for p in selection.all():
            p.add_(torch.randn_like(p) * 0.1)
    trained = logits(handle)
    selection.adapters.merge()
    torch.testing.assert_close(logits(handle), trained, rtol=1e-5, atol=1e-5)
    assert_pattern_kept(handle, before)


def test_scale_lora_starts_at_the_pruned_model():
    handle = pruned()
    reference = logits(handle)
    selection = select_parameters(handle, ["lora"], LoRAConfig("scale", 4))
    torch.testing.assert_close(logits(handle), reference, rtol=1e-5, atol=1e-5)
    selection.adapters.merge()


def test_plain_lora_is_merged_dense_and_says_so():
    handle = pruned()
    selection = select_parameters(handle, ["lora"], LoRAConfig("plain", 4))
    with torch.no_grad():
        for p in selection.all():
            p.add_(0.05)
    trained = logits(handle)
    report = selection.adapters.merge()
    torch.testing.assert_close(logits(handle), trained, rtol=1e-5, atol=1e-5)
    assert report["densified_layers"] == len(list(handle.adapter.linears()))
    assert handle.masks == {}  # the masks would be a lie now


def test_prune_at_merge_masks_the_delta():
    handle = pruned()
    before = {name: mask.clone() for name, mask in handle.masks.items()}
    view = next(handle.adapter.linears())
    weight = view.weight.detach().clone()
    selection = select_parameters(handle, ["lora"], LoRAConfig("prune_at_merge", 4, 8.0))
    with torch.no_grad():
        for p in selection.all():
            p.add_(0.05)
    wrapper = next(m for m in handle.model.modules() if hasattr(m, "lora_A") and m.get_base_layer() is view.module)
    delta = 2.0 * (wrapper.lora_B["default"].weight @ wrapper.lora_A["default"].weight)
    selection.adapters.merge()
    torch.testing.assert_close(view.weight.detach(), weight + delta * before[view.name])
    assert_pattern_kept(handle, before)


def test_lm_head_lora_unties_embeddings_and_reloads(tmp_path):
    handle = pruned()
    assert handle.adapter.tied_embeddings()
    embedding = handle.adapter.embed_tokens().weight.detach().clone()
    sf.retrain(handle, params=["norm", "lm_head"], lr=1e-2, **TRAIN)
    assert handle.history[-1]["merge"]["lm_head_untied"]
    assert not handle.adapter.tied_embeddings()
    assert torch.equal(handle.adapter.embed_tokens().weight, embedding)
    assert not torch.equal(handle.adapter.lm_head().weight, embedding)
    sf.save_model(handle, tmp_path / "model")
    torch.testing.assert_close(logits(load_model(str(tmp_path / "model"))), logits(handle))


def test_trainable_fractions_are_reported_per_group():
    llama = pruned()
    selection = select_parameters(llama, ["bias", "norm"])
    norms = sum(p.numel() for m in llama.adapter.norms().values() for p in m.parameters())
    described = selection.describe()
    assert described["by_group"] == {"bias": 0, "norm": norms}
    assert described["fraction"] == pytest.approx(norms / sum(p.numel() for p in llama.model.parameters()))
    assert any("no biases" in note for note in described["notes"])
    opt = pruned("tiny-opt")
    assert select_parameters(opt, ["bias"]).describe()["by_group"]["bias"] > 0


def test_perp_trains_only_the_chosen_parameters():
    handle = pruned()
    frozen = {n: p.detach().clone() for n, p in handle.model.named_parameters() if "norm" not in n}
    sf.retrain(handle, params=["norm"], lr=1e-2, **TRAIN)
    for name, value in frozen.items():
        assert torch.equal(dict(handle.model.named_parameters())[name], value), name
    assert handle.history[-1]["trainable"]["by_group"]["norm"] > 0


def test_full_masked_retraining_keeps_pruned_weights_at_zero():
    handle = pruned(method="magnitude", pattern="2:4", sparsity=None)
    before = {name: mask.clone() for name, mask in handle.masks.items()}
    dense_weights = {v.name: v.weight.detach().clone() for v in handle.adapter.linears()}
    sf.retrain(handle, method="full", lr=1e-2, **TRAIN)
    assert_pattern_kept(handle, before, (2, 4))
    assert any(not torch.equal(v.weight.detach(), dense_weights[v.name]) for v in handle.adapter.linears())
    assert handle.history[-1]["trainable"]["fraction"] == 1.0


def test_imp_reaches_its_target_in_rounds():
    handle = load_model("tiny-opt")
    sf.retrain(handle, method="imp", imp={"sparsity": 0.7, "rounds": 3}, **(TRAIN | {"steps": 4}))
    rounds = handle.history[-1]["rounds"]
    assert [r["sparsity"] for r in rounds] == sorted(r["sparsity"] for r in rounds)
    assert rounds[-1]["sparsity"] == pytest.approx(0.7)
    for view in handle.adapter.linears():
        assert sparsity_of(handle.masks[view.name]) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reconstruction_lowers_block_error_and_keeps_the_pattern(family):
    handle = load_model(f"tiny-{family}")
    sf.prune(handle, method="wanda", pattern="2:4", calibration=DATA, nsamples=8, seqlen=16, progress=False,
             reconstruct={"steps": 10, "lr": 1e-3, "lora": {"rank": 4}})
    record = handle.history[-1]["reconstruction"]
    assert record["mse_after_sum"] < record["mse_before_sum"]
    assert len(record["blocks"]) == handle.adapter.num_blocks
    for view in handle.adapter.linears():
        assert is_valid_nm(view.weight.detach() != 0, 2, 4)
        assert check_masks_hold(handle.adapter, handle.masks) == []


def test_reconstruction_resumes_exactly(tmp_path):
    options = dict(method="wanda", sparsity=0.5, calibration=DATA, nsamples=8, seqlen=16, progress=False,
                   reconstruct={"steps": 3, "lr": 1e-2, "lora": {"rank": 4}}, checkpoint_dir=tmp_path / "ckpt")
    reference = load_model("tiny-llama")
    sf.prune(reference, **(options | {"checkpoint_dir": None}))

    def stop(index):
        raise KeyboardInterrupt

    interrupted = load_model("tiny-llama")
    with pytest.raises(KeyboardInterrupt):
        sf.prune(interrupted, **options, after_block=stop)
    resumed = load_model("tiny-llama")
    sf.prune(resumed, **options)
    assert resumed.history[-1]["resumed_from_block"] == 1
    for (name, a), b in zip(reference.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def _reference_and_interrupted(options: dict, after_step: int):
    """A run trained without checkpoints, and a checkpointed run of the same job interrupted after ``after_step``."""
    reference = pruned()
    sf.retrain(reference, **(options | {"checkpoint_dir": None}))

    def interrupt(step):
        if step == after_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sf.retrain(pruned(), **options, on_step=interrupt)
    return reference


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    options = TRAIN | {"steps": 6, "lr": 1e-2, "checkpoint_every": 2, "checkpoint_dir": tmp_path / "ckpt"}
    reference = _reference_and_interrupted(options, after_step=3)
    resumed = pruned()
    sf.retrain(resumed, **options)
    assert resumed.history[-1]["training"]["resumed_from_step"] == 4
    assert resumed.history[-1]["training"]["losses"] == reference.history[-1]["training"]["losses"]
    torch.testing.assert_close(logits(resumed), logits(reference))
    assert not (tmp_path / "ckpt").exists()  # removed once training finished


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt"])
def test_damaged_training_checkpoint_is_trained_again_not_used(tmp_path, capfd, damaged):
    options = TRAIN | {"steps": 4, "lr": 1e-2, "checkpoint_every": 2, "checkpoint_dir": tmp_path / "ckpt"}
    reference = _reference_and_interrupted(options, after_step=2)
    path = tmp_path / "ckpt" / damaged
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    resumed = pruned()
    sf.retrain(resumed, **options)
    assert "training again from step 0" in capfd.readouterr().err
    assert not resumed.history[-1]["training"].get("resumed_from_step")
    assert resumed.history[-1]["training"]["losses"] == reference.history[-1]["training"]["losses"]


def test_non_finite_loss_restores_the_last_good_state():
    weight = torch.nn.Parameter(torch.ones(3))
    seen = []

    def loss_of_step(step):
        seen.append(weight.detach().clone())
        return (weight.sum() * (float("nan") if step == 2 else 1.0))

    report = train([weight], loss_of_step, TrainConfig(steps=5, lr=0.1, warmup=0.0), torch.nn.Module(),
                   progress=False)
    assert report["steps_done"] == 2 and "non-finite" in report["stopped"]
    assert torch.equal(weight.detach(), seen[1])  # the parameters that gave the last finite loss


def test_diverging_learning_rate_stops_with_a_finite_model():
    handle = pruned()
    sf.retrain(handle, method="full", lr=1e12, **(TRAIN | {"steps": 6}))
    record = handle.history[-1]
    assert record["training"]["stopped"] is not None
    assert all(torch.isfinite(p).all() for p in handle.model.parameters())
    assert torch.isfinite(logits(handle)).all()


def test_bad_requests_are_refused_before_anything_changes():
    dense = load_model("tiny-llama")
    with pytest.raises(RetrainError, match="no pruned weights"):
        sf.retrain(dense, **TRAIN)
    handle = pruned()
    weights = copy.deepcopy(handle.model.state_dict())
    for bad, match in [({"lora": {"rank": 65}}, "rank 65 is larger"), ({"lora": {"variant": "dora"}}, "unknown LoRA"),
                       ({"params": ["embeddings"]}, "unknown parameter group"), ({"method": "reconstruct"}, "inside"),
                       ({"lr": float("nan")}, "learning rate"), ({"method": "sgd"}, "unknown retraining method")]:
        with pytest.raises(RetrainError, match=match):
            sf.retrain(handle, **(TRAIN | bad))
        for name, value in handle.model.state_dict().items():
            assert torch.equal(value, weights[name]), name
    with pytest.raises(RetrainError, match="dense"):
        sf.prune(load_model("tiny-llama"), calibration=DATA, nsamples=4, seqlen=16, progress=False,
                 reconstruct={"lora": {"variant": "plain"}})
    with pytest.raises(RetrainError, match="unknown reconstruct option"):
        sf.prune(load_model("tiny-llama"), calibration=DATA, nsamples=4, seqlen=16, progress=False,
                 reconstruct={"step": 3})


def test_training_batches_are_a_function_of_the_step():
    windows = torch.arange(10).unsqueeze(1).repeat(1, 4)
    epoch = torch.cat([batch_for_step(windows, step, 2, seed=1) for step in range(5)])[:, 0]
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch visits every window once
    assert torch.equal(batch_for_step(windows, 7, 2, 1), batch_for_step(windows, 7, 2, 1))
    assert not torch.equal(torch.cat([batch_for_step(windows, s, 2, 1) for s in range(5)]),
                           torch.cat([batch_for_step(windows, s, 2, 1) for s in range(5, 10)]))


def test_adapters_reject_a_rank_above_the_layer_width():
    handle = pruned()
    views = list(handle.adapter.linears())
    with pytest.raises(RetrainError, match="at most 64"):
        Adapters(handle, views, LoRAConfig("mask", 100))
