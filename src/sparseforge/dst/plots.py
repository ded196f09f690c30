"""Plots of continual-learning runs: the accuracy matrix, the overlap of task masks, and a grid's accuracy curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _heatmap(matrix: list[list[float]], path: Path, title: str, xlabel: str, ylabel: str, label: str,
             vmin: float, vmax: float) -> None:
    size = len(matrix)
    fig, ax = plt.subplots(figsize=(0.6 * size + 2.6, 0.5 * size + 2))
    image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < (vmin + vmax) / 2 else "black")
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_matrix(matrix: list[list[float]], path: Path, title: str) -> None:
    """Row i: accuracy on every task after training task i (above the diagonal: tasks not yet trained)."""
    _heatmap(matrix, path, title, "evaluated task j", "after training task i", "accuracy (%)", 0.0, 1.0)


def plot_mask_overlap(overlap: list[list[float]], path: Path, title: str) -> None:
    """Entry [i][j]: share of task j's weights also in task i's mask (diagonal 100%)."""
    _heatmap(overlap, path, title, "task j", "task i", "share of task j's weights", 0.0, 1.0)


def plot_grid(rows: list[dict], path: Path, title: str, scoring: str = "task") -> None:
    """Average final accuracy vs sparsity, one line per (init, growth), with the seeds' std as error bars."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    key = f"{scoring}_average_accuracy"
    lines: dict[str, list[dict]] = {}
    for row in rows:
        if row["strategy"] in ("dst", "static"):
            name = f"{row['strategy']} {row['init']}" + (f" {row['growth']}" if row["strategy"] == "dst" else "")
            lines.setdefault(name, []).append(row)
    for name, members in sorted(lines.items()):
        members.sort(key=lambda r: r["density"])
        style = "--" if name.startswith("static") else ("-" if "erk" in name else ":")
        ax.errorbar([100 * (1 - r["density"]) for r in members], [100 * r[key][0] for r in members],
                    yerr=[100 * r[key][1] for r in members], label=name, linestyle=style, marker="o", capsize=2,
                    markersize=3)
    sparse = [100 * r[key][0] for r in rows if r["strategy"] in ("dst", "static")]
    low, high = (min(sparse), max(sparse)) if sparse else (0.0, 100.0)
    for row in rows:
        if row["strategy"] in ("finetune", "dense-per-task"):
            value = 100 * row[key][0]
            low, high = (low, max(high, value)) if row["strategy"] == "dense-per-task" else (low, high)
            label = f"{row['strategy']} {value:.2f}%"
            if value < low - 1:  # far below the sparse runs (fine-tuning forgets): named, not drawn off the scale
                ax.plot([], [], " ", label=label + " (below the axis)")
            else:
                ax.axhline(value, color="black", linewidth=0.8, linestyle="-.", label=label)
    margin = max(0.1, 0.1 * (high - low))
    ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("sparsity per task (%)")
    ax.set_ylabel(f"final average accuracy (%, {scoring} scoring)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
