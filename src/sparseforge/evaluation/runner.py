"""Running one offline task through lm-eval's ``simple_evaluate``, quietly and reproducibly."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from ..errors import EvaluationError
from .tasks import OfflineTask, lm_eval_config, task_manager

BOOTSTRAP_ITERS = 1000  # for LAMBADA perplexity's standard error; accuracies use lm-eval's closed form


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1 (got {limit}); leave it out to score every item")


@contextmanager
def quiet_lm_eval():
    """lm-eval logs every request batch at INFO/WARNING; keep the terminal for our progress bars.

    Bootstrapping runs serially: lm-eval's parallel bootstrap forks a pool the size of the machine, which copies a
    process that holds the model.
    """
    logger = logging.getLogger("lm_eval")
    level = logger.level
    previous = os.environ.get("DISABLE_MULTIPROC")
    logger.setLevel(logging.ERROR)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        logger.setLevel(level)
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def run_lm_eval_task(lm, task: OfflineTask, limit: int | None, log_samples: bool = False, seed: int = 0,
                     chat: dict | None = None, **overrides) -> dict:
    """Run one offline task (lm-eval's definition, ``overrides`` applied) on the wrapped model."""
    from lm_eval import simple_evaluate

    manager = task_manager(task)
    config = lm_eval_config(task, manager, **overrides)
    with quiet_lm_eval():
        loaded = manager.load(config)["tasks"][config["task"]]
        out = simple_evaluate(model=lm, tasks=[loaded], task_manager=manager, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                              log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed,
                              **(chat or {}))
    return {"results": out["results"][config["task"]], "n_samples": out["n-samples"][config["task"]],
            "samples": (out.get("samples") or {}).get(config["task"], [])}
