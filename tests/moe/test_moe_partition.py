"""Partitions of FFN neurons into experts (the first piece of FactorLLM)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import FactorizeError
from sparseforge.models.surgery import remove_sublayer
from sparseforge.moe import PARTITIONS, neuron_features, partition_neurons


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(PARTITIONS), st.sampled_from([1, 2, 4, 8]), st.integers(0, 3))
def test_every_neuron_is_in_exactly_one_equal_expert(rule, experts, seed):
    features = torch.randn(64, 12, generator=torch.Generator().manual_seed(seed))
    groups = partition_neurons(features, experts, rule, seed)
    assert groups.shape == (experts, 64 // experts)
    assert torch.equal(groups.flatten().sort().values, torch.arange(64))
    assert torch.equal(groups, groups.sort(dim=1).values)


def test_rules_differ_as_documented():
    features = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(partition_neurons(features, 4, "contiguous"), torch.arange(32).reshape(4, 8))
    first, again = partition_neurons(features, 4, "random", 1), partition_neurons(features, 4, "random", 1)
    assert torch.equal(first, again) and not torch.equal(first, partition_neurons(features, 4, "random", 2))


def test_kmeans_puts_neurons_with_similar_weights_together():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 5
    owner = torch.randperm(32, generator=generator) % 4  # 8 neurons around each of 4 directions, shuffled
    features = centres[owner] + 0.05 * torch.randn(32, 16, generator=generator)
    groups = partition_neurons(features, 4, "kmeans")
    assert all(len(set(owner[g].tolist())) == 1 for g in groups)


def test_features_come_from_every_ffn_projection_of_every_family(tiny):
    features = neuron_features(tiny.adapter, 0)
    views = tiny.adapter.ffn(0).linears
    width = views[tiny.adapter.spec.ffn_output_role].in_features
    assert features.shape == (width, tiny.adapter.embed_tokens().weight.shape[1] * len(views))
    remove_sublayer(tiny.adapter, 1, "ffn")
    with pytest.raises(FactorizeError, match="block 1 has no FFN"):
        neuron_features(tiny.adapter, 1)


@pytest.mark.parametrize("experts, message", [(0, "at least 1"), (5, "nearest that do: 4, 6"),
                                              (7, "nearest that do: 6, 8")])
def test_unequal_or_impossible_expert_counts_are_refused(experts, message):
    with pytest.raises(FactorizeError, match=message):
        partition_neurons(torch.randn(96, 4), experts)
    with pytest.raises(FactorizeError, match="unknown partition 'spectral'"):
        partition_neurons(torch.randn(96, 4), 4, "spectral")
