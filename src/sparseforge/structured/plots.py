"""Plots of a structural change: which sub-layers are gone, how the divergence grew, what width each block kept."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402


def plot_structure(blocks: list[dict], original: dict, path: Path, title: str) -> None:
    """Top: a strip per sub-layer kind (dark = removed). Bottom: kept FFN width and heads per block, as fractions."""
    count = len(blocks)
    fig, (strip, widths) = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * count), 4.2), height_ratios=[1, 2.2],
                                        sharex=True)
    removed = [[b["heads"] == 0 for b in blocks], [b["ffn"] == 0 for b in blocks]]
    strip.imshow(removed, aspect="auto", cmap=ListedColormap(["#cfe3f5", "#b2182b"]), vmin=0, vmax=1,
                 extent=(-0.5, count - 0.5, 1.5, -0.5))
    strip.set_yticks([0, 1], ["attention", "FFN"])
    strip.set_title(f"{title} (red = removed)")
    ffn = [b["ffn"] / original["ffn"] for b in blocks]
    heads = [b["heads"] / original["heads"] for b in blocks]
    positions = list(range(count))
    widths.bar([p - 0.2 for p in positions], ffn, width=0.4, label="FFN neurons kept")
    widths.bar([p + 0.2 for p in positions], heads, width=0.4, label="query heads kept")
    widths.set_ylim(0, 1.05)
    widths.set_xlabel("block")
    widths.set_ylabel("fraction of original")
    widths.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_divergence(removed: list[dict], path: Path, distance: str) -> None:
    """FinerCut's curve: divergence from the original model after each greedy removal."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    steps = list(range(1, len(removed) + 1))
    ax.plot(steps, [r["divergence"] for r in removed], marker="o", color="#444")
    for step, r in zip(steps, removed):
        ax.annotate(f"{'A' if r['kind'] == 'attention' else 'F'}{r['block']}", (step, r["divergence"]),
                    fontsize=7, textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_xlabel("sub-layers removed (A = attention, F = FFN, with block)")
    ax.set_ylabel(f"{distance} divergence")
    ax.set_title("FinerCut: divergence from the original model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
