"""Dynamic sparse training engine: mask initialisation, exact counts through updates, zeros kept by the core."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.dst.engine import METHODS, DSTConfig, DynamicSparsity, cosine_fraction
from sparseforge.dst.masks import layer_densities, random_mask, sparse_targets
from sparseforge.dst.rules import GROWTH_RULES, LayerState, drop_set, top_positions
from sparseforge.errors import SparseTrainingError
from sparseforge.sparsity.allocation import erk_densities


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


def train_steps(model: nn.Module, optimizer, steps: int, check=None, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 1, 6, 6, generator=generator)
        y = torch.randint(0, 3, (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if check:
            check()


def test_erk_meets_the_global_density_and_favours_small_layers():
    shapes = {"big": (512, 784), "mid": (256, 512), "small": (10, 256)}
    densities = erk_densities(shapes, 0.1)
    total = sum(math.prod(s) for s in shapes.values())
    achieved = sum(densities[n] * math.prod(s) for n, s in shapes.items()) / total
    assert achieved == pytest.approx(0.1, rel=1e-9)
    assert densities["small"] > densities["mid"] > densities["big"]


def test_erk_makes_layers_dense_when_they_would_exceed_one():
    densities = erk_densities({"big": (1000, 1000), "tiny": (2, 3)}, 0.5)
    assert densities["tiny"] == 1.0
    assert 0 < densities["big"] < 1


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_zero_one_is_refused(density):
    with pytest.raises(SparseTrainingError, match="density"):
        DSTConfig(density=density)


@pytest.mark.parametrize("bad", [dict(init="gaussian"), dict(growth="oracle"), dict(drop="taylor"),
                                 dict(method="prospr"), dict(delta_t=0), dict(drop_fraction=1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SparseTrainingError):
        DSTConfig(**bad)


def test_random_mask_has_the_exact_count():
    mask = random_mask((37, 11), 0.3, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == round(0.3 * 37 * 11)


def test_install_zeroes_pruned_weights_and_keeps_the_optimizer_parameters():
    model = small_net()
    before = {id(p) for p in model.parameters()}
    engine = DynamicSparsity.install(model, DSTConfig(density=0.25, init="uniform", method="static"))
    assert {id(p) for p in model.parameters()} == before
    for name, layer in engine.layers.items():
        assert bool((layer.module.weight[~layer.keeper.mask] == 0).all())
    assert engine.density() == pytest.approx(0.25, abs=0.01)


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(["set", "rigl", "snfs"]), init=st.sampled_from(["uniform", "erk"]),
       density=st.floats(0.05, 0.9), seed=st.integers(0, 1000))
def test_every_update_keeps_the_exact_count_and_pruned_weights_at_zero(method, init, density, seed):
    model = small_net()
    engine = DynamicSparsity.install(model, DSTConfig(density=density, init=init, method=method, delta_t=2,
                                                      total_steps=12, seed=seed))
    counts = {name: int(layer.keeper.mask.sum()) for name, layer in engine.layers.items()}
    optimizer = engine.attach(torch.optim.Adam(model.parameters(), lr=1e-2))

    def check():
        for name, layer in engine.layers.items():
            assert int(layer.keeper.mask.sum()) == counts[name]
            assert bool((layer.module.weight[~layer.keeper.mask] == 0).all())

    train_steps(model, optimizer, 12, check, seed)
    assert len(engine.history) == 6
    assert sum(sum(r.rewired.values()) for r in engine.history) > 0


@pytest.mark.parametrize("growth", list(GROWTH_RULES))
def test_grown_weights_start_at_zero_and_their_optimizer_state_is_cleared(growth):
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    engine = DynamicSparsity.install(model, DSTConfig(density=0.5, init="uniform", growth=growth, delta_t=3,
                                                      drop_fraction=0.4, total_steps=100))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    layer = engine.layers["0"]
    seen = {}

    def capture(opt, args, kwargs):
        if engine.step % 3 == 2:
            seen["mask"] = layer.keeper.mask.clone()

    optimizer.register_step_post_hook(capture)
    engine.attach(optimizer)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    for _ in range(3):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    grown = layer.keeper.mask & ~seen["mask"]
    assert int(grown.sum()) > 0
    assert bool((layer.module.weight[grown] == 0).all())
    state = optimizer.state[layer.parameter]
    assert bool((state["exp_avg"][grown] == 0).all()) and bool((state["exp_avg_sq"][grown] == 0).all())


def test_gradient_growth_picks_the_largest_dense_gradients():
    mask = torch.tensor([[True, False, False, False]])
    state = LayerState(torch.tensor([[1.0, 0, 0, 0]]), mask, mask.clone(),
                       dense_grad=torch.tensor([[0.0, 0.1, -5.0, 2.0]]))
    scores = GROWTH_RULES["gradient"](state, torch.Generator())
    assert top_positions(scores, ~mask, 2, torch.Generator()).tolist() == [[False, False, True, True]]


def test_unfired_growth_prefers_positions_never_active():
    mask = torch.tensor([True, False, False, False, False, False])
    fired = torch.tensor([True, True, True, False, False, True])
    state = LayerState(torch.zeros(6), mask, fired)
    for seed in range(5):
        chosen = top_positions(GROWTH_RULES["unfired"](state, torch.Generator().manual_seed(seed)), ~mask, 2,
                               torch.Generator().manual_seed(seed))
        assert chosen.tolist() == [False, False, False, True, True, False]


def test_set_drop_takes_half_from_each_side_of_zero():
    weight = torch.tensor([0.1, 0.5, 2.0, -0.2, -3.0, -0.05])
    dropped = drop_set(LayerState(weight, torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)), 4,
                       torch.Generator())
    assert dropped.tolist() == [True, True, False, True, False, True]


def test_gradient_growth_without_a_backward_pass_says_so():
    model = nn.Sequential(nn.Linear(4, 4))
    engine = DynamicSparsity.install(model, DSTConfig(density=0.5, method="rigl"))
    with pytest.raises(SparseTrainingError, match="gradient"):
        engine.update()


def test_cosine_decays_from_the_start_to_the_final_fraction():
    config = DSTConfig(drop_fraction=0.5, final_drop_fraction=0.005, total_steps=100)
    assert cosine_fraction(config, 0) == pytest.approx(0.5)
    assert cosine_fraction(config, 50) == pytest.approx(0.2525)
    assert cosine_fraction(config, 100) == pytest.approx(0.005)


def test_updates_stop_after_the_stop_fraction():
    model = small_net()
    engine = DynamicSparsity.install(model, DSTConfig(density=0.3, method="set", delta_t=2, total_steps=10,
                                                      stop_fraction=0.5))
    train_steps(model, engine.attach(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)), 10)
    assert [record.step for record in engine.history] == [2, 4]


def test_static_method_never_changes_the_mask():
    model = small_net()
    engine = DynamicSparsity.install(model, DSTConfig(density=0.3, method="static", delta_t=1))
    before = engine.masks()
    train_steps(model, engine.attach(torch.optim.Adam(model.parameters())), 5)
    assert all(torch.equal(before[n], m) for n, m in engine.masks().items())
    assert METHODS["static"] is None


def test_release_leaves_plain_weights_with_the_zeros():
    model = small_net()
    engine = DynamicSparsity.install(model, DSTConfig(density=0.3, method="rigl", delta_t=2, total_steps=6))
    train_steps(model, engine.attach(torch.optim.Adam(model.parameters())), 6)
    masks = engine.masks()
    engine.release()
    for name, module in sparse_targets(model).items():
        assert isinstance(module.weight, nn.Parameter)
        assert bool((module.weight[~masks[name]] == 0).all())


def test_uniform_densities_are_the_target_everywhere():
    assert set(layer_densities({"a": (3, 4), "b": (5, 6)}, 0.3, "uniform").values()) == {0.3}
