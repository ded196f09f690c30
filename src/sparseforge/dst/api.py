"""Python twins of ``sparseforge continual`` and ``sparseforge dst``: run, then write a run directory.

A continual run directory holds ``runs.jsonl`` (one finished run per line, so an interrupted command resumes with
the seeds it has not finished), ``summary.json`` and ``summary.md`` (mean and spread over seeds), and plots of the
first seed's accuracy matrix and mask overlap. A ``dst`` run directory holds the trained weights
(``model.safetensors``, pruned weights stored as zeros), the final masks (``masks.safetensors``, as uint8) and
``result.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory, atomic_write_text
from ..data.images import IMAGE_DATASETS
from ..errors import SparseTrainingError
from .benchmarks import BENCHMARKS
from .continual import SCORINGS, ContinualConfig, preflight
from .grid import grid_configs, run_grid, summarise
from .plots import plot_accuracy_matrix, plot_mask_overlap
from .train import SparseTrainConfig, train_sparse_classifier


def continual(config: ContinualConfig, out_dir: str | os.PathLike, benchmark: str = "split-fashion-mnist",
              seeds: int = 1, tasks: int | None = None, data: str | None = None, baselines: bool = False,
              workers: int = 1, progress: bool = True) -> dict:
    """Run ``config`` for ``seeds`` seeds (and with ``baselines`` the static, fine-tuning and dense-per-task runs)."""
    if seeds < 1:
        raise SparseTrainingError(f"seeds must be at least 1, got {seeds}")
    preflight(benchmark, config, tasks, data)
    configs = [replace(config, seed=config.seed + s) for s in range(seeds)]
    if baselines:
        configs += [c for c in grid_configs(config, [config.init], [], [config.density],
                                            [config.seed + s for s in range(seeds)]) if c.strategy != "dst"]
    out = Path(out_dir)
    results = run_grid(benchmark, configs, out / "runs.jsonl", tasks, data, workers, progress)
    rows = summarise(results)
    summary = {"benchmark": results[0]["benchmark"], "rows": rows}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "summary.md", summary_table(rows))
    first = results[0]
    plot_accuracy_matrix(first["accuracy"]["task"], out / "accuracy_matrix.png", f"{config.label()}, seed "
                         f"{first['config']['seed']}: accuracy matrix (task scoring)")
    if "overlap" in first:
        plot_mask_overlap(first["overlap"], out / "mask_overlap.png", f"{config.label()}: task-mask overlap")
    return summary


def summary_table(rows: list[dict]) -> str:
    lines = ["| run | seeds | " + " | ".join(f"avg acc {s} (%) | BWT {s} (pt)" for s in SCORINGS) + " |",
             "|---|---|" + "---|---|" * len(SCORINGS)]
    for row in rows:
        cells = []
        for scoring in SCORINGS:
            for metric in ("average_accuracy", "backward_transfer"):
                mean, std = row[f"{scoring}_{metric}"]
                cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
        lines.append(f"| {row['label']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_sparse(config: SparseTrainConfig, out_dir: str | os.PathLike, data: str = "fashion-mnist",
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Train ``config.backbone`` sparse from scratch on every class of an image dataset; writes the run directory."""
    if data not in IMAGE_DATASETS:
        raise SparseTrainingError(f"unknown dataset '{data}'; available: {', '.join(IMAGE_DATASETS)}")
    if Path(out_dir).exists() and not overwrite:
        raise SparseTrainingError(f"{out_dir} exists; pass --overwrite to replace it")
    augment = any(spec.loader is IMAGE_DATASETS[data] and spec.augment for spec in BENCHMARKS.values())
    trained = train_sparse_classifier(IMAGE_DATASETS[data](), config, augment, progress)
    result = {**trained["result"], "data": data}
    with atomic_directory(out_dir, overwrite=overwrite, kind="run") as tmp:
        state = {name: tensor.contiguous() for name, tensor in trained["model"].state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"config": json.dumps(asdict(config))})
        if trained["masks"]:
            save_file({name: mask.to(torch.uint8) for name, mask in trained["masks"].items()},
                      str(tmp / "masks.safetensors"))
        (tmp / "result.json").write_text(json.dumps(result, indent=1))
    return result

