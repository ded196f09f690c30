import pytest
import torch
from torch import nn

from sparseforge.errors import UnsupportedArchitectureError
from sparseforge.models.loading import load_model
from sparseforge.models.adapters import adapter_for, check_supported, supported_model_types


def test_every_family_exposes_blocks_sublayers_and_linears(tiny):
    adapter = tiny.adapter
    assert adapter.num_blocks == 2
    for i in range(adapter.num_blocks):
        attention, ffn = adapter.attention(i), adapter.ffn(i)
        assert attention.linears and ffn.linears
        assert attention.norms and ffn.norms
        for view in {**attention.linears, **ffn.linears}.values():
            assert view.weight.shape == (view.out_features, view.in_features)
            assert view.block == i
    roles = set(adapter.block_linears(0))
    assert roles in ({"q", "k", "v", "o", "gate", "up", "down"}, {"q", "k", "v", "o", "fc1", "fc2"},
                     {"qkv", "o", "fc1", "fc2"})


def test_linear_view_shares_storage_with_the_module(tiny):
    """A write through the [out, in] view must land in the module, including GPT-2's transposed Conv1D."""
    view = next(tiny.adapter.linears())
    with torch.no_grad():
        view.weight[0, 1] = 123.0
    stored = view.module.weight
    assert (stored[1, 0] if view.transposed else stored[0, 1]).item() == 123.0


def test_gpt2_conv1d_is_transposed_and_linear_is_not():
    from sparseforge.models.loading import load_model

    gpt2 = load_model("tiny-gpt2")
    assert all(v.transposed for v in gpt2.adapter.linears())
    assert not any(v.transposed for v in load_model("tiny-llama").adapter.linears())
    qkv = gpt2.adapter.attention(0).linears["qkv"]
    assert (qkv.out_features, qkv.in_features) == (192, 64)


def test_head_geometry_with_gqa(tiny):
    geometry = tiny.adapter.head_geometry()
    assert geometry.num_heads == 4 and geometry.head_dim == 16
    expected_kv = 2 if tiny.model_type in ("llama", "qwen2", "mistral", "gemma3_text") else 4
    assert geometry.num_kv_heads == expected_kv
    k = tiny.adapter.attention(0).linears.get("k")
    if k is not None:
        assert k.out_features == geometry.num_kv_heads * geometry.head_dim


def test_tied_embeddings_are_detected(tiny):
    tied = tiny.adapter.tied_embeddings()
    assert tied == bool(tiny.model.config.tie_word_embeddings)


def test_running_blocks_on_captured_inputs_reproduces_the_model(tiny):
    adapter = tiny.adapter
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = adapter.capture_inputs_per_block(ids)
    with torch.no_grad():
        for i in range(adapter.num_blocks):
            hidden = adapter.run_block(i, hidden, kwargs[i])
        logits = adapter.lm_head()(adapter.final_norm()(hidden))
        reference = tiny.model(ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_names_supported_families():
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        check_supported("bert")
    model = nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "mamba"})()
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        adapter_for(model)
    assert {"llama", "qwen2", "mistral", "gemma3_text", "opt", "gpt2"} <= set(supported_model_types())


def test_tiny_gemma3_has_both_attention_kinds():
    """Otherwise nothing below could see a block calibrated with another block's rotary base or mask."""
    handle = load_model("tiny-gemma3")
    assert set(handle.model.config.layer_types) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("batch, seqlen", [(2, 96)])  # longer than tiny-gemma3's 64-token sliding window
def test_blocks_replayed_with_their_own_inputs_equal_the_full_model(tiny, batch, seqlen):
    """Running the captured inputs block after block reproduces the model's own hidden states at every block."""
    ids = torch.randint(3, 259, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    hidden, per_block = tiny.adapter.capture_inputs_per_block(ids)
    assert len(per_block) == tiny.adapter.num_blocks
    for index in range(tiny.adapter.num_blocks):
        torch.testing.assert_close(hidden, expected[index], rtol=0, atol=1e-5, msg=f"input of block {index}")
        with torch.no_grad():
            hidden = tiny.adapter.run_block(index, hidden, per_block[index])
