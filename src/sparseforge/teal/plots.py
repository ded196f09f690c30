"""Where activations are zeroed: per block, the sparsity allocated to each site and the sparsity realised."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .sites import SITES  # noqa: E402


def plot_activation_sparsity(record: dict, path: Path, title: str) -> None:
    """``record``: the stage's history record (allocated ``sparsity`` and ``realised`` per block and site)."""
    allocated, realised = record["sparsity"], record["realised"]["per_block"]
    blocks = list(range(len(allocated)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(blocks)), 5.2), sharex=True, sharey=True)
    width = 0.8 / len(SITES)
    for axis, table, label in ((top, allocated, "allocated"), (bottom, realised, "realised on calibration text")):
        for i, site in enumerate(SITES):
            axis.bar([b - 0.4 + width * (i + 0.5) for b in blocks], [block.get(site, 0.0) for block in table],
                     width=width, label=site.replace("_", " "))
        axis.set_ylabel(f"sparsity, {label}")
        axis.set_ylim(0, 1)
    top.set_title(f"{title}: {record['method']} allocation, target {record['target']:g}")
    top.legend(fontsize=8, ncol=2)
    bottom.set_xlabel("block")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_against_skipping(cells: dict, skip_curve: list[tuple[float, float]], path: Path) -> None:
    """Perplexity against ideal decode speed-up: each allocation's cells, FFN skipping's curve, the dense model."""
    fig, axis = plt.subplots(figsize=(6.0, 4.2))
    by_allocation: dict[str, list[tuple[float, float]]] = {}
    for name, cell in cells.items():
        if name != "dense":
            by_allocation.setdefault(name.split()[0], []).append((cell["ideal_decode"], cell["perplexity"]))
    for allocation, points in by_allocation.items():
        points.sort()
        axis.plot(*zip(*points), marker="o", label=f"activation sparsity, {allocation}")
    if skip_curve:
        axis.plot(*zip(*skip_curve), marker="s", linestyle="--", label="FFN skipping (adaptive)")
    axis.axhline(cells["dense"]["perplexity"], color="grey", linestyle=":", label="dense")
    axis.set_yscale("log")
    axis.set_xlabel("ideal decode speed-up (multiply-accumulates)")
    axis.set_ylabel("perplexity (default evaluation text)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
