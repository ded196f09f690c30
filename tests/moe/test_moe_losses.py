"""FactorLLM's router objectives against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sparseforge.errors import FactorizeError
from sparseforge.moe.losses import balance_loss, pa_labels, pa_loss


def test_labels_pick_the_experts_closest_to_their_share_of_the_teacher():
    teacher = torch.tensor([[4.0, 8.0]])
    experts = torch.tensor([[[0.0, 0.0], [2.0, 4.0], [9.0, 9.0], [2.1, 3.9]]])  # share = teacher / 2 = (2, 4)
    assert pa_labels(experts, teacher, 2).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert pa_labels(experts, teacher * 2, 1).tolist() == [[0.0, 1.0, 0.0, 0.0]]  # share = teacher / 4


def test_reverse_kl_matches_the_closed_form_and_only_the_router_gets_gradient():
    logits = torch.zeros(3, 4, requires_grad=True)  # uniform router
    experts = torch.randn(3, 4, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    loss = pa_loss(logits, experts, teacher, topk=2)
    high, low = math.e / (2 * math.e + 2), 1 / (2 * math.e + 2)  # softmax of a 2-hot label over 4 experts
    expected = 0.25 * (2 * math.log(0.25 / high) + 2 * math.log(0.25 / low))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and experts.grad is None and teacher.grad is None


def test_loss_averages_over_every_sequence_of_a_batch():
    logits = torch.randn(2, 3, 4)
    experts, teacher = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 6)
    whole = pa_loss(logits, experts, teacher, 1, "cross_entropy")
    per_sequence = [pa_loss(logits[i], experts[i], teacher[i], 1, "cross_entropy") for i in range(2)]
    assert whole.item() == pytest.approx(sum(p.item() for p in per_sequence) / 2, rel=1e-6)
    with pytest.raises(FactorizeError, match="unknown PA loss direction 'forward'"):
        pa_loss(logits, experts, teacher, 1, "forward")


def test_balance_term_is_the_mass_on_the_selected_experts():
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    assert balance_loss(logits, torch.tensor([[0]])).item() == pytest.approx(0.7 / 4)
    assert balance_loss(logits, torch.tensor([[1, 2]])).item() == pytest.approx(0.2 / 4)
