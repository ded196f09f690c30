"""The one training loop of image classifiers in ``dst/``: plain sparse training and every continual-learning task.

Adam, learning rate x0.1 at 50% and 75% of the steps (the continual-DST study's schedule), shuffled batches from a
seeded generator, optional random crop + flip. ``columns`` restricts the loss to a task's slice of the head (labels
are then positions within it); ``on_optimizer`` lets DST attach to the optimizer before the first step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .benchmarks import augment_batch


def total_steps(examples: int, batch: int, epochs: int) -> int:
    return -(-examples // batch) * epochs


def fit_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int, lr: float,
                   generator: torch.Generator, augment: bool = False, columns: torch.Tensor | None = None,
                   on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
                   on_epoch: Callable[[], None] | None = None) -> list[float]:
    """Train ``model`` in place; returns the loss of every step."""
    total = total_steps(len(labels), batch, epochs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, (3 * total) // 4], 0.1)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            inputs = augment_batch(images[rows], generator) if augment else images[rows]
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits if columns is None else logits[:, columns], labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        if on_epoch is not None:
            on_epoch()
    return losses
