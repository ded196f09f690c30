"""Per-task sub-networks and the continual-learning harness on a tiny synthetic benchmark (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from sparseforge.dst.benchmarks import augment_batch, split_benchmark, split_classes
from sparseforge.dst.continual import ContinualConfig, run_continual
from sparseforge.dst.grid import grid_configs, read_results, run_grid, summarise
from sparseforge.dst.metrics import continual_metrics
from sparseforge.dst.subnetworks import TaskSubnetworks
from sparseforge.errors import SparseTrainingError

from helpers import synthetic_dataset


@pytest.fixture(scope="module")
def benchmark():
    return split_benchmark(synthetic_dataset(), 2)


def test_split_needs_a_divisor_of_the_classes():
    assert split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(SparseTrainingError, match="do not divide 10 classes.*1, 2, 5, 10"):
        split_classes(10, 3)


def test_split_benchmark_keeps_each_tasks_classes(benchmark):
    assert [t.classes for t in benchmark.tasks] == [[0, 1], [2, 3]]
    assert set(benchmark.tasks[1].train_labels.tolist()) == {2, 3}
    assert benchmark.tasks[1].local(torch.tensor([2, 3])).tolist() == [0, 1]


def mlp(hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, hidden, bias=True), nn.ReLU(), nn.Linear(hidden, 4, bias=False))


def train_briefly(model, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(8, 1, 6, 6, generator=generator)
        loss = model(x)[:, classes].logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_frozen_weights_and_task_outputs_are_bit_identical_after_later_tasks():
    torch.manual_seed(0)
    model = mlp()
    tasks = TaskSubnetworks(model, 0.5, "uniform", seed=1, head="3", task_rows=[[0, 1], [2, 3], [0, 1]])
    x = torch.randn(5, 1, 6, 6)
    tasks.begin_task()
    train_briefly(model, [0, 1], 0)
    tasks.end_task()
    tasks.select_task(0)
    weights = {n: m.weight.detach().clone() for n, m in tasks.modules.items()}
    output = model(x).detach().clone()
    for _ in range(2):  # later tasks, with weight decay that would move any weight it can reach
        tasks.begin_task()
        train_briefly(model, [2, 3], 1)
        tasks.end_task()
    tasks.select_task(0)
    assert all(torch.equal(weights[n], m.weight) for n, m in tasks.modules.items())
    assert torch.equal(model(x), output)


def test_transitions_are_guarded():
    tasks = TaskSubnetworks(mlp(), 0.5, head="3", task_rows=[[0, 1], [2, 3]])
    with pytest.raises(SparseTrainingError, match="end a task while ready"):
        tasks.end_task()
    with pytest.raises(SparseTrainingError, match="not been trained"):
        tasks.select_task(0)
    tasks.begin_task()
    with pytest.raises(SparseTrainingError, match="select a task for inference while training"):
        tasks.select_task(0)
    with pytest.raises(SparseTrainingError, match="begin a task while training"):
        tasks.begin_task()


@pytest.mark.parametrize("new_weights", ["zero", "init"])
def test_new_task_weights_start_as_documented_and_shared_ones_keep_their_values(new_weights):
    torch.manual_seed(0)
    model = mlp()
    tasks = TaskSubnetworks(model, 0.5, new_weights=new_weights, seed=3, head="3", task_rows=[[0, 1], [2, 3]])
    tasks.begin_task()
    train_briefly(model, [0, 1], 0)
    tasks.end_task()
    tasks.begin_task()
    keeper = tasks.keepers["1"]
    own = keeper.mask & ~keeper.used
    shared = keeper.mask & keeper.used
    weight = tasks.modules["1"].weight
    assert int(shared.sum()) > 0 and int(own.sum()) > 0
    assert torch.equal(weight[shared], keeper.store[shared])
    assert bool((weight[own] == 0).all()) == (new_weights == "zero")


def test_head_rows_belong_to_their_task_only():
    tasks = TaskSubnetworks(mlp(), 0.5, "erk", head="3", task_rows=[[0, 1], [2, 3]])
    tasks.begin_task()
    head_mask = tasks.keepers["3"].mask
    assert bool(head_mask[[0, 1]].any()) and not bool(head_mask[[2, 3]].any())


def test_too_many_tasks_for_the_free_capacity_is_refused_before_training():
    tasks = TaskSubnetworks(mlp(hidden=8), 0.7, head="3", task_rows=[[0, 1], [2, 3]])
    assert tasks.new_share_of_last_task(1) == 1.0
    assert tasks.new_share_of_last_task(3) == pytest.approx(0.3 ** 2)
    with pytest.raises(SparseTrainingError, match="exceed the network's free capacity: the last task could train "
                                                  "only 0.24% of its sub-network"):
        tasks.check_capacity(6)
    tasks.check_capacity(4)


def test_metrics_from_an_accuracy_matrix():
    matrix = [[0.9, 0.5, 0.4], [0.8, 0.95, 0.6], [0.7, 0.9, 1.0]]
    metrics = continual_metrics(matrix, initial=[0.5, 0.5, 0.5])
    assert metrics["average_accuracy"] == pytest.approx((0.7 + 0.9 + 1.0) / 3)
    assert metrics["backward_transfer"] == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert metrics["forward_transfer"] == pytest.approx(((0.5 - 0.5) + (0.6 - 0.5)) / 2)
    assert metrics["incremental_accuracy"] == pytest.approx([0.9, 0.875, 0.8666666])
    assert metrics["just_learned_accuracy"] == pytest.approx((0.9 + 0.95 + 1.0) / 3)


def tiny_config(**overrides) -> ContinualConfig:
    settings = dict(backbone="mlp", density=0.3, epochs=2, batch=16, delta_t=3, lr=1e-2)
    return ContinualConfig(**{**settings, **overrides})


@pytest.mark.parametrize("growth", ["random", "unfired", "gradient", "momentum"])
def test_dst_strategy_has_exactly_zero_backward_transfer_and_learns(benchmark, growth):
    result = run_continual(benchmark, tiny_config(growth=growth, init="erk"), progress=False)
    task = result["metrics"]["task"]
    assert task["backward_transfer"] == 0.0
    assert all(result["accuracy"]["task"][j][j] == result["accuracy"]["task"][-1][j] for j in range(2))
    assert task["average_accuracy"] > 0.75
    assert result["training"][0]["updates"] > 0 and result["training"][0]["rewired"] > 0
    assert result["tasks"][1]["shared"] > 0
    assert result["overlap"][0][0] == 1.0


def test_finetuning_forgets_and_dense_per_task_does_not(benchmark):
    finetune = run_continual(benchmark, tiny_config(strategy="finetune", epochs=6), progress=False)
    dense = run_continual(benchmark, tiny_config(strategy="dense-per-task"), progress=False)
    assert dense["metrics"]["task"]["backward_transfer"] == 0.0
    assert finetune["metrics"]["all"]["backward_transfer"] < 0
    assert "tasks" not in finetune


def test_static_strategy_never_rewires(benchmark):
    result = run_continual(benchmark, tiny_config(strategy="static"), progress=False)
    assert all(t["updates"] == 0 for t in result["training"])
    assert result["metrics"]["task"]["backward_transfer"] == 0.0


@pytest.mark.parametrize("bad", [dict(strategy="ewc"), dict(density=0.0), dict(density=1.2), dict(epochs=0),
                                 dict(growth="oracle"), dict(new_weights="copy")])
def test_bad_continual_settings_are_refused(bad):
    with pytest.raises(SparseTrainingError):
        ContinualConfig(**bad)


def test_augmentation_keeps_shapes_and_values():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=1)
    assert out.shape == images.shape
    assert set(out.unique().tolist()) <= set(images.unique().tolist()) | {0.0}


def test_grid_resumes_and_summarises(tmp_path, monkeypatch):
    from sparseforge.dst import grid

    monkeypatch.setattr(grid, "load_benchmark", lambda name, tasks, data: split_benchmark(synthetic_dataset(), 2))
    configs = grid_configs(tiny_config(epochs=1), ["uniform"], ["random"], [0.3], [0, 1])
    path = tmp_path / "grid.jsonl"
    first = run_grid("split-fashion-mnist", configs[:1], path, progress=False)
    path.write_text(path.read_text() + '{"config": {"strat')  # an interrupted write
    calls = []
    original = grid._run_one
    monkeypatch.setattr(grid, "_run_one", lambda config: calls.append(config) or original(config))
    results = run_grid("split-fashion-mnist", configs, path, progress=False)
    assert len(calls) == len(configs) - 1
    assert results[0]["accuracy"] == first[0]["accuracy"]
    assert len(read_results(path)) == len(configs)
    rows = {row["label"]: row for row in summarise(results)}
    assert rows["dst uniform random d=0.3"]["seeds"] == 2
    starved = replace(configs[0], density=0.9)
    mixed = run_grid("split-fashion-mnist", [starved, configs[0]], path, progress=False)
    assert "exceed the network's free capacity" in mixed[0]["refused"] and mixed[1] == results[0]
    assert len(summarise(mixed)) == 1
    assert json.dumps(rows)
