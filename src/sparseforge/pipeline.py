"""Run a recipe: load -> evaluate -> stages -> evaluate -> export -> run directory with reports.

The run directory is assembled under a temporary name and renamed when complete, so an interrupted run leaves no
directory that looks finished. Stages are looked up in :data:`STAGE_RUNNERS`; each reads and writes the same
:class:`LoadedModel`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pydantic import BaseModel

from .atomic import atomic_directory
from .evaluation.report import peak_memory_mb, versions, write_report
from .evaluation.speed import compare_with_settings
from .evaluation.stats import directory_bytes, pruned_weight_bytes, sparsity_summary, weight_file_bytes
from .evaluation.suite import evaluate, prepare_evaluation
from .export.saving import save_model
from .models.handle import LoadedModel
from .models.loading import load_model
from .errors import SparseforgeError
from .evaluation.suite import check_window_length
from .prune.checkpoint import STATE_FILE
from .prune.pruner import check_calibration_memory, check_prune_request
from .search.runner import probe_ray
from .interrupts import Interrupted
from .prune.pruner import prune
from .dst.lm import check_dense, sparse_train_lm
from .moe import check_factorize_request, factorize_model
from .recipe import Recipe
from .retrain.recovery import retrain
from .search import search
from .search.api import check_unpruned
from .skip import calibrate_skip
from .skip.calibrate import check_skip_request
from .structured import finercut, remove_blocks, shrink
from .structured.blocks import check_block_request
from .structured.finercut import check_finercut_request
from .structured.width import ShrinkConfig, check_shrink_request


@dataclass
class StageContext:
    """What a stage may need beyond its own settings: the recipe, where to checkpoint, whether to show progress."""

    recipe: Recipe
    checkpoint_dir: Path
    progress: bool
    next_stage: BaseModel | None = None


def _fused_reconstruction(context: StageContext) -> dict | None:
    """A reconstruct stage right after a prune stage runs inside it (the dense block outputs exist only there)."""
    following = context.next_stage
    if following is not None and getattr(following, "method", None) == "reconstruct":
        return following.reconstruct_options() | {"seed": context.recipe.data.seed}
    return None


def _run_prune(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    prune(handle, method=config.method, sparsity=config.sparsity, pattern=config.pattern, per_row=config.per_row,
          allocation=config.allocation, refine=config.refine, calibration=data.calibration, nsamples=data.nsamples,
          seqlen=data.seqlen, seed=data.seed, batch_size=config.batch_size, order=config.order, checkpoint_dir=context.checkpoint_dir,
          owl=config.owl, dsnot=config.dsnot, sparsegpt=config.sparsegpt, reconstruct=_fused_reconstruction(context),
          progress=context.progress)


def _run_retrain(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    if config.method == "reconstruct":  # already done inside the preceding prune stage
        return
    data = context.recipe.data
    retrain(handle, method=config.method, params=config.params, lora=config.lora.model_dump(), steps=config.steps,
            lr=config.lr, batch=config.batch, seqlen=config.seqlen or data.seqlen, data=data.calibration,
            seed=data.seed, warmup=config.warmup, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm, gradient_checkpointing=config.gradient_checkpointing,
            imp=config.imp.model_dump(), checkpoint_dir=context.checkpoint_dir, progress=context.progress)


def _run_shrink(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    shrink(handle, ffn=config.ffn, heads=config.heads, score=config.score, round_to=config.round_to,
           head_unit=config.head_unit, compensate=config.compensate, calibration=data.calibration,
           nsamples=data.nsamples, seqlen=data.seqlen, seed=data.seed, batch_size=config.batch_size,
           progress=context.progress)


def _run_finercut(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    common = {"calibration": data.calibration, "nsamples": config.nsamples, "seqlen": config.seqlen,
              "seed": data.seed, "batch_size": config.batch_size, "progress": context.progress}
    if config.unit == "block":
        remove_blocks(handle, count=config.remove, **common)
    else:
        finercut(handle, remove=config.remove, distance_name=config.distance, exclude=config.exclude,
                 checkpoint_dir=context.checkpoint_dir, **common)


def _run_skip(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    calibrate_skip(handle, target=config.target, k=config.k, similarity=config.similarity,
                   cold_start=config.cold_start, cold_end=config.cold_end, warmup=config.warmup,
                   calibration=data.calibration, nsamples=config.nsamples, prompt_tokens=config.prompt_tokens,
                   new_tokens=config.new_tokens, seed=data.seed, tolerance=config.tolerance, progress=context.progress)


def _run_factorize(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    factorize_model(handle, data=data.calibration, seed=data.seed, checkpoint_dir=context.checkpoint_dir,
                    progress=context.progress, **config.model_dump())


def _run_dst(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    sparse_train_lm(handle, data=data.calibration, seed=data.seed, progress=context.progress, **config.model_dump())


def _run_search(handle: LoadedModel, config: BaseModel, context: StageContext) -> None:
    data = context.recipe.data
    search(handle, config.config(data.seed), pick=config.pick, calibration=data.calibration, nsamples=data.nsamples,
           seqlen=data.seqlen, seed=data.seed, log=lambda message: print(message, file=sys.stderr),
           progress=context.progress)


STAGE_RUNNERS: dict[str, Callable[[LoadedModel, BaseModel, StageContext], None]] = {
    "prune": _run_prune, "retrain": _run_retrain, "shrink": _run_shrink, "finercut": _run_finercut,
    "skip": _run_skip, "factorize": _run_factorize, "dst": _run_dst, "search": _run_search}


def _preflight(handle: LoadedModel, recipe: Recipe) -> None:
    """Refuse structural requests the loaded model cannot satisfy before spending time on evaluation: a ratio
    list of the wrong length, a width that would reach zero, more sub-layers than the model has. (Checked against
    the loaded model; the stages check again against the model they receive.)"""
    check_window_length(handle, recipe.data.seqlen, "the calibration seqlen")
    if recipe.evaluate.perplexity:
        check_window_length(handle, recipe.data.evaluation_seqlen, "the evaluation seqlen")
    for stage in recipe.stages:
        config = stage.config
        if stage.kind == "prune":
            plan, needs_calibration = check_prune_request(
                handle, config.method, config.sparsity, config.pattern, config.per_row, config.allocation,
                config.refine, config.owl, config.dsnot, config.sparsegpt, config.batch_size, config.order)
            if needs_calibration:
                check_calibration_memory(handle, recipe.data.nsamples, recipe.data.seqlen)
        elif stage.kind == "shrink":
            check_shrink_request(handle, ShrinkConfig(config.ffn, config.heads, config.score, config.round_to,
                                                      config.head_unit, config.compensate))
        elif stage.kind == "finercut" and config.unit == "block":
            check_block_request(handle, config.remove, None)
        elif stage.kind == "finercut":
            check_finercut_request(handle, config.remove, config.distance, config.exclude)
        elif stage.kind == "skip":
            check_skip_request(handle.adapter.num_blocks, config.target, config.cold_start, config.cold_end)
        elif stage.kind == "factorize":
            check_factorize_request(handle, config.experts, config.topk, config.partition, config.shared_expert)
        elif stage.kind == "dst":
            check_dense(handle)
        elif stage.kind == "search":
            check_unpruned(handle)
            search_config = stage.config.config(recipe.data.seed)
            search_config.check(handle)
            if search_config.ray_address:  # an unreachable cluster is found now, not after the variant bank
                probe_ray(search_config.ray_address, search_config.ray_timeout)
    _check_export_pattern(recipe)


def _check_export_pattern(recipe: Recipe) -> None:
    """The nm format stores exact N:M masks only: refuse it up front for stages that prune without N:M."""
    if recipe.export is None or recipe.export.format != "nm":
        return
    for stage in recipe.stages:
        pattern = getattr(stage.config, "pattern", None)
        if stage.kind in ("prune", "search") and pattern == "unstructured":
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
        state = json.loads((last / STATE_FILE).read_text())
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
        for index, stage in enumerate(recipe.stages):
            log(f"stage {index}: {stage.kind}")
            with _timed(timings, f"stage_{index}_{stage.kind}"):
                following = recipe.stages[index + 1].config if index + 1 < len(recipe.stages) else None
                context = StageContext(recipe, checkpoints / f"stage_{index}", progress, following)
                STAGE_RUNNERS[stage.kind](handle, stage.config, context)
        if recipe.stages:
            log("evaluating after")
            with _timed(timings, "evaluate_after"):
                after = evaluate(handle, windows, corpus, progress=progress, reference=before, **task_options)
        else:  # nothing changed the model: measuring it again would only repeat the numbers
            after = copy.deepcopy(before)
        if dense is not None:
            with _timed(timings, "speed"):
                speed = compare_with_settings({"before": dense, "after": handle.model}, recipe.evaluate,
                                              skip=handle.attachment("skip"))
            before["speed"], after["speed"] = speed["before"], speed["after"]
            del dense
        export = None
        if recipe.export is not None:
            log("exporting")
            with _timed(timings, "export"):
                description = save_model(handle, tmp / "model", recipe.export.format, recipe.export.dtype)
            export = {"format": description["format"], "dtype": description["dtype"],
                      "weight_bytes": weight_file_bytes(tmp / "model"),
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
