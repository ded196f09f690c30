"""Perplexity versus sparsity for magnitude pruning on one model, as a table and a plot.

    .venv/bin/python bench/sweep_magnitude.py [--model default] [--windows 8] [--seqlen 512]

Every point prunes a fresh copy of the same dense model and is measured on the same evaluation windows.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sparseforge as sf  # noqa: E402
from _common import markdown_table, print_setup  # noqa: E402
from sparseforge.evaluation.perplexity import perplexity  # noqa: E402
from sparseforge.evaluation.suite import prepare_evaluation  # noqa: E402

POINTS = [("unstructured", 0.0), ("unstructured", 0.1), ("unstructured", 0.2), ("unstructured", 0.3),
          ("unstructured", 0.4), ("unstructured", 0.5), ("unstructured", 0.6), ("4:8", None), ("2:4", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--plot", default=str(Path(__file__).parent / "results" / "magnitude_sweep.png"))
    args = parser.parse_args()
    base = sf.load_model(args.model)
    windows, corpus = prepare_evaluation(base, "default", args.seqlen, args.windows)
    print_setup(model=args.model, data=corpus, seqlen=args.seqlen, windows=int(windows.shape[0]), method="magnitude",
                per_row=False, bos="none")
    rows, curve = [], []
    for pattern, sparsity in POINTS:
        handle = sf.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source)
        if sparsity != 0.0:
            sf.prune(handle, sparsity=sparsity, pattern=pattern, progress=False)
        ppl = perplexity(handle.model, windows, progress=False)["perplexity"]
        achieved = sf.evaluate(handle, perplexity=False)["sparsity"]
        rows.append([pattern, f"{achieved:.3f}", f"{ppl:.2f}"])
        if pattern == "unstructured":
            curve.append((achieved, ppl))
        print(rows[-1], flush=True)
    print(markdown_table(["pattern", "sparsity", "perplexity"], rows))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*curve), marker="o", label="unstructured")
    for i, (pattern, achieved, ppl) in enumerate(rows[len(curve):], start=1):
        ax.scatter([float(achieved)], [float(ppl)], marker="s", color=f"C{i}", label=pattern)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of prunable linears")
    ax.set_ylabel(f"perplexity ({args.windows}x{args.seqlen} tokens)")
    ax.set_title(f"magnitude pruning: {args.model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
