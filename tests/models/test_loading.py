import pytest
import torch

from sparseforge.errors import InvalidWeightsError, ModelNotFoundError
from sparseforge.models.loading import load_model
from sparseforge.models.tiny import TINY_FAMILIES


def test_tiny_models_are_deterministic_and_small():
    for family in TINY_FAMILIES:
        a, b = load_model(f"tiny-{family}"), load_model(f"tiny-{family}")
        for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
            assert torch.equal(p, q), name
        assert sum(p.numel() for p in a.model.parameters()) < 200_000


def test_byte_tokenizer_round_trips_any_text(tiny_llama):
    text = "Héllo, wörld! 日本語 \n\t tabs"
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_llama.tokenizer.decode(ids) == text
    assert max(ids) < tiny_llama.model.config.vocab_size


def test_local_hf_directory(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path / "hf")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"))
    assert loaded.masks == {} and loaded.model_type == "llama"
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_llama.model(ids).logits)


def test_dtype_option(tmp_path):
    assert load_model("tiny-opt", dtype="bfloat16").dtype == torch.bfloat16


def test_inf_weights_are_refused(tmp_path, tiny_llama):
    with torch.no_grad():
        tiny_llama.adapter.final_norm().weight[0] = float("inf")
    tiny_llama.model.save_pretrained(tmp_path / "inf")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "inf")
    with pytest.raises(InvalidWeightsError, match="model.norm.weight"):
        load_model(str(tmp_path / "inf"))


@pytest.mark.parametrize("spec", ["./missing-dir", "/nonexistent/model", "missing.gguf", "no-such-org/model-x"])
def test_missing_models(spec):
    with pytest.raises(ModelNotFoundError):
        load_model(spec)


def test_device_auto_resolves_to_an_available_device():
    from sparseforge.models.loading import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(load_model("tiny-opt", device="auto").model.parameters()).device.type == resolve_device("auto").type
