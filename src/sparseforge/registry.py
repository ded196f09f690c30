"""The one list of method packages that plug into the centre of sparseforge.

Importing the ``stage`` module of a package on this list registers what it contributes: its recipe stages (:mod:`sparseforge.stages`) and
how its model attachments are restored from an export directory or installed by name
(:mod:`sparseforge.models.attachments`). The
recipe, the pipeline and the loader ask for them through :func:`load_method_packages`, so no central module
imports a method package by name; adding a method is its package plus one line here. The order is the order of
the stage types in recipes and messages.
"""

from __future__ import annotations

import importlib

METHOD_PACKAGES = (
    "prune",  # stage prune: one-shot pruning (magnitude, Wanda, SparseGPT; OWL, DSnoT)
    "retrain",  # stage retrain: PERP, full retraining, IMP, layer-wise reconstruction
    "structured",  # stages shrink and finercut: physically smaller models
    "skip",  # stage skip and attachment "skip": FFN skipping while decoding
    "teal",  # stage activation_sparsity and its attachment: TEAL activation sparsity while decoding
    "moe",  # stage factorize and attachment "experts": FFNs as routed experts
    "dst",  # stage dst: dynamic sparse training
    "search",  # stage search: per-block sparsity search
    "runtime",  # attachment "runtime": the CPU sparse-weight runtime (installed by name, not saved)
)


def load_method_packages() -> None:
    """Import each package's ``stage`` module, which registers its stages and attachment restorers."""
    for name in METHOD_PACKAGES:
        importlib.import_module(f"{__package__}.{name}.stage")
