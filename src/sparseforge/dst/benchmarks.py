"""Task-incremental split benchmarks: an image dataset's classes cut in order into equal tasks.

Images become float tensors [N, C, H, W] normalised per channel with the training set's statistics. Each task
keeps its classes' global labels; the harness trains and scores a task on its own slice of the single head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..data.images import ImageDataset, load_cifar10, load_cifar100, load_fashion_mnist, load_image_folder
from ..errors import SparseTrainingError


@dataclass
class Task:
    index: int
    classes: list[int]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def local(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels -> positions within this task's classes."""
        lookup = torch.full((max(self.classes) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        return lookup[labels]


@dataclass
class SplitBenchmark:
    name: str
    tasks: list[Task]
    input_shape: tuple[int, ...]
    num_classes: int
    source: str
    augment: bool

    def describe(self) -> str:
        sizes = f"{len(self.tasks[0].train_labels)}/{len(self.tasks[0].test_labels)}"
        return (f"{self.name}: {len(self.tasks)} tasks x {len(self.tasks[0].classes)} classes, input "
                f"{'x'.join(map(str, self.input_shape))}, train/test per task {sizes}, source {self.source}")


def split_classes(num_classes: int, tasks: int) -> list[list[int]]:
    if tasks < 1 or num_classes % tasks:
        raise SparseTrainingError(f"{tasks} tasks do not divide {num_classes} classes; use a divisor of "
                                  f"{num_classes}: {', '.join(str(d) for d in range(1, num_classes + 1) if not num_classes % d)}")
    size = num_classes // tasks
    return [list(range(t * size, (t + 1) * size)) for t in range(tasks)]


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float().div_(255) - mean) / std


def split_benchmark(dataset: ImageDataset, tasks: int, augment: bool = False) -> SplitBenchmark:
    groups = split_classes(dataset.num_classes, tasks)
    pixels = dataset.train_images.permute(0, 3, 1, 2).float().div_(255)
    mean, std = pixels.mean(dim=(0, 2, 3), keepdim=True)[0], pixels.std(dim=(0, 2, 3), keepdim=True)[0]
    train_x = _normalise(dataset.train_images, mean, std)
    test_x = _normalise(dataset.test_images, mean, std)
    split = []
    for index, classes in enumerate(groups):
        members = torch.tensor(classes)
        train = torch.isin(dataset.train_labels, members)
        test = torch.isin(dataset.test_labels, members)
        split.append(Task(index, classes, train_x[train], dataset.train_labels[train], test_x[test],
                          dataset.test_labels[test]))
    return SplitBenchmark(f"split-{dataset.name}", split, tuple(train_x.shape[1:]), dataset.num_classes,
                          dataset.source, augment)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: its loader, default task count, training augmentation (random crop + flip), and
    the input shape and class count it will have, so settings can be checked before any data is loaded."""

    loader: Callable[..., ImageDataset]
    tasks: int
    augment: bool
    input_shape: tuple[int, ...]
    classes: int
    needs_data: bool = False


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "split-fashion-mnist": BenchmarkSpec(load_fashion_mnist, 5, False, (1, 28, 28), 10),
    "split-cifar10": BenchmarkSpec(load_cifar10, 5, True, (3, 32, 32), 10),
    "split-cifar100": BenchmarkSpec(load_cifar100, 10, True, (3, 32, 32), 100),
    "split-miniimagenet": BenchmarkSpec(load_image_folder, 10, True, (3, 32, 32), 100, needs_data=True),
}


def benchmark_spec(name: str, tasks: int | None = None, data: str | None = None) -> BenchmarkSpec:
    """The spec of ``name``, with the task split and data argument checked (no data is loaded)."""
    if name not in BENCHMARKS:
        raise SparseTrainingError(f"unknown benchmark '{name}'; available: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    if spec.needs_data and data is None:
        raise SparseTrainingError(f"{name} needs --data: a directory with one sub-directory of images per class")
    if not spec.needs_data:
        split_classes(spec.classes, tasks or spec.tasks)
    return spec


def load_benchmark(name: str, tasks: int | None = None, data: str | None = None) -> SplitBenchmark:
    """A registered benchmark; ``data`` is its directory or file where it needs one (miniImageNet: required)."""
    spec = benchmark_spec(name, tasks, data)
    dataset = spec.loader(data) if data is not None else spec.loader()
    return split_benchmark(dataset, tasks or spec.tasks, spec.augment)


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image (the study's CIFAR augmentation)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, images.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, images.shape[1], h, w)
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped
