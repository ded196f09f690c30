"""Routed experts with sparse dispatch: exact with every expert, equal to masked dense computation with top-k."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseforge.errors import FactorizeError
from sparseforge.models.adapters.base import get_path
from sparseforge.moe import neuron_features, partition_neurons
from sparseforge.moe.dispatch import ExpertDispatch

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def _router(hidden: int, experts: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(hidden, experts).double()


def _dispatch_all_blocks(handle, experts, topk, rule="kmeans"):
    adapter = handle.adapter
    hidden = adapter.embed_tokens().weight.shape[1]
    return [ExpertDispatch(adapter, layer, partition_neurons(neuron_features(adapter, layer), experts, rule),
                           _router(hidden, experts), topk) for layer in range(adapter.num_blocks)]


@pytest.mark.parametrize("rule", ["contiguous", "kmeans"])
def test_all_experts_active_reproduce_the_dense_model_for_every_family(tiny, rule):
    tiny.model.double()
    with torch.no_grad():
        dense = tiny.model(input_ids=IDS).logits
        dispatches = _dispatch_all_blocks(tiny, 4, 4, rule)
        routed = tiny.model(input_ids=IDS).logits
        torch.testing.assert_close(routed, dense, rtol=0, atol=1e-10)
        for dispatch in dispatches:
            dispatch.remove()
        torch.testing.assert_close(tiny.model(input_ids=IDS).logits, dense, rtol=0, atol=0)


def test_top_k_runs_only_the_selected_experts(tiny):
    """Reference: the dense FFN with the unselected neurons' activations zeroed, rescaled by N / k."""
    tiny.model.double()
    adapter = tiny.adapter
    dispatches = _dispatch_all_blocks(tiny, 4, 2, "random")
    with torch.no_grad():
        routed = tiny.model(input_ids=IDS).logits
    selections = [d.selection.clone() for d in dispatches]
    for dispatch in dispatches:
        dispatch.remove()
    handles = []
    for layer, (dispatch, selection) in enumerate(zip(dispatches, selections)):
        keep = torch.zeros(selection.shape[0], dispatch.partition.numel(), dtype=torch.float64)
        for slot in range(selection.shape[1]):
            keep[torch.arange(selection.shape[0])[:, None], dispatch.partition[selection[:, slot]]] = 1
        view = adapter.ffn(layer).linears[adapter.spec.ffn_output_role]
        module = get_path(adapter.blocks()[layer], adapter.spec.ffn_linears[adapter.spec.ffn_output_role])

        def masked(module, args, output, keep=keep, view=view):
            h = args[0].reshape(-1, keep.shape[1]) * keep
            out = (h @ view.weight.t()) * 2.0
            if view.bias is not None:
                out = out + view.bias
            return out.reshape(output.shape)

        handles.append(module.register_forward_hook(masked))
    with torch.no_grad():
        reference = tiny.model(input_ids=IDS).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(routed, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("topk, message", [(0, "between 1 and the number of experts"),
                                           (5, "between 1 and the number of experts")])
def test_bad_top_k_is_refused(tiny_llama, topk, message):
    partition = partition_neurons(neuron_features(tiny_llama.adapter, 0), 4)
    with pytest.raises(FactorizeError, match=message):
        ExpertDispatch(tiny_llama.adapter, 0, partition, nn.Linear(64, 4), topk)
