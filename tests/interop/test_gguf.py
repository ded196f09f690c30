"""GGUF export for llama.cpp, checked by reading the file back with transformers' GGUF loader (llama.cpp itself runs
in ``bench/interop.py``): exact in f32, close in f16/q8_0, refused where GGUF cannot describe the model."""

import pytest
import torch

import sparseforge as sf
from sparseforge.interop.gguf import GGUFExportError
from helpers import assert_clean_failure, run_cli

IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114]])


def _logits(handle):
    with torch.no_grad():
        return handle.model(IDS).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_f32_round_trip_is_exact(tmp_path, family):
    handle = sf.load_model(f"tiny-{family}")
    written = sf.export_model(handle, tmp_path / "m.gguf", format="gguf", gguf_type="f32")
    assert written["architecture"] == ("qwen2" if family == "qwen2" else "llama") and not written["warnings"]
    back = sf.load_model(str(tmp_path / "m.gguf"))
    assert torch.equal(_logits(back), _logits(handle))
    assert back.tokenizer("Hello, world").input_ids == handle.tokenizer("Hello, world").input_ids


@pytest.mark.parametrize("gguf_type,tolerance", [("f16", 1e-2), ("bf16", 5e-2), ("q8_0", 5e-2)])
def test_half_and_quantized_types_stay_close(tmp_path, gguf_type, tolerance):
    handle = sf.load_model("tiny-llama")
    sf.export_model(handle, tmp_path / "m.gguf", format="gguf", gguf_type=gguf_type)
    difference = (_logits(sf.load_model(str(tmp_path / "m.gguf"))) - _logits(handle)).abs().max()
    assert 0 < difference < tolerance


def test_a_uniformly_shrunk_model_is_smaller_and_exact(tmp_path):
    dense = sf.load_model("tiny-llama")
    shrunk = sf.load_model("tiny-llama")
    sf.shrink(shrunk, ffn=0.25, heads=0.5, score="magnitude", progress=False)
    sizes = {}
    for name, handle in (("dense", dense), ("shrunk", shrunk)):
        sizes[name] = sf.export_model(handle, tmp_path / f"{name}.gguf", format="gguf", gguf_type="f32")["bytes"]
    assert sizes["shrunk"] < 0.9 * sizes["dense"]
    assert torch.equal(_logits(sf.load_model(str(tmp_path / "shrunk.gguf"))), _logits(shrunk))


def test_a_pruned_model_keeps_its_zeros(tmp_path):
    handle = sf.load_model("tiny-llama")
    sf.prune(handle, method="magnitude", pattern="2:4", progress=False)
    sf.export_model(handle, tmp_path / "m.gguf", format="gguf", gguf_type="f32")
    back = sf.load_model(str(tmp_path / "m.gguf"), masks_from_zeros=True)
    assert back.masks.keys() == handle.masks.keys()


@pytest.mark.parametrize("case,reason", [
    ("per-block widths", "per-block FFN widths"),
    ("family", "gpt2 is not one of them"),
    ("skip policy", "attachment that GGUF cannot hold"),
])
def test_what_gguf_cannot_describe_is_refused_with_the_reason(tmp_path, case, reason):
    handle = sf.load_model("tiny-gpt2" if case == "family" else "tiny-llama")
    if case == "per-block widths":
        sf.shrink(handle, ffn=[0.25, 0.5], score="magnitude", progress=False)
    elif case == "skip policy":
        sf.calibrate_skip(handle, target=0.25, cold_start=0, cold_end=0, nsamples=2, prompt_tokens=16, new_tokens=8,
                          progress=False)
    with pytest.raises(GGUFExportError, match=reason):
        sf.export_model(handle, tmp_path / "m.gguf", format="gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_writes_gguf_and_refuses_clearly(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "export", "tiny-llama", "--format", "gguf", "--gguf-type", "q8_0",
                             "--out", tmp_path / "m.gguf")
    assert code == 0, err
    assert "format gguf (q8_0)" in out and (tmp_path / "m.gguf").stat().st_size > 0
    code, _, err = run_cli(capsys, monkeypatch, "export", "tiny-llama", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert_clean_failure(code, err, "already exists")
    code, _, err = run_cli(capsys, monkeypatch, "export", "tiny-opt", "--format", "gguf", "--out", tmp_path / "o.gguf")
    assert_clean_failure(code, err, "opt is not one of them")
    code, _, err = run_cli(capsys, monkeypatch, "export", "tiny-llama", "--format", "gguf", "--export-dtype",
                           "float16", "--out", tmp_path / "x.gguf")
    assert_clean_failure(code, err, "--gguf-type")
