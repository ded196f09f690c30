"""Routed experts with sparse dispatch: exact with every expert, equal to masked dense computation with top-k,
the batch-1 path equal to the grouped path, dense (training) mode equal to sparse mode."""

from __future__ import annotations

import pytest
import torch

from sparseforge.models.adapters.base import get_path
from sparseforge.models.cache import cache_argument, cache_of
from sparseforge.moe import PARTITIONS, factorize, unfactorize

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(handle, ids=IDS):
    with torch.no_grad():
        return handle.model(input_ids=ids).logits


@pytest.mark.parametrize("rule", PARTITIONS)
def test_factorizing_with_every_expert_active_reproduces_the_dense_model_for_every_family(tiny, rule):
    tiny.model.double()
    dense = _logits(tiny)
    factorize(tiny, experts=4, topk=4, partition=rule, calibration=IDS)
    torch.testing.assert_close(_logits(tiny), dense, rtol=0, atol=1e-10)
    unfactorize(tiny)  # neurons stay reordered: still the same function
    torch.testing.assert_close(_logits(tiny), dense, rtol=0, atol=1e-10)


def test_a_shared_expert_with_every_routed_expert_active_is_also_exact(tiny):
    tiny.model.double()
    dense = _logits(tiny)
    routing = factorize(tiny, experts=4, topk=3, partition="kmeans", shared_expert=True)
    assert routing.layout.shared == 32 and routing.layout.routed == 3 and routing.layout.size == 32
    torch.testing.assert_close(_logits(tiny), dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_top_k_equals_the_masked_dense_ffn_rescaled_by_routed_over_k(tiny, shared):
    """Reference: the dense FFN with the unselected experts' activations zeroed, routed part times routed / k."""
    tiny.model.double()
    routing = factorize(tiny, experts=4, topk=2, partition="random", shared_expert=shared)
    routed = _logits(tiny)
    selections = [d._selection.clone() for d in routing.dispatches]
    layout, adapter = routing.layout, tiny.adapter
    routing.remove()
    hooks = []
    for layer, selection in enumerate(selections):
        keep = torch.zeros(selection.shape[0], layout.width, dtype=torch.float64)
        keep[:, :layout.shared] = 1
        for slot in range(selection.shape[1]):
            for token, expert in enumerate(selection[:, slot].tolist()):
                start, end = layout.bounds(expert)
                keep[token, start:end] = layout.routed / 2
        view = adapter.ffn(layer).linears[adapter.spec.ffn_output_role]
        module = get_path(adapter.blocks()[layer], adapter.spec.ffn_linears[adapter.spec.ffn_output_role])

        def masked(module, args, output, keep=keep, view=view):
            out = (args[0].reshape(-1, keep.shape[1]) * keep) @ view.weight.t()
            return (out if view.bias is None else out + view.bias).reshape(output.shape)

        hooks.append(module.register_forward_hook(masked))
    reference = _logits(tiny)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(routed, reference, rtol=0, atol=1e-10)


def test_batch_one_decoding_equals_the_grouped_path_and_counts_usage(tiny):
    tiny.model.double()
    routing = factorize(tiny, experts=4, topk=2, partition="kmeans", shared_expert=True)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        out = tiny.model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        routing.reset_usage()
        step = tiny.model(input_ids=token, **cache_argument(tiny.model, cache_of(out)), use_cache=True).logits
        grouped = tiny.model(input_ids=torch.cat([prompt, token], dim=1)).logits[:, -1:]
    torch.testing.assert_close(step, grouped, rtol=0, atol=1e-10)
    assert [sum(d.usage) for d in routing.dispatches] == [2 + 7 * 2] * tiny.adapter.num_blocks
    summary = routing.usage_summary()
    assert all(abs(sum(shares) - 1) < 1e-9 for shares in summary["per_layer"])


@pytest.mark.parametrize("straight_through", [False, True])
def test_dense_training_mode_returns_the_sparse_output_and_feeds_the_router_losses(tiny_llama, straight_through):
    tiny_llama.model.double()
    routing = factorize(tiny_llama, experts=4, topk=1)
    for router in routing.routers:
        router.double()
    sparse = _logits(tiny_llama)
    with routing.dense("straight_through" if straight_through else "pa_only"):
        for router in routing.routers:
            router.weight.requires_grad_(True)
        dense_mode = tiny_llama.model(input_ids=IDS).logits
        records = routing.records()
        assert len(records) == tiny_llama.adapter.num_blocks
        assert records[0].expert_outputs.shape == (IDS.numel(), 4, 64)
        dense_mode.sum().backward()
    torch.testing.assert_close(dense_mode.detach(), sparse, rtol=0, atol=1e-10)
    reached = routing.routers[0].weight.grad is not None and routing.routers[0].weight.grad.abs().sum() > 0
    assert reached == straight_through  # only a straight-through gate lets the LM loss reach the router
    assert routing.records() == []  # dense mode leaves nothing behind


def test_the_experts_sum_to_the_dense_ffn_output(tiny_llama):
    """What stage 1 relies on to drop the teacher copy: with frozen experts, sum of experts = dense FFN."""
    tiny_llama.model.double()
    adapter = tiny_llama.adapter
    captured = {}
    mlp = get_path(adapter.blocks()[1], adapter.spec.ffn_linears["down"].rsplit(".", 1)[0])
    mlp.register_forward_hook(lambda module, args, output: captured.__setitem__("x", (args[0], output)))
    routing = factorize(tiny_llama, experts=4, topk=1)
    with routing.dense():
        tiny_llama.model(input_ids=IDS)
        record = routing.records()[1]
        routing.remove()
        x, _ = captured["x"]
        dense_ffn = mlp(x).reshape(-1, 64)
    torch.testing.assert_close(record.expert_outputs.sum(-2), dense_ffn.detach(), rtol=0, atol=1e-10)
