"""Shared fixtures. Tests never reach a model hub: HF_HUB_OFFLINE makes a missing Hub id fail fast."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparseforge.models.loading import load_model  # noqa: E402
from sparseforge.models.tiny import TINY_FAMILIES  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    """A fresh tiny model of every supported family."""
    return load_model(f"tiny-{request.param}")


@pytest.fixture
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture
def text_file(tmp_path):
    """A small local text corpus (public-domain prose), so data tests need no download."""
    paragraphs = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.",
        "However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
        "this truth is so well fixed in the minds of the surrounding families, that he is considered as the "
        "rightful property of some one or other of their daughters.",
    ] * 20
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path
