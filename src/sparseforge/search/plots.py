"""The Pareto-front plot: quality against average sparsity, with uniform and OWL allocations on the same axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLES = {"nsga2": ("o-", "NSGA-II front"), "evopress": ("D", "EvoPress"), "decompose": ("s-", "decomposition front")}


def plot_fronts(fronts: dict[str, list[dict]], uniform: list[dict], owl: list[dict], evopress: list[dict],
                path: Path, title: str, y_label: str = "KL to dense (calibration, nats/token)",
                log_y: bool = True) -> None:
    """One line per front, crosses for the uniform allocations, triangles for OWL, diamonds for EvoPress."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in fronts.items():
        style, label = _STYLES.get(name, ("o-", name))
        ordered = sorted(points, key=lambda p: p["average_sparsity"])
        ax.plot([p["average_sparsity"] for p in ordered], [p["kl"] for p in ordered], style, ms=4, lw=1.2,
                label=f"{label} ({len(ordered)})")
    if uniform:
        ax.plot([p["average_sparsity"] for p in uniform], [p["kl"] for p in uniform], "x--", color="grey", ms=6,
                label="uniform")
    if owl:
        ax.plot([p["average_sparsity"] for p in owl], [p["kl"] for p in owl], "^", color="tab:red", ms=8,
                label="OWL")
    if evopress:
        ax.plot([p["average_sparsity"] for p in evopress], [p["kl"] for p in evopress], "D", color="tab:green", ms=7,
                label="EvoPress (budget)")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("average sparsity of the prunable linears")
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
