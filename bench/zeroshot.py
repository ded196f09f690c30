"""The eight zero-shot tasks through lm-eval on one model, with the time each task takes.

    .venv/bin/python bench/zeroshot.py [--model default] [--limit 500] [--tasks all] [--out results/zeroshot.json]

Prints the setup, a markdown table (metric, standard error, items, split, seconds) and the total wall time; the
target is a full eight-task run with ``--limit 500`` in under 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sparseforge as sf
from _common import markdown_table, print_setup
from sparseforge.evaluation.zeroshot import zero_shot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    handle = sf.load_model(args.model)
    print_setup(model=args.model, tasks=args.tasks, limit=args.limit, batch_tokens=args.batch_tokens,
                dtype=str(handle.dtype), scorer="lm-eval tasks, shared-context HFLM subclass")
    start = time.perf_counter()
    report = zero_shot(handle, args.tasks, limit=args.limit, batch_tokens=args.batch_tokens)
    total = time.perf_counter() - start
    rows = []
    for name, r in report.items():
        m = r["metrics"]
        main_metric = "perplexity" if "perplexity" in m else "acc"
        rows.append([name, f"{m['acc']:.4f} ± {m.get('acc_stderr', 0):.4f}",
                     f"{m['acc_norm']:.4f}" if "acc_norm" in m else "–",
                     f"{m['perplexity']:.2f}" if main_metric == "perplexity" else "–",
                     r["items"], r["split"], r["seconds"]])
    print(markdown_table(["task", "acc ± stderr", "acc_norm", "perplexity", "items", "split", "seconds"], rows))
    print(f"total wall time: {total:.0f} s ({total / 60:.1f} min)")
    if args.out:
        args.out.write_text(json.dumps({"total_seconds": total, "tasks": report}, indent=1))


if __name__ == "__main__":
    main()
