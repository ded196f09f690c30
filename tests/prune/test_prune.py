import pytest
import torch

from sparseforge.errors import PatternError
from sparseforge.evaluation.stats import sparsity_summary
from sparseforge.prune.pruner import prune
from sparseforge.sparsity.masks import is_valid_nm


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_every_layer_reaches_the_target(tiny, sparsity):
    prune(tiny, sparsity=sparsity, progress=False)
    for row in sparsity_summary(tiny)["per_layer"]:
        numel = row["shape"][0] * row["shape"][1]
        assert row["zeros"] >= round(sparsity * numel)
        assert tiny.masks[row["name"]].sum().item() == numel - round(sparsity * numel)


def test_nm_pruning_gives_valid_groups_on_every_family(tiny):
    prune(tiny, pattern="2:4", progress=False)
    for view in tiny.adapter.linears():
        assert is_valid_nm(view.weight.detach() != 0, 2, 4)
        assert is_valid_nm(tiny.masks[view.name], 2, 4)


def test_embeddings_norms_and_head_are_not_pruned(tiny_llama):
    embed = tiny_llama.adapter.embed_tokens().weight.detach().clone()
    prune(tiny_llama, sparsity=0.9, progress=False)
    assert torch.equal(tiny_llama.adapter.embed_tokens().weight, embed)
    assert bool((tiny_llama.adapter.final_norm().weight != 0).all())


def test_per_row_threshold(tiny_llama):
    prune(tiny_llama, sparsity=0.5, per_row=True, progress=False)
    for view in tiny_llama.adapter.linears():
        assert ((view.weight == 0).sum(dim=1) == view.in_features // 2).all()


def test_bad_requests_leave_the_model_untouched(tiny_llama):
    state = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    for kwargs in ({"sparsity": 1.0}, {"sparsity": -0.2}, {"pattern": "4:2"}, {"pattern": "2:4", "sparsity": 0.7},
                   {"pattern": "3:48"}, {"method": "nope"}, {"allocation": "nope"}):
        with pytest.raises(PatternError):
            prune(tiny_llama, progress=False, **kwargs)
    for key, value in tiny_llama.model.state_dict().items():
        assert torch.equal(value, state[key])
    assert tiny_llama.masks == {}
