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
