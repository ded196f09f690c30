"""The standalone reader: our bitmask/nm exports become plain checkpoints that transformers alone loads."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseforge as sf
from sparseforge.export import reader

READER = Path(reader.__file__)


def test_the_reader_imports_nothing_but_torch_safetensors_and_the_standard_library():
    imported = set()
    for node in ast.walk(ast.parse(READER.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "safetensors"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fmt", ["bitmask", "nm"])
def test_a_converted_export_loads_in_plain_transformers_to_identical_logits(tmp_path, fmt, family):
    handle = sf.load_model(f"tiny-{family}")
    sf.prune(handle, method="magnitude", pattern="2:4", progress=False)
    sf.save_model(handle, tmp_path / "export", format=fmt)
    proc = subprocess.run([sys.executable, str(READER), str(tmp_path / "export"), str(tmp_path / "plain")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ours = sf.load_model(str(tmp_path / "export"))
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours.model(ids).logits)
    state, masks, _ = reader.read_export(tmp_path / "export")
    assert {k.removesuffix(".weight") for k in masks} == set(ours.masks)


def test_the_reader_refuses_a_damaged_export_in_one_line(tmp_path):
    handle = sf.load_model("tiny-llama")
    sf.prune(handle, method="magnitude", sparsity=0.5, progress=False)
    sf.save_model(handle, tmp_path / "export", format="bitmask")
    weights = tmp_path / "export" / "model.sparseforge.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    proc = subprocess.run([sys.executable, str(READER), str(tmp_path / "export"), str(tmp_path / "plain")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "SHA-256" in proc.stderr
    assert not (tmp_path / "plain").exists() and not list(tmp_path.glob(".plain*"))


def test_the_reader_refuses_a_shrunk_model_transformers_cannot_load(tmp_path):
    handle = sf.load_model("tiny-llama")
    sf.shrink(handle, ffn=[0.25, 0.5], score="magnitude", progress=False)
    sf.save_model(handle, tmp_path / "export", format="dense")
    with pytest.raises(reader.ExportReadError, match="per-block shapes"):
        reader.to_huggingface(tmp_path / "export", tmp_path / "plain")
