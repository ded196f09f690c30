"""The continual-learning harness: train tasks in sequence with a strategy, fill the accuracy matrix, report.

Strategies:

* ``dst``: a fresh sparse mask per task (uniform or ERK), rewired by dynamic sparse training while the task trains;
  earlier tasks' weights frozen and shared (:class:`TaskSubnetworks`); the last sparse layer is the head, whose
  rows each task owns for its own classes.
* ``static``: the same, without topology updates (a static random sparse mask per task), the study's control.
* ``finetune``: one dense network trained on every task in turn; shows forgetting.
* ``dense-per-task``: a separate dense network per task, the upper bound (T times the parameters).

Training follows the study's code: Adam (lr 1e-3, no weight decay), a fresh optimizer per task, the loss on the
task's slice of the single head, learning rate x0.1 at 50% and 75% of the task's steps, the DST drop fraction
decaying with a cosine from 0.5 to 0.005 over the task. Unlike the reference, the final weights of each task are
kept (not the epoch with the best *training* accuracy).

Every result is reported with two scorings, because they differ and the study's code uses the uncommon one:
``task`` = argmax within the task's classes (standard task-incremental), ``all`` = argmax over every logit of the
head (the reference code's choice).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SparseTrainingError
from .backbones import BACKBONES, build_backbone
from .benchmarks import SplitBenchmark, Task, benchmark_spec, split_classes
from .engine import DSTConfig, DynamicSparsity
from .fit import fit_classifier, total_steps
from .masks import check_density, sparse_targets
from .metrics import continual_metrics
from .rules import DROP_RULES, GROWTH_RULES, check_rule
from .subnetworks import NEW_WEIGHTS, TaskSubnetworks

STRATEGIES = ("dst", "static", "finetune", "dense-per-task")
SCORINGS = ("task", "all")
EVAL_BATCH = 1000


@dataclass(frozen=True)
class ContinualConfig:
    strategy: str = "dst"
    backbone: str = "mlp"
    density: float = 0.2
    init: str = "uniform"
    growth: str = "random"
    drop: str = "magnitude"
    delta_t: int = 50
    drop_fraction: float = 0.5
    final_drop_fraction: float = 0.005
    new_weights: str = "zero"
    epochs: int = 3
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SparseTrainingError(f"unknown strategy '{self.strategy}'; available: {', '.join(STRATEGIES)}")
        if self.backbone not in BACKBONES:
            raise SparseTrainingError(f"unknown backbone '{self.backbone}'; available: {', '.join(BACKBONES)}")
        check_density(self.density)
        check_rule("growth", self.growth, GROWTH_RULES)
        check_rule("drop", self.drop, DROP_RULES)
        if self.new_weights not in NEW_WEIGHTS:
            raise SparseTrainingError(f"new_weights must be one of {', '.join(NEW_WEIGHTS)}")
        for name in ("epochs", "batch", "delta_t"):
            if getattr(self, name) < 1:
                raise SparseTrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SparseTrainingError(f"learning rate must be positive, got {self.lr}")
        # Validate the sparse-training settings once, before any data is touched.
        self.dst_config(1)

    @property
    def sparse(self) -> bool:
        return self.strategy in ("dst", "static")

    def dst_config(self, total_steps: int) -> DSTConfig:
        return DSTConfig(density=self.density, init=self.init, method=None if self.strategy == "dst" else "static",
                         drop=self.drop, growth=self.growth, delta_t=self.delta_t, drop_fraction=self.drop_fraction,
                         final_drop_fraction=self.final_drop_fraction, total_steps=total_steps, seed=self.seed)

    def label(self) -> str:
        if self.strategy in ("finetune", "dense-per-task"):
            return self.strategy
        growth = f" {self.growth}" if self.strategy == "dst" else ""
        return f"{self.strategy} {self.init}{growth} d={self.density:g}"


@torch.no_grad()
def task_accuracy(model: nn.Module, task: Task, scoring: str) -> float:
    model.eval()
    correct = 0
    classes = torch.tensor(task.classes)
    for start in range(0, len(task.test_labels), EVAL_BATCH):
        logits = model(task.test_images[start:start + EVAL_BATCH])
        labels = task.test_labels[start:start + EVAL_BATCH]
        if scoring == "task":
            predicted = classes[logits[:, classes].argmax(dim=1)]
        else:
            predicted = logits.argmax(dim=1)
        correct += int((predicted == labels).sum())
    return correct / len(task.test_labels)


def train_task(model: nn.Module, task: Task, config: ContinualConfig, augment: bool, keepers: dict | None,
               modules: dict | None, progress) -> dict:
    """Train ``model`` on one task (its slice of the head); with ``keepers``, DST rewires the task's mask."""
    total = total_steps(len(task.train_labels), config.batch, config.epochs)
    engine = DynamicSparsity.over(modules, keepers, config.dst_config(total)) if keepers is not None else None
    losses = fit_classifier(model, task.train_images, task.local(task.train_labels), config.epochs, config.batch,
                            config.lr, torch.Generator().manual_seed(config.seed * 7919 + task.index), augment,
                            columns=torch.tensor(task.classes), on_optimizer=engine.attach if engine else None,
                            on_epoch=lambda: progress.update(1))
    if engine is not None:
        engine.detach()
    return {"steps": total, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "updates": len(engine.history) if engine else 0,
            "rewired": sum(sum(r.rewired.values()) for r in engine.history) if engine else 0}


class _Evaluator:
    """Fills one accuracy matrix per scoring; ``model_for(j, scoring)`` gives the network that answers task j."""

    def __init__(self, benchmark: SplitBenchmark):
        self.benchmark = benchmark
        size = len(benchmark.tasks)
        self.matrix = {s: [[0.0] * size for _ in range(size)] for s in SCORINGS}

    def row(self, after: int, model_for) -> None:
        for task in self.benchmark.tasks:
            for scoring in SCORINGS:
                self.matrix[scoring][after][task.index] = task_accuracy(model_for(task.index, scoring), task, scoring)

    def initial(self, model: nn.Module) -> dict[str, list[float]]:
        return {s: [task_accuracy(model, task, s) for task in self.benchmark.tasks] for s in SCORINGS}


def sparse_subnetworks(model: nn.Module, config: ContinualConfig, task_classes: list[list[int]]) -> TaskSubnetworks:
    """Per-task masks over ``model`` (its last sparse layer is the head), refused up front if capacity runs out."""
    head = list(sparse_targets(model))[-1]
    subnetworks = TaskSubnetworks(model, config.density, config.init, config.new_weights, config.seed, head,
                                  task_classes)
    subnetworks.check_capacity(len(task_classes))
    return subnetworks


def preflight(benchmark: str, config: ContinualConfig, tasks: int | None = None, data: str | None = None) -> None:
    """Every check that needs no data (benchmark, task split, capacity), so a bad request fails in a second."""
    spec = benchmark_spec(benchmark, tasks, data)
    if config.sparse and not spec.needs_data:
        model = build_backbone(config.backbone, spec.input_shape, spec.classes)
        sparse_subnetworks(model, config, split_classes(spec.classes, tasks or spec.tasks))


def run_continual(benchmark: SplitBenchmark, config: ContinualConfig, progress: bool = True) -> dict:
    """Train every task of ``benchmark`` in order with ``config``; returns accuracy matrices, metrics and stats."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    tasks = benchmark.tasks
    evaluator = _Evaluator(benchmark)
    bar = tqdm(total=len(tasks) * config.epochs, desc=config.label(), unit="epoch", disable=not progress,
               leave=False)

    def fresh_model() -> nn.Module:
        return build_backbone(config.backbone, benchmark.input_shape, benchmark.num_classes)

    model = fresh_model()
    subnetworks = None
    if config.sparse:
        subnetworks = sparse_subnetworks(model, config, [task.classes for task in tasks])
    training = []
    initial = None
    per_task_models: list[nn.Module] = []
    for task in tasks:
        if config.strategy == "dense-per-task" and task.index > 0:
            model = fresh_model()
        keepers = subnetworks.begin_task() if subnetworks else None
        if initial is None:
            initial = evaluator.initial(model)
        training.append(train_task(model, task, config, benchmark.augment, keepers,
                                   subnetworks.modules if subnetworks else None, bar))
        if subnetworks:
            subnetworks.end_task()
            current = task.index

            def prepare(j: int, scoring: str, current: int = current) -> nn.Module:
                subnetworks.select_task(min(j, current), head_tasks=current + 1 if scoring == "all" else None)
                return model

            evaluator.row(task.index, prepare)
        elif config.strategy == "dense-per-task":
            per_task_models.append(model)
            evaluator.row(task.index, lambda j, scoring: per_task_models[min(j, len(per_task_models) - 1)])
        else:
            evaluator.row(task.index, lambda j, scoring: model)
    bar.close()
    parameters = sum(p.numel() for p in model.parameters())
    result = {
        "config": asdict(config),
        "benchmark": benchmark.describe(),
        "accuracy": evaluator.matrix,
        "initial_accuracy": initial,
        "metrics": {s: continual_metrics(evaluator.matrix[s], initial[s]) for s in SCORINGS},
        "training": training,
        "seconds": time.perf_counter() - started,
        "parameters_per_network": parameters,
    }
    if subnetworks:
        result["tasks"] = subnetworks.task_statistics()
        result["overlap"] = subnetworks.overlap_matrix()
        result["used_fraction"] = subnetworks.used_fraction()
        result["layer_densities"] = subnetworks.densities
        result["frozen_after_first_task"] = subnetworks.dense_layers()
    return result

