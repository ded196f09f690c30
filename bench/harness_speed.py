"""lm-eval's stock ``HFLM`` wrapper vs the shared-context wrapper, on the same tasks in one process.

    .venv/bin/python bench/harness_speed.py [--model default] [--tasks arc_easy,hellaswag] [--limit 100]

Both wrappers get the same in-memory model and lm-eval's same task definitions; the table shows seconds per task,
the speed-up, and the largest difference between the two wrappers' metrics (they score the same token sequences,
so accuracies must agree; log-likelihoods differ only by float rounding).
"""

from __future__ import annotations

import argparse
import time

import sparseforge as sf
from _common import markdown_table, print_setup
from sparseforge.evaluation.harness import lm_eval_model
from sparseforge.evaluation.runner import quiet_lm_eval, run_lm_eval_task
from sparseforge.evaluation.tasks import OFFLINE_TASKS, ZERO_SHOT_TASKS, parse_task_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", default="arc_easy,hellaswag")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="HFLM's batch size (requests per forward)")
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    handle = sf.load_model(args.model)
    print_setup(model=args.model, tasks=args.tasks, limit=args.limit, hflm_batch_size=args.batch_size,
                dtype=str(handle.dtype))
    with quiet_lm_eval():
        wrappers = {"HFLM (lm-eval)": HFLM(pretrained=handle.model, tokenizer=handle.tokenizer,
                                           batch_size=args.batch_size, device="cpu"),
                    "shared contexts (ours)": lm_eval_model(handle)}
    rows = []
    for name in parse_task_names(args.tasks, ZERO_SHOT_TASKS):
        seconds, metrics = {}, {}
        for label, lm in wrappers.items():  # same process, one after the other, per task
            start = time.perf_counter()
            results = run_lm_eval_task(lm, OFFLINE_TASKS[name], args.limit)["results"]
            seconds[label] = time.perf_counter() - start
            metrics[label] = {k: v for k, v in results.items() if isinstance(v, float) and "stderr" not in k}
        stock, ours = seconds.values()
        a, b = metrics.values()
        gap = max(abs(a[k] - b[k]) for k in a)
        rows.append([name, f"{stock:.1f}", f"{ours:.1f}", f"{stock / ours:.2f}x", f"{gap:.2g}",
                     ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in b.items())])
        print(rows[-1], flush=True)
    print(markdown_table(["task", "HFLM s", "shared-context s", "speed-up", "max metric difference", "metrics"], rows))


if __name__ == "__main__":
    main()
