"""Where skipping happens: per-layer similarity (what the policy reads) above per-layer skip rates (what it did)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_skip_profile(policy: dict, rates: dict[str, list[float]], path: Path, title: str) -> None:
    """``policy``: a policy as a dict (its calibration holds the similarity); ``rates``: label -> per-layer skip
    rates over governed tokens (e.g. measured in QA generation and in perplexity scoring)."""
    similarity = policy["calibration"]["similarity"]
    layers = list(range(len(similarity)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers)), 5.2), sharex=True)
    top.plot(layers, similarity, marker="o", markersize=3, label="mean cos(stream before, after FFN)")
    if policy["mode"] == "adaptive":
        top.axhline(policy["threshold"], color="#b2182b", linestyle="--", label=f"threshold {policy['threshold']:.4f}")
    for start, stop in ((-0.5, policy["cold_start"] - 0.5), (len(layers) - policy["cold_end"] - 0.5, len(layers) - 0.5)):
        if stop > start:
            top.axvspan(start, stop, color="#cccccc", alpha=0.5)
            bottom.axvspan(start, stop, color="#cccccc", alpha=0.5)
    top.set_ylabel("similarity")
    top.set_title(f"{title} (grey = cold layers, never skipped)")
    top.legend(fontsize=8)
    width = 0.8 / max(len(rates), 1)
    for i, (label, per_layer) in enumerate(rates.items()):
        bottom.bar([x - 0.4 + width * (i + 0.5) for x in layers], per_layer, width=width, label=label)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("share of tokens skipping the FFN")
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
