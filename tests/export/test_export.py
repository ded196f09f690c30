import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.evaluation.stats import pruned_weight_bytes
from sparseforge.errors import CorruptCheckpointError, SparseforgeError
from sparseforge.export.formats import ENCODINGS
from sparseforge.export.saving import FORMAT_FILE, save_model
from sparseforge.models.loading import load_model
from sparseforge.prune.pruner import prune
from sparseforge.sparsity.patterns import NM, Unstructured

IDS = torch.arange(3, 60).reshape(1, -1)


def _pruned(name="tiny-llama", pattern="unstructured", sparsity=0.5):
    handle = load_model(name)
    prune(handle, sparsity=None if pattern != "unstructured" else sparsity, pattern=pattern, progress=False)
    return handle


@pytest.mark.parametrize("fmt", ["dense", "bitmask", "nm"])
def test_round_trip_is_bit_exact_on_every_family(tiny, fmt, tmp_path):
    prune(tiny, pattern="2:4", progress=False)
    with torch.no_grad():
        reference = tiny.model(IDS).logits
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    save_model(tiny, tmp_path / "m", format=fmt)
    reloaded = load_model(str(tmp_path / "m"))
    for key, value in reloaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(reloaded.model(IDS).logits, reference)
    assert set(reloaded.masks) == set(tiny.masks)
    for name, mask in tiny.masks.items():
        assert torch.equal(reloaded.masks[name], mask)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 16), groups=st.integers(1, 8), sparsity=st.floats(0, 0.95),
       nm=st.sampled_from([None, (2, 4), (4, 8), (1, 4), (3, 4)]), seed=st.integers(0, 100),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_encodings_round_trip(rows, groups, sparsity, nm, seed, dtype):
    weight = torch.randn(rows, groups * 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    mask = (NM(*nm) if nm else Unstructured()).mask(weight.abs().float(), sparsity)
    weight = weight * mask
    for name, encoding in ENCODINGS.items():
        params = encoding.applicable(mask)
        if params is None:
            assert name == "nm" and nm is None
            continue
        decoded, decoded_mask = encoding.decode(encoding.encode(weight, mask, params), tuple(weight.shape),
                                                params, dtype)
        assert torch.equal(decoded, weight) and decoded.dtype == dtype
        if name != "dense":
            assert torch.equal(decoded_mask, mask)


@pytest.mark.parametrize("pattern,fmt", [("unstructured", "bitmask"), ("2:4", "nm"), ("2:4", "bitmask"),
                                         ("4:8", "nm")])
def test_half_sparse_fp16_is_at_most_057_of_dense(pattern, fmt, tmp_path):
    """The acceptance bar: a 50%-sparse fp16 layer set stored in <= 0.57x the bytes of dense fp16."""
    handle = _pruned(pattern=pattern)
    dense_desc = save_model(handle, tmp_path / "dense", format="dense", dtype="float16")
    sparse_desc = save_model(handle, tmp_path / fmt, format=fmt, dtype="float16")
    ratio = pruned_weight_bytes(tmp_path / fmt, sparse_desc) / pruned_weight_bytes(tmp_path / "dense", dense_desc)
    assert ratio <= 0.57
    whole = (tmp_path / fmt / sparse_desc["weights"]).stat().st_size
    assert whole < (tmp_path / "dense" / dense_desc["weights"]).stat().st_size


def test_auto_picks_the_smallest_exact_format(tmp_path):
    assert save_model(_pruned(pattern="2:4"), tmp_path / "a", format="auto", dtype="float16")["format"] == "nm"
    assert save_model(_pruned(sparsity=0.5), tmp_path / "b", format="auto")["format"] == "bitmask"
    assert save_model(load_model("tiny-llama"), tmp_path / "c", format="auto")["format"] == "dense"


def test_nm_format_refuses_unstructured_masks(tmp_path):
    with pytest.raises(SparseforgeError, match="N:M"):
        save_model(_pruned(sparsity=0.5), tmp_path / "x", format="nm")
    assert not (tmp_path / "x").exists()


def test_dense_export_loads_with_transformers_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    handle = _pruned()
    with torch.no_grad():
        reference = handle.model(IDS).logits
    save_model(handle, tmp_path / "d", format="dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, reference)


def test_fp16_export_reloads_as_fp16(tmp_path):
    handle = _pruned(pattern="2:4")
    save_model(handle, tmp_path / "h", format="nm", dtype="float16")
    reloaded = load_model(str(tmp_path / "h"))
    assert reloaded.dtype == torch.float16
    for view in handle.adapter.linears():
        key = view.name
        assert torch.equal(dict(reloaded.model.named_modules())[key].weight, view.module.weight.half())


@pytest.mark.parametrize("fmt", ["dense", "bitmask"])
def test_truncated_checkpoint_is_refused(fmt, tmp_path):
    description = save_model(_pruned(), tmp_path / "m", format=fmt)
    weights = tmp_path / "m" / description["weights"]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated|corrupted"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("fmt", ["dense", "bitmask"])
def test_flipped_bit_is_caught_by_the_checksum(fmt, tmp_path):
    description = save_model(_pruned(), tmp_path / "m", format=fmt)
    weights = tmp_path / "m" / description["weights"]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_model(str(tmp_path / "m"))


def test_garbage_safetensors_in_a_hf_directory_is_refused(tmp_path):
    save_model(_pruned(), tmp_path / "m", format="dense")
    (tmp_path / "m" / FORMAT_FILE).unlink()  # now a plain HF directory
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CorruptCheckpointError):
        load_model(str(tmp_path / "m"))


def test_interrupted_save_leaves_no_directory(tmp_path, monkeypatch):
    import sparseforge.export.saving as saving

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "sha256_of", explode)
    with pytest.raises(KeyboardInterrupt):
        save_model(_pruned(), tmp_path / "m", format="bitmask")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_without_permission(tmp_path):
    save_model(_pruned(), tmp_path / "m")
    with pytest.raises(SparseforgeError, match="already exists"):
        save_model(_pruned(), tmp_path / "m")
    save_model(_pruned(pattern="2:4"), tmp_path / "m", overwrite=True)
    assert json.loads((tmp_path / "m" / FORMAT_FILE).read_text())["format"] == "nm"
