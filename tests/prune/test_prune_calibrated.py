"""Calibrated one-shot pruning: Wanda, SparseGPT, OWL, DSnoT through the layer-sequential pipeline."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import DataError, PatternError
from sparseforge.models.loading import load_model
from sparseforge.calibration.checkpoint import CheckpointMismatchError
from sparseforge.prune.pruner import prune
from sparseforge.sparsity.masks import is_valid_nm

METHODS = ["magnitude", "wanda", "sparsegpt"]


def windows(n=6, seqlen=24, seed=0):
    return torch.randint(0, 259, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def weights(handle):
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("refine, order", [(None, "sublayer"), ("dsnot", "sublayer"), ("dsnot", "block")])
def test_unstructured_counts_are_exact(tiny, method, refine, order):
    prune(tiny, method=method, sparsity=0.6, refine=refine, calibration=windows(), batch_size=4, order=order,
          progress=False)
    per_row = method == "wanda"
    for view in tiny.adapter.linears():
        mask = tiny.masks[view.name]
        assert torch.equal(view.weight.detach() != 0, mask) or bool((view.weight.detach()[~mask] == 0).all())
        if per_row:
            assert bool((mask.sum(1) == view.in_features - round(0.6 * view.in_features)).all())
        else:
            assert mask.sum().item() == mask.numel() - round(0.6 * mask.numel())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("refine", [None, "dsnot"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_groups_are_valid_and_exact(tiny_llama, method, refine, pattern):
    n, m = map(int, pattern.split(":"))
    prune(tiny_llama, method=method, pattern=pattern, refine=refine, calibration=windows(), progress=False)
    for view in tiny_llama.adapter.linears():
        mask = tiny_llama.masks[view.name]
        assert bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())
        assert is_valid_nm(view.weight.detach() != 0, n, m)


@settings(max_examples=8, deadline=None)
@given(sparsity=st.sampled_from([0.1, 0.35, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_sparsegpt_property_exact_count(sparsity, seed):
    handle = load_model("tiny-qwen2")
    prune(handle, method="sparsegpt", sparsity=sparsity, calibration=windows(seed=seed), progress=False)
    for view in handle.adapter.linears():
        mask = handle.masks[view.name]
        assert mask.sum().item() == mask.numel() - round(sparsity * mask.numel())
        assert bool((view.weight.detach()[~mask] == 0).all())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsity_zero_leaves_weights_unchanged(tiny, method):
    before = weights(tiny)
    prune(tiny, method=method, sparsity=0.0, calibration=windows(), progress=False)
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_sparsegpt_compensates_better_than_masking_alone(tiny_llama):
    """The OBS update must reduce each layer's output error relative to zeroing the same weights."""
    from sparseforge.prune.sparsegpt import factorize, solve
    from sparseforge.sparsity.patterns import Unstructured

    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs, where compensation matters
    w = torch.randn(32, 64)
    result = solve(w, factorize(x.t() @ x), Unstructured(), [0.5], [32])
    masked = w * result.mask
    assert (x @ (w - result.weight).t()).norm() < 0.9 * (x @ (w - masked).t()).norm()


def test_sparsegpt_lazy_blocks_match_unblocked_updates():
    from sparseforge.prune.sparsegpt import SparseGPTConfig, factorize, solve
    from sparseforge.sparsity.patterns import NM

    torch.manual_seed(1)
    x = torch.randn(256, 48)
    w = torch.randn(16, 48)
    factor = factorize(x.t() @ x)
    a = solve(w, factor, NM(2, 4), [0.5], [16], SparseGPTConfig(block_size=4))
    b = solve(w, factor, NM(2, 4), [0.5], [16], SparseGPTConfig(block_size=128))
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.weight, b.weight, atol=1e-4)


def test_singular_hessian_retries_with_more_dampening_and_says_so():
    from sparseforge.prune.sparsegpt import inverse_hessian_factor

    hessian = torch.diag(torch.tensor([1.0, -0.02]))
    _, damp, events = inverse_hessian_factor(hessian, 0.01, "layer")
    assert damp == pytest.approx(0.1)
    assert events and "retrying" in events[0]
    with pytest.raises(PatternError, match="singular"):
        inverse_hessian_factor(-torch.eye(3), 0.01, "layer")


def test_rank_deficient_calibration_still_prunes(tiny_llama):
    """A single repeated token gives a rank-1 Hessian; dampening must make it work, not crash."""
    ids = torch.full((4, 16), 7)
    prune(tiny_llama, method="sparsegpt", sparsity=0.5, calibration=ids, progress=False)
    assert all(torch.isfinite(v.weight).all() for v in tiny_llama.adapter.linears())


def test_shared_inputs_share_one_statistic(tiny):
    from sparseforge.calibration.block_inputs import BlockInputs

    blocks = BlockInputs(tiny, windows(4), 2, torch.device("cpu"))
    collector = blocks.calibrate(0, blocks.hidden, frozenset({"hessian"}))
    roles = {v.name: role for role, v in tiny.adapter.block_linears(0).items()}
    groups = [sorted(roles[n] for n in g) for g in collector.groups()]
    expected = {"llama": [["k", "q", "v"], ["o"], ["gate", "up"], ["down"]],
                "opt": [["k", "q", "v"], ["o"], ["fc1"], ["fc2"]],
                "gpt2": [["qkv"], ["o"], ["fc1"], ["fc2"]]}
    assert groups == expected.get(tiny.adapter.family, expected["llama"])
    assert len(collector.stats) == len(groups)


def test_statistics_match_direct_computation(tiny_llama):
    from sparseforge.calibration.statistics import InputStatistics

    x = torch.randn(3, 5, 8)
    stats = InputStatistics(8, frozenset({"hessian", "moments"}), torch.device("cpu"))
    stats.update(x[:2])
    stats.update(x[2:])
    flat = x.reshape(-1, 8)
    assert torch.allclose(stats.hessian_matrix(), flat.t() @ flat, atol=1e-4)
    assert torch.allclose(stats.norms(), flat.norm(dim=0), atol=1e-5)
    assert torch.allclose(stats.mean(), flat.mean(0), atol=1e-6)
    assert torch.allclose(stats.variance(), flat.var(0, unbiased=False), atol=1e-5)
    assert torch.allclose(stats.sample_sum_mean(), x.sum(1).mean(0), atol=1e-5)


def test_owl_sparsities_keep_the_mean_and_bounds():
    from sparseforge.sparsity.allocation import owl_sparsities

    ratios = [1.0, 3.0, 2.0, 8.0, 5.0]
    result = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(result) / len(result) == pytest.approx(0.7)
    assert max(result) - min(result) == pytest.approx(0.16)  # the reference's spread of 2 * lambda
    assert result[3] == min(result) and result[0] == max(result)  # most outliers -> least pruned
    assert owl_sparsities([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]


def test_owl_reaches_the_target_overall(tiny_llama):
    prune(tiny_llama, method="wanda", sparsity=0.6, allocation="owl", owl={"lam": 0.1, "m": 2},
          calibration=windows(), progress=False)
    report = tiny_llama.history[-1]
    assert sum(report["block_sparsity"]) / 2 == pytest.approx(0.6)
    assert report["block_sparsity"][0] != report["block_sparsity"][1]
    zeros = sum((~m).sum().item() for m in tiny_llama.masks.values())
    total = sum(m.numel() for m in tiny_llama.masks.values())
    assert zeros / total == pytest.approx(0.6, abs=0.01)


def test_dsnot_reduces_expected_error_and_keeps_row_counts():
    from sparseforge.calibration.statistics import InputStatistics
    from sparseforge.prune.dsnot import DSnoTConfig, refine
    from sparseforge.sparsity.patterns import Unstructured

    torch.manual_seed(0)
    x = torch.randn(8, 16, 32) + torch.linspace(-1, 2, 32)  # inputs with nonzero means
    stats = InputStatistics(32, frozenset({"moments"}), torch.device("cpu"))
    stats.update(x)
    dense = torch.randn(12, 32)
    mask = Unstructured(per_row=True).mask(dense.abs() * stats.norms(), 0.6)
    current = dense * mask
    weight, new_mask, swaps = refine(dense, current, mask, stats, Unstructured(True), DSnoTConfig(sign_check=True,
                                                                                                    threshold=0.0))
    mu = stats.sample_sum_mean()
    assert swaps > 0
    assert torch.equal(new_mask.sum(1), mask.sum(1))
    assert bool((weight[~new_mask] == 0).all())
    before = ((dense - current) * mu).sum(1).abs()
    after = ((dense - weight) * mu).sum(1).abs()
    assert bool((after <= before + 1e-4).all()) and after.sum() < before.sum()


def test_dsnot_attention_only_leaves_ffn_masks_as_wanda(tiny_llama):
    """In the reference's block order the FFN sees the same statistics with or without attention refinement."""
    plain = load_model("tiny-llama")
    prune(plain, method="wanda", sparsity=0.6, calibration=windows(), order="block", progress=False)
    prune(tiny_llama, method="wanda", sparsity=0.6, refine="dsnot", dsnot={"layers": "attention"},
          calibration=windows(), order="block", progress=False)
    ffn = {v.name for v in tiny_llama.adapter.ffn(0).linears.values()}
    attn = {v.name for v in tiny_llama.adapter.attention(0).linears.values()}
    assert all(torch.equal(tiny_llama.masks[n], plain.masks[n]) for n in ffn)
    assert any(not torch.equal(tiny_llama.masks[n], plain.masks[n]) for n in attn)


class Interrupt(Exception):
    pass


def _interrupt_after(block):
    def hook(index):
        if index == block:
            raise Interrupt

    return hook


@pytest.mark.parametrize("family, order", [("llama", "sublayer"), ("llama", "block"), ("gpt2", "sublayer")])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, family, order):
    options = dict(method="sparsegpt", sparsity=0.6, allocation="owl", refine="dsnot", calibration=windows(),
                   batch_size=4, order=order, progress=False)
    reference = load_model(f"tiny-{family}")
    prune(reference, **options)
    interrupted = load_model(f"tiny-{family}")
    with pytest.raises(Interrupt):
        prune(interrupted, checkpoint_dir=tmp_path / "ckpt", after_block=_interrupt_after(0), **options)
    resumed = load_model(f"tiny-{family}")
    prune(resumed, checkpoint_dir=tmp_path / "ckpt", **options)
    assert resumed.history[-1]["resumed_from_block"] == 1
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert reference.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(reference.masks[k], resumed.masks[k]) for k in reference.masks)


def test_checkpoint_with_other_settings_is_refused(tmp_path, tiny_llama):
    with pytest.raises(Interrupt):
        prune(tiny_llama, method="wanda", sparsity=0.5, calibration=windows(), checkpoint_dir=tmp_path,
              after_block=_interrupt_after(0), progress=False)
    fresh = load_model("tiny-llama")
    before = weights(fresh)
    with pytest.raises(CheckpointMismatchError, match=r"method: 'wanda' -> 'sparsegpt'"):
        prune(fresh, method="sparsegpt", sparsity=0.5, calibration=windows(), checkpoint_dir=tmp_path,
              progress=False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


@pytest.mark.parametrize("damaged, damage", [("block_0000", "flip"), ("hidden_0001", "flip"),
                                             ("hidden_0001", "truncate"), ("block_0000", "delete")])
def test_damaged_checkpoint_is_recomputed_not_used(tmp_path, capfd, damaged, damage):
    """A checkpoint file whose content no longer matches its SHA-256 is discarded and its block recomputed; the
    result is bit-identical to an uninterrupted run."""
    options = dict(method="sparsegpt", sparsity=0.6, calibration=windows(), batch_size=4, progress=False)
    reference = load_model("tiny-llama")
    prune(reference, **options)
    with pytest.raises(Interrupt):
        prune(load_model("tiny-llama"), checkpoint_dir=tmp_path, after_block=_interrupt_after(0), **options)
    path = tmp_path / f"{damaged}.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-10]))
    else:
        path.unlink()
    resumed = load_model("tiny-llama")
    prune(resumed, checkpoint_dir=tmp_path, **options)
    expected_first = 0 if damaged.startswith("block") else 1
    assert resumed.history[-1]["resumed_from_block"] == (expected_first or None)
    if expected_first == 0:
        assert "recomputing from block 0" in capfd.readouterr().err
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert all(torch.equal(reference.masks[k], resumed.masks[k]) for k in reference.masks)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(nsamples=0), DataError, "nsamples"),
    (dict(seqlen=100000), DataError, "too few"),
    (dict(pattern="3:7"), PatternError, "does not divide"),
    (dict(allocation="owl", pattern="2:4"), PatternError, "owl allocation varies sparsity per block"),
    (dict(refine="nope"), PatternError, "refinement"),
    (dict(method="obc"), PatternError, "unknown pruning method"),
    (dict(dsnot={"cycles": 3}, refine="dsnot"), PatternError, "unknown dsnot option"),
    (dict(owl={"m": "five"}, allocation="owl"), PatternError, "owl option m"),
    (dict(batch_size=0), PatternError, "batch_size"),
    (dict(order="random"), PatternError, "calibration order"),
])
def test_bad_requests_fail_before_any_change(tiny_llama, text_file, kwargs, error, match):
    before = weights(tiny_llama)
    options = dict(method="wanda", sparsity=0.5, calibration=str(text_file), seqlen=64, nsamples=4)
    options.update(kwargs)
    if options.get("pattern", "unstructured") != "unstructured":
        options["sparsity"] = None
    with pytest.raises(error, match=match):
        prune(tiny_llama, progress=False, **options)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.model.state_dict().items())
    assert not tiny_llama.masks


def test_empty_calibration_text_is_a_clear_error(tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError):
        prune(tiny_llama, method="wanda", sparsity=0.5, calibration=str(empty), progress=False)


def test_sublayer_batches_agree_with_one_batch():
    """Batching only changes floating-point summation order, never which weights are kept (beyond rare ties)."""
    one, many = load_model("tiny-llama"), load_model("tiny-llama")
    prune(one, method="wanda", sparsity=0.5, calibration=windows(), batch_size=6, progress=False)
    prune(many, method="wanda", sparsity=0.5, calibration=windows(), batch_size=2, progress=False)
    agree = sum(int((one.masks[k] == many.masks[k]).sum()) for k in one.masks)
    assert agree / sum(m.numel() for m in one.masks.values()) > 0.999


def test_sublayer_order_calibrates_on_pruned_upstream_outputs():
    """In sub-layer order o_proj sees pruned q/k/v outputs, so its masks differ from the block order's."""
    sub, blk = load_model("tiny-llama"), load_model("tiny-llama")
    prune(sub, method="wanda", sparsity=0.7, calibration=windows(), order="sublayer", progress=False)
    prune(blk, method="wanda", sparsity=0.7, calibration=windows(), order="block", progress=False)
    first = sub.adapter.attention(0).linears
    assert torch.equal(sub.masks[first["q"].name], blk.masks[first["q"].name])  # same dense input
    assert not torch.equal(sub.masks[first["o"].name], blk.masks[first["o"].name])


def test_hessian_from_upper_strips_is_the_full_gram_matrix():
    from sparseforge.calibration.statistics import InputStatistics

    x = torch.randn(2, 50, 600, dtype=torch.float64).float()
    stats = InputStatistics(600, frozenset({"hessian"}), torch.device("cpu"))
    stats.update(x)
    flat = x.reshape(-1, 600)
    full = stats.hessian_matrix()
    assert torch.allclose(full, flat.t() @ flat, rtol=1e-4, atol=1e-3)
    assert torch.equal(full, full.t())


@pytest.mark.parametrize("order", ["sublayer", "block"])
def test_pruning_records_no_autograd_graph_and_leaves_grad_mode_alone(tiny_llama, order):
    """Batches interleaved as greenlets share the thread's grad mode: none may build a graph or leave it changed."""
    recorded = []
    hook = tiny_llama.adapter.blocks()[1].register_forward_hook(lambda m, a, out: recorded.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    prune(tiny_llama, method="sparsegpt", sparsity=0.5, calibration=windows(), batch_size=2, order=order,
          progress=False)
    hook.remove()
    assert recorded and not any(recorded)
    assert torch.is_grad_enabled()
