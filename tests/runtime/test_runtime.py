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


def _pruned(pattern="unstructured", sparsity=0.5, family="tiny-llama"):
    handle = load_model(family)
    sf.prune(handle, method="magnitude", sparsity=sparsity if pattern == "unstructured" else None, pattern=pattern,
             progress=False)
    return handle


def _fp16_reference(handle, dtype=torch.float16):
    """The same model with every runtime-held weight (block linears, LM head, embeddings) rounded to fp16 (or
    ``dtype``) and computed densely in fp32."""
    reference = copy.deepcopy(handle)
    with torch.no_grad():
        for view in reference.adapter.linears():
            view.module.weight.copy_(view.module.weight.to(dtype).float())
        head, embedding = reference.adapter.lm_head(), reference.adapter.embed_tokens()
        if type(embedding) is not nn.Embedding:  # kept as loaded by the runtime: untie the head from it
            head.weight = nn.Parameter(head.weight.detach().clone())
        for module in {head, embedding} if type(embedding) is nn.Embedding else {head}:
            module.weight.copy_(module.weight.to(dtype).float())
    return reference.model


def assert_same_logits_and_generation(model, reference):
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOLERANCE)
        ours = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
        theirs = reference.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def held_dtypes(handle) -> set:
    return {m.packed.values.dtype for m in handle.model.modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("family,pattern,layout", [("tiny-llama", "unstructured", "bitmask"),
                                                   ("tiny-llama", "2:4", "nm"), ("tiny-opt", "unstructured", "bitmask"),
                                                   ("tiny-gpt2", "unstructured", "bitmask"),
                                                   ("tiny-gemma3", "2:4", "nm"), ("tiny-qwen2", "unstructured", "bitmask")])
def test_runtime_logits_and_greedy_generation_match_the_dense_fp16_model(family, pattern, layout):
    handle = _pruned(pattern, family=family)
    reference = _fp16_reference(handle)
    runtime = install_runtime(handle, "sparse")
    assert {layer.layout for layer in runtime.layers[:-1]} == {layout}
    assert runtime.layers[-1].layout == "dense"  # the LM head
    assert_same_logits_and_generation(handle.model, reference)


def test_a_bf16_runtime_matches_the_model_with_the_same_bf16_weights():
    """bf16 values decode by shifting and masking (pair-split), a path of its own in every AVX-512 kernel."""
    handle = _pruned()
    reference = _fp16_reference(handle, torch.bfloat16)
    install_runtime(handle, "sparse", values_dtype="bfloat16")
    assert held_dtypes(handle) == {torch.bfloat16}
    assert_same_logits_and_generation(handle.model, reference)


def test_runtime_weights_default_to_the_loaded_half_type_else_fp16():
    loaded_bf16 = load_model("tiny-llama", dtype="bfloat16")
    install_runtime(loaded_bf16, "dense")
    assert held_dtypes(loaded_bf16) == {torch.bfloat16}
    plain = _pruned()
    install_runtime(plain, "sparse")
    assert held_dtypes(plain) == {torch.float16}
    with pytest.raises(RuntimeRequestError, match="float16 or bfloat16, not float32"):
        install_runtime(_pruned(), "sparse", values_dtype="float32")


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
    assert "runtime sparse: 8 bitmask, 1 dense weight matrices" in err  # q+k+v and gate+up fused
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["runtime"]["layouts"]["bitmask"] > 0 and report["runtime"]["layers"][0]["layout"] == "bitmask"
    assert abs(report["metrics"]["after"]["sparsity"] - 0.5) < 0.01  # statistics still see the packed weights
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "pruned", "Hello", "--max-new-tokens", "4",
                             "--runtime", "auto", "--runtime-dtype", "bfloat16")
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "pruned", "Hello", "--runtime-dtype", "bfloat16")
    assert_clean_failure(code, err, "--runtime-dtype needs --runtime")
    code, _, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "pruned", "Hello", "--runtime", "sparse",
                           "--runtime-dtype", "int8")
    assert_clean_failure(code, err, "unknown dtype 'int8'")
    code, _, err = run_cli(capsys, monkeypatch, "generate", "tiny-llama", "Hello", "--runtime", "sparse")
    assert_clean_failure(code, err, "needs a pruned model with recorded masks")
    code, _, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--runtime", "turbo", "--no-ppl")
    assert_clean_failure(code, err, "unknown runtime 'turbo'")


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_the_lean_decode_step_gives_the_same_logits_as_the_transformers_layers(family):
    from sparseforge.models.cache import cache_argument, cache_of

    def decode(lean: bool):
        handle = _pruned(family=family)
        runtime = install_runtime(handle, "sparse", lean_decode=lean)
        assert bool(runtime.lean_layers) == lean
        ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(2))
        logits = []
        with torch.no_grad():
            out = handle.model(input_ids=ids, use_cache=True)
            for _ in range(6):
                token = out.logits[:, -1:].argmax(-1)
                out = handle.model(input_ids=token, **cache_argument(handle.model, cache_of(out)), use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, 1), handle, runtime

    plain, _, _ = decode(False)
    lean, handle, runtime = decode(True)
    assert torch.equal(plain, lean)  # the same operations in the same order: bit-identical
    handle.detach("runtime")
    assert all("forward" not in vars(layer) for layer in runtime.lean_layers)


def test_a_recipe_times_the_pruned_model_in_the_runtime_next_to_the_dense_one(tmp_path, text_file):
    from sparseforge.pipeline import run_recipe
    from sparseforge.recipe import parse_recipe

    recipe = parse_recipe({"model": "tiny-llama", "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
                           "data": {"evaluation": str(text_file), "seqlen": 32, "eval_windows": 2},
                           "evaluate": {"speed": True, "runtime": "sparse", "speed_prompt_tokens": 8,
                                        "speed_new_tokens": 4, "speed_repeats": 1},
                           "export": {"format": "auto", "dtype": "float16"}})
    report = run_recipe(recipe, tmp_path / "run", progress=False)
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert after["runtime"]["mode"] == "sparse" and after["runtime"]["speed"]["decode_tokens_per_s"] > 0
    assert after["runtime"]["weight_bytes_per_token"] < before["speed"]["weight_bytes_per_token"]
    assert report["export"]["weight_bytes"] < report["export"]["dense_bytes_same_dtype"]
    assert "decode tokens/s, sparse runtime" in (tmp_path / "run" / "report.md").read_text()
    assert not any(isinstance(m, SparseLinear) for m in load_model(str(tmp_path / "run")).model.modules())


def test_an_ffn_skip_policy_still_acts_in_the_runtime():
    """The lean decode step bypasses the FFN's norm and projections, which a skip policy hooks: with a policy
    installed, every layer must fall back to the transformers forward and skip as it would without the runtime."""
    from sparseforge.models.cache import cache_argument, cache_of
    from sparseforge.skip import SkipPolicy, install_policy

    def decode(runtime: str | None, skip: bool):
        handle = _pruned()
        if runtime is not None:
            install_runtime(handle, runtime, lean_decode=True)
        if skip:  # skip the FFN after every one whose similarity exceeds -1: all of them after the first
            install_policy(handle, SkipPolicy(threshold=-1.0, cold_start=0, cold_end=0))
        ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = handle.model(input_ids=ids, use_cache=True)
            for _ in range(4):
                token = out.logits[:, -1:].argmax(-1)
                out = handle.model(input_ids=token, **cache_argument(handle.model, cache_of(out)), use_cache=True)
        return out.logits

    skipping, not_skipping = decode("sparse", True), decode("sparse", False)
    assert not torch.allclose(skipping, not_skipping)  # the policy changed what was computed
    torch.testing.assert_close(skipping, decode(None, True), **TOLERANCE)  # and as without the runtime


@pytest.mark.parametrize("fmt,pattern", [("bitmask", "unstructured"), ("nm", "2:4")])
def test_a_damaged_compressed_export_is_refused_before_the_runtime_sees_it(capsys, monkeypatch, tmp_path, fmt,
                                                                          pattern):
    from sparseforge.export.saving import save_model

    from helpers import assert_clean_failure, run_cli

    description = save_model(_pruned(pattern), tmp_path / "m", format=fmt)
    weights = tmp_path / "m" / description["weights"]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the packed values or positions
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "m", "Hello", "--runtime", "sparse")
    assert_clean_failure(code, err, "SHA-256")


def test_a_half_precision_export_runs_in_float32_activations(tmp_path):
    from sparseforge.export.saving import save_model

    save_model(_pruned(), tmp_path / "m", format="bitmask", dtype="float16")
    handle = sf.load_model(str(tmp_path / "m"), runtime="sparse")
    assert handle.dtype == torch.float32  # norms and the rest moved to float32; weights stay in fp16 layouts
    reference = _fp16_reference(load_model(str(tmp_path / "m"), dtype="float32"))
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(handle.model(ids).logits, reference(ids).logits, **TOLERANCE)
