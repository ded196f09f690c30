"""Zero-shot benchmark tasks (ARC, PIQA, HellaSwag, WinoGrande, BoolQ, OpenBookQA, LAMBADA) through lm-eval.

One call per task, so each task's time is reported; the model wrapper is built once and reused. Metrics are lm-eval's
(``acc``, ``acc_norm``, LAMBADA's ``perplexity``), with their standard errors.
"""

from __future__ import annotations

import time

from ..models.handle import LoadedModel
from .harness import lm_eval_model
from .runner import check_limit, run_lm_eval_task
from .tasks import OFFLINE_TASKS, ZERO_SHOT_TASKS, parse_task_names


def _metrics(results: dict) -> dict:
    """lm-eval's ``{"acc,none": ..., "acc_stderr,none": ...}`` -> ``{"acc": ..., "acc_stderr": ...}``."""
    metrics = {}
    for key, value in results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metrics[key.split(",")[0]] = float(value)
    return metrics


def zero_shot(handle: LoadedModel, tasks="all", limit: int | None = None, batch_size: int = 32,
              batch_tokens: int = 2048, lm=None) -> dict:
    """Score ``handle`` on zero-shot tasks; returns ``{task: {metrics, items, split, note, seconds}}``."""
    names = parse_task_names(tasks, ZERO_SHOT_TASKS)
    check_limit(limit)
    lm = lm or lm_eval_model(handle, batch_size=batch_size, batch_tokens=batch_tokens)
    report = {}
    for name in names:
        task = OFFLINE_TASKS[name]
        start = time.perf_counter()
        out = run_lm_eval_task(lm, task, limit)
        report[name] = {"metrics": _metrics(out["results"]), "items": out["n_samples"]["effective"],
                        "items_available": out["n_samples"]["original"], "split": task.split,
                        "note": task.split_note, "seconds": round(time.perf_counter() - start, 1)}
    return report
