"""Helpers shared by test modules: running the CLI in-process, checking a clean failure, small datasets."""

import sys

import torch

from sparseforge.cli import main
from sparseforge.data.images import ImageDataset


def run_cli(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["sparseforge", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, pattern):
    assert code == 2
    assert "Traceback" not in err
    # progress lines ("› step", progress bars) may come first; the failure itself is exactly one line
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("›") and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert pattern in lines[0], lines[0]


def synthetic_dataset(classes: int = 4, per_class: int = 48, seed: int = 0) -> ImageDataset:
    """Class-dependent blobs on 6x6 grey images: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, 6, 6, 1, generator=generator) * 255

    def draw(n):
        labels = torch.arange(classes).repeat_interleave(n)
        noise = torch.randn(len(labels), 6, 6, 1, generator=generator) * 40
        return (centres[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    train, test = draw(per_class), draw(per_class // 2)
    return ImageDataset("synthetic", *train, *test, tuple(f"c{i}" for i in range(classes)), "test")
