"""Legacy compressed-tensors sparse checkpoints, read against fixtures that compressed-tensors 0.14.0.1 wrote itself
(``bench/interop.py --part fixtures``; the sources are a seeded tiny Llama pruned by sparseforge)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparseforge as sf
from sparseforge.errors import CorruptCheckpointError
from sparseforge.interop.compressed_tensors import UnsupportedCompressionError
from helpers import assert_clean_failure, run_cli

FIXTURES = Path(__file__).parents[1] / "fixtures" / "compressed_tensors"


def _digest(tensor: torch.Tensor) -> str:
    # "+ 0" makes -0.0 (a negative weight times a zero mask) and 0.0 one value
    return hashlib.sha256((tensor.detach() + 0).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


@pytest.mark.parametrize("name", ["bitmask50", "24"])
def test_masks_and_weights_are_recovered_exactly(name):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    handle = sf.load_model(str(FIXTURES / name), dtype="float16")
    masks = {f"{k}.weight": m for k, m in handle.masks.items()}
    assert masks.keys() == expected["masks"].keys()
    for key, mask in masks.items():
        assert hashlib.sha256(mask.to(torch.uint8).numpy().tobytes()).hexdigest() == expected["masks"][key], key
        assert int(mask.sum()) == expected["kept"][key]
    state = handle.model.state_dict()
    assert {k: _digest(v) for k, v in state.items()} == expected["weights"]  # so the logits are the source's


def test_two_four_masks_are_valid_groups():
    handle = sf.load_model(str(FIXTURES / "24"))
    for mask in handle.masks.values():
        assert bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())


def test_perp_keeps_the_read_masks_and_the_runtime_runs_them():
    handle = sf.load_model(str(FIXTURES / "bitmask50"))
    masks = {k: v.clone() for k, v in handle.masks.items()}
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = handle.model(ids).logits
    fast = sf.load_model(str(FIXTURES / "bitmask50"), runtime="sparse")
    with torch.no_grad():
        assert torch.allclose(fast.model(ids).logits, before, atol=2e-3, rtol=1e-3)
    windows = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(1))  # weights-only fixture
    sf.retrain(handle, method="perp", steps=2, batch=2, seqlen=32, data=windows, progress=False)
    views = {v.name: v for v in handle.adapter.linears()}
    for name, mask in masks.items():
        assert torch.equal(handle.masks[name], mask)
        assert not bool((views[name].weight.detach()[~mask] != 0).any()), name


def test_a_quantized_scheme_is_refused_by_name(tmp_path):
    directory = _copy("bitmask50", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["config_groups"] = {
        "group_0": {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int"}}}
    config["quantization_config"]["format"] = "int-quantized"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCompressionError, match="weights int8, activations int8.*int-quantized"):
        sf.load_model(str(directory))


def test_marlin_24_is_refused_with_the_reason(tmp_path, capsys, monkeypatch):
    directory = _copy("24", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    (directory / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, monkeypatch, "info", directory)
    assert_clean_failure(code, err, "marlin-24")


@pytest.mark.parametrize("damage", ["short bitmask", "shape", "values", "not 2:4"])
def test_a_damaged_tensor_is_a_clear_error(tmp_path, damage):
    directory = _copy("24", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    key = "model.layers.0.mlp.up_proj"
    if damage == "short bitmask":
        tensors[f"{key}.bitmask"] = tensors[f"{key}.bitmask"][:-1].contiguous()
    elif damage == "shape":
        tensors[f"{key}.shape"] = torch.tensor([[64], [128]])
    elif damage == "values":
        tensors[f"{key}.compressed"] = tensors[f"{key}.compressed"][:-1].contiguous()
    else:
        tensors[f"{key}.bitmask"] = torch.full_like(tensors[f"{key}.bitmask"], 0b111)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match=key):
        sf.load_model(str(directory))


def test_a_truncated_file_is_caught_before_decoding(tmp_path):
    directory = _copy("bitmask50", tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError):
        sf.load_model(str(directory))


def test_reexport_in_our_format_keeps_masks_and_weights(tmp_path):
    read = sf.load_model(str(FIXTURES / "24"))
    sf.export_model(read, tmp_path / "nm", format="nm")
    again = sf.load_model(str(tmp_path / "nm"))
    assert again.masks.keys() == read.masks.keys()
    assert all(torch.equal(again.masks[k], read.masks[k]) for k in read.masks)
    state = read.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())
