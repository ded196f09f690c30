"""Plain (single-task) sparse training from scratch of an image classifier: what ``sparseforge dst`` runs.

The training loop is the continual harness's own (``fit.py``), so the two are comparable. ``method="dense"`` trains the same network without masks, the reference a sparse run is judged by.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..data.images import ImageDataset
from ..errors import SparseTrainingError
from .backbones import BACKBONES, build_backbone
from .benchmarks import split_benchmark
from .continual import task_accuracy
from .engine import METHODS, DSTConfig, DynamicSparsity
from .fit import fit_classifier, total_steps

DENSE = "dense"


@dataclass(frozen=True)
class SparseTrainConfig:
    method: str = "rigl"
    density: float = 0.2
    init: str = "erk"
    backbone: str = "mlp"
    epochs: int = 10
    batch: int = 128
    lr: float = 1e-3
    delta_t: int = 100
    drop_fraction: float = 0.3
    stop_fraction: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != DENSE and self.method not in METHODS:
            raise SparseTrainingError(f"unknown method '{self.method}'; available: {DENSE}, {', '.join(METHODS)}")
        if self.backbone not in BACKBONES:
            raise SparseTrainingError(f"unknown backbone '{self.backbone}'; available: {', '.join(BACKBONES)}")
        if self.epochs < 1 or self.batch < 1:
            raise SparseTrainingError("epochs and batch must be at least 1")
        self.dst_config(1)

    def dst_config(self, total_steps: int) -> DSTConfig | None:
        if self.method == DENSE:
            return None
        return DSTConfig(density=self.density, init=self.init, method=self.method, delta_t=self.delta_t,
                         drop_fraction=self.drop_fraction, total_steps=total_steps,
                         stop_fraction=self.stop_fraction, seed=self.seed)


def train_sparse_classifier(dataset: ImageDataset, config: SparseTrainConfig, augment: bool = False,
                            progress: bool = True) -> dict:
    """Train a fresh backbone on every class of ``dataset``; returns accuracy, density and the trained model."""
    torch.manual_seed(config.seed)
    data = split_benchmark(dataset, 1, augment).tasks[0]
    model = build_backbone(config.backbone, tuple(data.train_images.shape[1:]), dataset.num_classes)
    total = total_steps(len(data.train_labels), config.batch, config.epochs)
    dst = config.dst_config(total)
    engine = DynamicSparsity.install(model, dst) if dst else None
    started = time.perf_counter()
    bar = tqdm(total=config.epochs, desc=f"{config.method} d={config.density:g}", unit="epoch", disable=not progress,
               leave=False)
    losses = fit_classifier(model, data.train_images, data.train_labels, config.epochs, config.batch, config.lr,
                            torch.Generator().manual_seed(config.seed), augment,
                            on_optimizer=engine.attach if engine else None, on_epoch=lambda: bar.update(1))
    bar.close()
    seconds = time.perf_counter() - started
    accuracy = task_accuracy(model, data, "all")
    result = {"config": asdict(config), "accuracy": accuracy, "seconds": seconds, "steps": total,
              "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "density": engine.density() if engine else 1.0,
              "updates": len(engine.history) if engine else 0,
              "layer_densities": {n: float(m.float().mean()) for n, m in engine.masks().items()} if engine else {}}
    masks = engine.masks() if engine else {}
    if engine:
        engine.release()
    return {"result": result, "model": model, "masks": masks}

