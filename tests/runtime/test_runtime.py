"""The sparse runtime: exact against the same fp16 weights computed densely, smaller, and clear about bad requests."""

import copy
import json

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.models.loading import load_model
from sparseforge.evaluation.speed import weight_bytes_per_token as weight_bytes
from sparseforge.runtime import RuntimeRequestError, SparseLinear, install_runtime
from sparseforge.runtime.install import nm_of

# The same fp16 weights and fp32 accumulation, summed in another order (the kernel's 32-input windows and 4-row
# tiles, not PyTorch's blocking): each product sum differs by ~1e-7 relative, and through the blocks and the norms
# that grows to ~1e-4 of logits of magnitude ~1; 1e-3 leaves a margin and still fails on any wrong weight.
TOLERANCE = dict(rtol=1e-3, atol=1e-3)


def _pruned(pattern="unstructured", sparsity=0.5):
    handle = load_model("tiny-llama")
    sf.prune(handle, method="magnitude", sparsity=sparsity if pattern == "unstructured" else None, pattern=pattern,
             progress=False)
    return handle


def _fp16_reference(handle):
    """The same model with every runtime-held weight rounded to fp16 and computed densely in fp32."""
    reference = copy.deepcopy(handle.model)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return reference


@pytest.mark.parametrize("pattern,layout", [("unstructured", "bitmask"), ("2:4", "nm")])
def test_runtime_logits_and_greedy_generation_match_the_dense_fp16_model(pattern, layout):
    handle = _pruned(pattern)
    reference = _fp16_reference(handle)
    runtime = install_runtime(handle, "sparse")
    assert {layer.layout for layer in runtime.layers[:-1]} == {layout}
    assert runtime.layers[-1].layout == "dense"  # the LM head
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(handle.model(ids).logits, reference(ids).logits, **TOLERANCE)
        ours = handle.model.generate(ids[:1], max_new_tokens=12, do_sample=False)
        theirs = reference.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def test_sparse_layouts_read_fewer_bytes_than_the_same_runtime_dense():
    dense_handle, sparse_handle = _pruned(sparsity=0.5), _pruned(sparsity=0.5)
    install_runtime(dense_handle, "dense")
    install_runtime(sparse_handle, "sparse")
    linears = lambda h: sum(m.read_bytes for n, m in h.model.named_modules()  # noqa: E731
                            if isinstance(m, SparseLinear) and "lm_head" not in n)
    ratio = linears(sparse_handle) / linears(dense_handle)
    # 1 bit of mask + half the fp16 values is 0.5625 of dense fp16; on tiny rows each row's 8-byte offset and
    # the values' 32-entry pad add a few percent
    assert 0.5625 < ratio < 0.65
    assert weight_bytes(sparse_handle.model) < weight_bytes(dense_handle.model)


def test_auto_times_each_shape_and_falls_back_to_dense_without_masks(capsys):
    handle = _pruned(sparsity=0.7)
    runtime = install_runtime(handle, "auto")
    timed = [layer for layer in runtime.layers[:-1]]
    assert all(layer.sparse_us is not None and layer.dense_us is not None for layer in timed)
    assert all(layer.layout == ("bitmask" if layer.sparse_us < layer.dense_us else "dense") for layer in timed)
    dense = load_model("tiny-llama")
    messages = []
    runtime = install_runtime(dense, "auto", log=messages.append)
    assert {layer.layout for layer in runtime.layers} == {"dense"} and "no pruning masks" in messages[0]


def test_bad_runtime_requests_are_refused_with_one_line():
    with pytest.raises(RuntimeRequestError, match="unknown runtime 'fast'"):
        install_runtime(_pruned(), "fast")
    with pytest.raises(RuntimeRequestError, match="needs a pruned model with recorded masks"):
        install_runtime(load_model("tiny-llama"), "sparse")
    handle = _pruned()
    install_runtime(handle, "sparse")
    with pytest.raises(RuntimeRequestError, match="not saved"):
        handle.attachment("runtime").save(None)


def test_removing_the_runtime_gives_back_ordinary_linears_with_the_fp16_weights():
    handle = _pruned()
    reference = _fp16_reference(handle)
    install_runtime(handle, "sparse")
    handle.detach("runtime")
    assert not any(isinstance(m, SparseLinear) for m in handle.model.modules())
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(handle.model(ids).logits, reference(ids).logits, **TOLERANCE)


def test_nm_detection_needs_every_group_to_keep_the_same_count():
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0], [1, 0, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert nm_of(mask) == (2, 4)
    mask[0, 7] = True
    assert nm_of(mask) is None


def test_eval_and_generate_run_in_the_runtime_from_the_command_line(capsys, monkeypatch, tmp_path, text_file):
    from sparseforge.export.saving import save_model

    from helpers import assert_clean_failure, run_cli

    save_model(_pruned(), tmp_path / "pruned", format="bitmask")
    code, out, err = run_cli(capsys, monkeypatch, "eval", tmp_path / "pruned", "--runtime", "sparse", "--eval-data",
                             text_file, "--seqlen", "32", "--eval-windows", "2", "--out", tmp_path / "report")
    assert code == 0, err
    assert "runtime sparse: 14 bitmask, 1 dense linears" in err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["runtime"]["layouts"]["bitmask"] > 0 and report["runtime"]["layers"][0]["layout"] == "bitmask"
    assert abs(report["metrics"]["after"]["sparsity"] - 0.5) < 0.01  # statistics still see the packed weights
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "pruned", "Hello", "--max-new-tokens", "4",
                             "--runtime", "auto")
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, "generate", "tiny-llama", "Hello", "--runtime", "sparse")
    assert_clean_failure(code, err, "needs a pruned model with recorded masks")
    code, _, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--runtime", "turbo", "--no-ppl")
    assert_clean_failure(code, err, "unknown runtime 'turbo'")
