import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.models.loading import load_model
from sparseforge.prune.pruner import prune
from sparseforge.sparsity.masks import check_masks_hold, enforce_masks, release_masks


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(["llama", "gpt2", "opt"]), pattern=st.sampled_from(["unstructured", "2:4", "4:8"]),
       steps=st.integers(1, 4), lr=st.floats(1e-3, 1e-1))
def test_pruned_weights_stay_zero_through_training(family, pattern, steps, lr):
    """Under the parametrization, AdamW with weight decay cannot revive a pruned weight."""
    handle = load_model(f"tiny-{family}")
    prune(handle, sparsity=0.5, pattern=pattern, progress=False)
    enforce_masks(handle.adapter, handle.masks)
    optimizer = torch.optim.AdamW(handle.model.parameters(), lr=lr, weight_decay=0.1)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = handle.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert check_masks_hold(handle.adapter, handle.masks) == []
    release_masks(handle.adapter)
    assert check_masks_hold(handle.adapter, handle.masks) == []
    for view in handle.adapter.linears():
        assert float((view.weight == 0).float().mean()) >= 0.5


def test_training_changes_kept_weights(tiny_llama):
    """The enforcement must not freeze the layer: kept weights still learn."""
    prune(tiny_llama, sparsity=0.5, progress=False)
    before = {v.name: v.weight.detach().clone() for v in tiny_llama.adapter.linears()}
    enforce_masks(tiny_llama.adapter, tiny_llama.masks)
    optimizer = torch.optim.SGD(tiny_llama.model.parameters(), lr=0.1)
    ids = torch.randint(3, 200, (2, 16))
    tiny_llama.model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    release_masks(tiny_llama.adapter)
    changed = [not torch.equal(before[v.name], v.weight) for v in tiny_llama.adapter.linears()]
    assert any(changed)


def test_masks_from_zeros_recover_the_pruning_masks(tiny, tmp_path):
    """Asked for explicitly, the zeros of a model pruned elsewhere and saved dense become its masks."""
    prune(tiny, sparsity=0.6, progress=False)
    tiny.model.save_pretrained(tmp_path / "plain")
    tiny.tokenizer.save_pretrained(tmp_path / "plain")
    assert load_model(str(tmp_path / "plain")).masks == {}
    recovered = load_model(str(tmp_path / "plain"), masks_from_zeros=True).masks
    assert set(recovered) == set(tiny.masks)
    for name, mask in tiny.masks.items():
        assert torch.equal(recovered[name], mask)