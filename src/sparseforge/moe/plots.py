"""Expert usage per layer: which experts the routers send tokens to (a balanced router is a flat band)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_expert_usage(per_layer: list[list[float]], path: Path, title: str) -> None:
    """``per_layer[layer][expert]``: share of the layer's routed tokens that went to the expert."""
    experts = len(per_layer[0]) if per_layer else 0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(per_layer) + 2), 0.45 * experts + 1.8))
    image = ax.imshow([list(row) for row in zip(*per_layer)], aspect="auto", cmap="viridis", vmin=0,
                      vmax=max(1.0 / max(experts, 1) * 2, max((max(r) for r in per_layer), default=1)))
    ax.set_xlabel("layer")
    ax.set_ylabel("routed expert")
    ax.set_yticks(range(experts))
    ax.set_title(f"{title} (balanced: every cell {1 / max(experts, 1):.2f})", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
