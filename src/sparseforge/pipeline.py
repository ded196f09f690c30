"""Run a recipe: load -> evaluate -> stages -> evaluate -> export -> run directory with reports.

The run directory is assembled under a temporary name and renamed when complete, so an interrupted run leaves no
directory that looks finished. Stages are looked up in the stage registry (:mod:`.stages`), so this module names
no method; each reads and writes the same :class:`LoadedModel`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from .atomic import atomic_directory
from .dtypes import resolve_dtype
from .errors import SparseforgeError
from .evaluation.report import peak_memory_mb, versions, write_report
from .evaluation.speed import compare_with_settings
from .evaluation.stats import directory_bytes, pruned_weight_bytes, sparsity_summary, weight_file_bytes
from .evaluation.suite import check_window_length, evaluate, prepare_evaluation
from .export.saving import save_model
from .interrupts import Interrupted
from .models.attachments import install_attachment
from .models.handle import LoadedModel
from .models.loading import load_model
from .recipe import Recipe
from .stages import StageContext, stage_specs

CHECKPOINT_STATE = "state.json"  # what a stage's checkpoint directory records its progress in (block, step)


def _preflight(handle: LoadedModel, recipe: Recipe) -> None:
    """Refuse what the loaded model cannot satisfy before spending time on evaluation: windows past its positions,
    and whatever each stage's own preflight refuses (a ratio list of the wrong length, a pattern that does not
    divide a layer, more sub-layers than the model has, an unreachable cluster...). The stages check again
    against the model they receive."""
    check_window_length(handle, recipe.data.seqlen, "the calibration seqlen")
    if recipe.evaluate.perplexity:
        check_window_length(handle, recipe.data.evaluation_seqlen, "the evaluation seqlen")
    specs = stage_specs()
    for stage in recipe.stages:
        preflight = specs[stage.kind].preflight
        if preflight is not None:
            preflight(handle, stage.config, recipe)
    _check_export_pattern(recipe)


def _check_export_pattern(recipe: Recipe) -> None:
    """The nm format stores exact N:M masks only: refuse it up front for stages that prune without N:M."""
    if recipe.export is None or recipe.export.format != "nm":
        return
    for stage in recipe.stages:
        if getattr(stage.config, "pattern", None) == "unstructured":
            raise SparseforgeError(f"export format nm needs exact N:M masks, but the {stage.kind} stage prunes "
                                   "unstructured; use --pattern N:M or another format (auto picks the smallest)")


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where an interrupted run's stage checkpoints wait for the rerun (a hidden sibling of the run directory)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.checkpoints"


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def run_recipe(recipe: Recipe, out_dir: str | Path, overwrite: bool = False, progress: bool = True,
               log: Callable[[str], None] = lambda message: None, restart: bool = False) -> dict:
    """Execute ``recipe`` and write the run directory ``out_dir``; returns the report.

    Calibrated stages checkpoint after every block next to ``out_dir``; rerunning the same recipe after an
    interruption resumes them (``restart`` discards the checkpoints instead). They are deleted once the run
    directory is complete.
    """
    checkpoints = checkpoint_root(out_dir)
    try:
        return _run_recipe(recipe, out_dir, checkpoints, overwrite, progress, log, restart)
    except Interrupted as exc:
        exc.resume = resume_point(checkpoints)
        raise


def resume_point(checkpoints: Path) -> str | None:
    """Where a rerun continues from, as words ("stage 0 (block 3)"), or None when nothing was checkpointed."""
    stages = sorted(checkpoints.glob("stage_*"), key=lambda p: int(p.name.split("_")[1])) if checkpoints.is_dir() else []
    if not stages:
        return None
    last = stages[-1]
    try:
        state = json.loads((last / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return f"the checkpoints of {last.name.replace('_', ' ')}"
    where = last.name.replace("_", " ")
    if not isinstance(state, dict):
        return f"the last checkpoint of {where}"
    if isinstance(state.get("step"), int):  # a training checkpoint
        return f"{where}, step {state['step']}"
    if isinstance(state.get("next_block"), int):
        return f"{where}, block {state['next_block']}"
    return f"the last checkpoint of {where}"


def _run_recipe(recipe: Recipe, out_dir: str | Path, checkpoints: Path, overwrite: bool, progress: bool,
                log: Callable[[str], None], restart: bool) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with atomic_directory(out_dir, overwrite=overwrite, kind="run") as tmp:
        if restart:
            shutil.rmtree(checkpoints, ignore_errors=True)
        elif checkpoints.exists():
            log(f"resuming from checkpoints in {checkpoints}")
        log(f"loading model {recipe.model}")
        with _timed(timings, "load_model"):
            handle = load_model(recipe.model, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code,
                                device=recipe.device, masks_from_zeros=recipe.masks_from_zeros)
        handle.bos = recipe.data.bos
        _preflight(handle, recipe)
        windows = corpus = None
        if recipe.evaluate.perplexity:
            with _timed(timings, "prepare_evaluation_data"):
                windows, corpus = prepare_evaluation(handle, recipe.data.evaluation, recipe.data.evaluation_seqlen,
                                                     recipe.data.eval_windows or None)
        log("evaluating before")
        measured = recipe.evaluate
        task_options = {"tasks": measured.tasks, "qa": measured.qa, "limit": measured.limit,
                        "qa_prompt": measured.qa_prompt}
        with _timed(timings, "evaluate_before"):
            before = evaluate(handle, windows, corpus, progress=progress, **task_options)
        dense = copy.deepcopy(handle.model) if recipe.evaluate.speed else None
        specs = stage_specs()
        for index, stage in enumerate(recipe.stages):
            log(f"stage {index}: {stage.kind}")
            with _timed(timings, f"stage_{index}_{stage.kind}"):
                following = recipe.stages[index + 1].config if index + 1 < len(recipe.stages) else None
                context = StageContext(recipe, checkpoints / f"stage_{index}", progress, following)
                specs[stage.kind].run(handle, stage.config, context)
        if recipe.stages:
            log("evaluating after")
            with _timed(timings, "evaluate_after"):
                after = evaluate(handle, windows, corpus, progress=progress, reference=before, **task_options)
        else:  # nothing changed the model: measuring it again would only repeat the numbers
            after = copy.deepcopy(before)
        if dense is not None:
            with _timed(timings, "speed"):
                models = {"before": dense}
                if recipe.evaluate.runtime is not None:  # the same weights in the runtime, timed alongside
                    in_runtime = copy.deepcopy(handle)
                    after["runtime"] = install_attachment(in_runtime, "runtime", recipe.evaluate.runtime).summary()
                    models["runtime"] = in_runtime.model
                models["after"] = handle.model  # last: a skip policy's accounting is read from the last model
                speed = compare_with_settings(models, recipe.evaluate, skip=handle.attachment("skip"))
            before["speed"], after["speed"] = speed["before"], speed["after"]
            if "runtime" in speed:
                after["runtime"]["speed"] = speed["runtime"]
            del dense, models
        export = None
        if recipe.export is not None:
            log("exporting")
            with _timed(timings, "export"):
                description = save_model(handle, tmp / "model", recipe.export.format, recipe.export.dtype)
            export = {"format": description["format"], "dtype": description["dtype"],
                      "weight_bytes": weight_file_bytes(tmp / "model"),
                      "dense_bytes_same_dtype": after["parameters"]["total"] * resolve_dtype(description["dtype"]).itemsize,
                      "pruned_linear_bytes": pruned_weight_bytes(tmp / "model", description),
                      "directory_bytes": directory_bytes(tmp / "model")}
        timings["total"] = round(time.perf_counter() - started, 3)
        summary = sparsity_summary(handle)
        report = {
            "model": {"source": recipe.model, "model_type": handle.model_type, "family": handle.adapter.family,
                      "dtype": str(handle.dtype).removeprefix("torch.")},
            "recipe": recipe.model_dump(mode="json"),
            "stages": handle.history,
            "sparsity": {"overall": summary["overall"], "prunable_params": summary["prunable_params"],
                         "per_layer": summary["per_layer"]},
            "metrics": {"before": before, "after": after},
            "export": export,
            "timings": timings,
            "peak_memory_mb": peak_memory_mb(),
            "versions": versions(),
        }
        write_report(tmp, report, recipe.to_yaml())
    shutil.rmtree(checkpoints, ignore_errors=True)
    return report
