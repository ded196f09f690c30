"""A grid of continual-learning runs (initialisation x growth x density x seed, plus baselines), resumable.

Every cell is checked before anything trains; a cell the harness refuses (too little free capacity, say) is returned
as ``{"config": ..., "refused": reason}`` and the rest of the grid runs.

Each finished run is appended as one JSON line to the results file, so an interrupted grid resumes where it stopped
(a half-written last line is ignored). Runs are independent, so ``workers`` processes run them in parallel, each
with its own torch threads; every worker loads the benchmark once.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from dataclasses import asdict, replace
from itertools import product
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .benchmarks import load_benchmark
from ..errors import SparseTrainingError
from .continual import ContinualConfig, preflight, run_continual
from .metrics import continual_metrics


def grid_configs(base: ContinualConfig, inits: list[str], growths: list[str], densities: list[float],
                 seeds: list[int], baselines: bool = True) -> list[ContinualConfig]:
    """DST cells for every combination, and with ``baselines`` the static mask per (init, density, seed),
    fine-tuning and a dense network per task per seed."""
    configs = [replace(base, strategy="dst", init=i, growth=g, density=d, seed=s)
               for d, i, g, s in product(densities, inits, growths, seeds)]
    if baselines:
        configs += [replace(base, strategy="static", init=i, density=d, seed=s)
                    for d, i, s in product(densities, inits, seeds)]
        configs += [replace(base, strategy=strategy, seed=s) for strategy in ("finetune", "dense-per-task")
                    for s in seeds]
    return configs


def config_key(config: ContinualConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def read_results(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by an interruption: that run is simply redone
            done[config_key(ContinualConfig(**record["config"]))] = record
    return done


_WORKER: dict = {}


def _init_worker(benchmark: str, tasks: int | None, data: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["benchmark"] = load_benchmark(benchmark, tasks, data)


def _run_one(config: ContinualConfig) -> dict:
    return run_continual(_WORKER["benchmark"], config, progress=False)


def run_grid(benchmark: str, configs: list[ContinualConfig], results_path: str | os.PathLike,
             tasks: int | None = None, data: str | None = None, workers: int = 1, progress: bool = True) -> list[dict]:
    """Run every config not already in ``results_path``; returns all results in the order of ``configs``."""
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(path)
    todo = []
    for config in configs:
        if config_key(config) in done:
            continue
        try:  # a cell the harness would refuse (capacity, split) is reported, not allowed to stop the whole grid
            preflight(benchmark, config, tasks, data)
            todo.append(config)
        except SparseTrainingError as exc:
            done[config_key(config)] = {"config": asdict(config), "refused": str(exc)}
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc=f"grid on {benchmark}", unit="run",
               disable=not progress)
    with open(path, "a") as out:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            out.write("\n")  # end the line an interruption cut short, so the next record starts clean

        def record(result: dict) -> None:
            out.write(json.dumps(result) + "\n")
            out.flush()
            done[config_key(ContinualConfig(**result["config"]))] = result
            bar.update(1)

        if workers <= 1:
            _init_worker(benchmark, tasks, data, threads)
            for config in todo:
                record(_run_one(config))
        elif todo:
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, _init_worker, (benchmark, tasks, data, threads)) as pool:
                for result in pool.imap_unordered(_run_one, todo):
                    record(result)
    bar.close()
    return [done[config_key(c)] for c in configs]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration without its seed: mean and sample std over seeds of the headline metrics.
    Refused cells (``"refused"`` instead of results) are left out."""
    groups: dict[str, list[dict]] = {}
    for result in results:
        if "refused" in result:
            continue
        config = ContinualConfig(**result["config"])
        groups.setdefault(config_key(replace(config, seed=0)), []).append(result)
    rows = []
    for members in groups.values():
        config = ContinualConfig(**members[0]["config"])
        row = {"label": config.label(), "strategy": config.strategy, "init": config.init,
               "growth": config.growth if config.strategy == "dst" else "-",
               "density": config.density if config.sparse else 1.0, "seeds": len(members),
               "seconds": mean_std([m["seconds"] for m in members])[0]}
        for scoring in ("task", "all"):
            # recomputed from the stored matrices, so results written by an older version summarise the same way
            metrics = [continual_metrics(m["accuracy"][scoring], m["initial_accuracy"][scoring]) for m in members]
            for metric in ("average_accuracy", "backward_transfer", "just_learned_accuracy"):
                row[f"{scoring}_{metric}"] = mean_std([m[metric] for m in metrics])
        rows.append(row)
    return rows
