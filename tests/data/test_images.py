"""Image data: IDX and PNG decoding with clear errors for truncated files, splits, image folders."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sparseforge.data.images import (cifar10_from_task_json, load_fashion_mnist, load_image_folder, read_idx,
                                     stratified_split)
from sparseforge.dst.benchmarks import load_benchmark
from sparseforge.errors import DataError, SparseTrainingError


def idx_bytes(array: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(directory, train: int = 20, test: int = 10, truncate: bool = False) -> None:
    rng = np.random.default_rng(0)
    parts = {"train-images-idx3-ubyte": rng.integers(0, 255, (train, 28, 28), dtype=np.uint8),
             "train-labels-idx1-ubyte": (np.arange(train) % 10).astype(np.uint8),
             "t10k-images-idx3-ubyte": rng.integers(0, 255, (test, 28, 28), dtype=np.uint8),
             "t10k-labels-idx1-ubyte": (np.arange(test) % 10).astype(np.uint8)}
    for stem, array in parts.items():
        data = idx_bytes(array)
        if truncate and stem.startswith("train-images"):
            data = data[:-100]
        (directory / f"{stem}.gz").write_bytes(gzip.compress(data))


def png_bytes(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    assert torch.equal(read_idx(tmp_path / "a"), torch.from_numpy(array))


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    write_fashion(tmp_path, truncate=True)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is truncated"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_from_a_directory(tmp_path):
    write_fashion(tmp_path)
    data = load_fashion_mnist(tmp_path)
    assert data.train_images.shape == (20, 28, 28, 1) and data.test_labels.shape == (10,)
    assert data.num_classes == 10


def test_cifar_task_file_decodes_and_a_corrupt_png_is_refused(tmp_path):
    good = {"input": base64.b64encode(png_bytes((255, 0, 0))).decode(),
            "target_scores": "{'airplane': 0, 'automobile': 1, 'bird': 0}"}
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [good, good]}))
    images, labels = cifar10_from_task_json(path)
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [1, 1]
    assert images[0, 0, 0].tolist() == [255, 0, 0]
    cut = dict(good, input=base64.b64encode(png_bytes((0, 0, 255))[:60]).decode())
    path.write_text(json.dumps({"examples": [good, cut]}))
    with pytest.raises(DataError, match="does not decode"):
        cifar10_from_task_json(path)


def test_stratified_split_is_fixed_and_balanced():
    labels = torch.arange(5).repeat(10)
    train, test = stratified_split(labels, 3, seed=0)
    assert torch.equal(stratified_split(labels, 3, seed=0)[1], test)
    assert labels[test].bincount().tolist() == [3] * 5
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == 50


def test_image_folder_resizes_and_holds_out(tmp_path):
    for index, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for item in range(4):
            (tmp_path / name / f"{item}.png").write_bytes(png_bytes((index * 200, 10, 10), size=40))
    data = load_image_folder(tmp_path, size=32, test_per_class=1)
    assert data.classes == ("cat", "dog")
    assert data.train_images.shape == (6, 32, 32, 3) and data.test_labels.tolist() == [0, 1]


def test_benchmark_errors():
    with pytest.raises(SparseTrainingError, match="unknown benchmark"):
        load_benchmark("split-svhn")
    with pytest.raises(SparseTrainingError, match="needs --data"):
        load_benchmark("split-miniimagenet")


def test_unreachable_package_index_is_a_clear_error(tmp_path, monkeypatch):
    from sparseforge.assets import fetch_sdist
    from sparseforge.errors import SparseforgeError

    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(SparseforgeError, match="could not reach the package index for bigbench"):
        fetch_sdist("bigbench", "1.0.0")
    assert not list(tmp_path.glob("sdists/*"))
