"""The ``sparseforge`` command line. Every command has a Python API twin in :mod:`sparseforge`.

Bad input (unknown model, bad sparsity, corrupted checkpoint, unknown recipe key, ...) prints one ``error:`` line
on stderr and exits with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import SparseforgeError
from .data.windows import CALIBRATION_WINDOWS, DEFAULT_EVAL_WINDOWS

app = typer.Typer(
    help="Make LLMs smaller and faster through sparsity, with honest measurements.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)
out = Console()

DEVICE_HELP = "where the model computes: cpu, cuda, cuda:N, or auto (CUDA when present)"
MASKS_FROM_ZEROS_HELP = ("read the exact zeros of a dense checkpoint pruned elsewhere as its pruning masks (never "
                         "done unasked: a de-quantised or shrunk model has zeros that are not a mask)")
BOS_HELP = "BOS token first in every text window: auto (when the tokenizer adds one), always, never"
MODEL_HELP = ("'default' (SmolLM2-135M-Instruct, offline), tiny-<family>, a Hugging Face Hub id, a local HF "
              "directory, a sparseforge run/export directory, or a .gguf file")
TEXT = "default, wikitext2, c4, or a .txt/.jsonl file"

# Options that mean the same wherever they appear (docs/cli.md), declared once.
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing run directory written by sparseforge")
RESTART = typer.Option(False, "--restart", help="discard the checkpoints of an interrupted run instead of resuming")
DEVICE = typer.Option("cpu", help=DEVICE_HELP)
BOS = typer.Option("auto", help=BOS_HELP)
PPL = typer.Option(True, "--ppl/--no-ppl", help="measure perplexity before and after")
SPEED = typer.Option(False, "--speed", help="measure prefill/decode speed before and after")
EVAL_WINDOWS = typer.Option(DEFAULT_EVAL_WINDOWS, help="at most this many evaluation windows (0: all)")
EVAL_DATA = typer.Option("default", help="evaluation text: " + TEXT)
CALIBRATION = typer.Option("default", help="calibration text: " + TEXT)
TRAIN_DATA = typer.Option("default", help="training text (its training side): " + TEXT)
NSAMPLES = typer.Option(CALIBRATION_WINDOWS, help="number of calibration windows")
EXPORT_DTYPE = typer.Option(None, help="export dtype: float32, float16, bfloat16 (default: the model's)")
RUNTIME = typer.Option(None, help="run in the CPU sparse-weight runtime: sparse (pruned linears compressed), dense "
                                   "(the runtime's dense 16-bit kernel), auto (per layer, whichever is faster here)")
RUNTIME_DTYPE = typer.Option(None, help="16-bit type the runtime holds weights in: float16 or bfloat16 (default: "
                             "the loaded dtype if 16-bit, else float16; bf16 decodes faster on AVX-512)")
FORMAT = typer.Option("auto", help="export format: auto (smallest exact), dense, bitmask or nm")
DENSE_FORMAT = typer.Option("dense", help="export format: dense (default: a shrunk model has no zeros to skip), "
                                          "auto, bitmask or nm")


@dataclass(frozen=True)
class RunOptions:
    """The options every stage command shares, declared once below and handed to the command as one value."""

    format: str
    export_dtype: Optional[str]
    ppl: bool
    speed: bool
    eval_data: str
    eval_windows: int
    bos: str
    device: str
    overwrite: bool
    restart: bool


_RUN_OPTIONS = {"format": (str, FORMAT), "export_dtype": (Optional[str], EXPORT_DTYPE), "ppl": (bool, PPL),
                "speed": (bool, SPEED), "eval_data": (str, EVAL_DATA), "eval_windows": (int, EVAL_WINDOWS),
                "bos": (str, BOS), "device": (str, DEVICE), "overwrite": (bool, OVERWRITE), "restart": (bool, RESTART)}


def stage_command(**overrides):
    """Give a command that runs recipe stages the shared options (docs/cli.md) after its own, with ``overrides``
    for a different default or help; the command receives them as ``run``, a :class:`RunOptions`."""
    def wrap(command):
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "run"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                    default=overrides.get(name, option))
                  for name, (annotation, option) in _RUN_OPTIONS.items()]

        @functools.wraps(command)
        def with_run_options(**values):
            return command(**{name: values.pop(name) for name in list(values) if name not in _RUN_OPTIONS},
                           run=RunOptions(**values))

        with_run_options.__signature__ = inspect.Signature(own + shared)
        return with_run_options
    return wrap


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _log(message: str) -> None:
    console.print(f"[dim]›[/dim] {message}", soft_wrap=True, highlight=False)


def _run_directory(model: str, suffix: str) -> str:
    """``runs/<model name>-<suffix>``, with the model name made safe for a path."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model)
    return str(Path("runs") / f"{stem}-{suffix}")


def _default_out(model: str, method: str, pattern: str, sparsity: Optional[float]) -> str:
    amount = pattern.replace(":", "of") if pattern != "unstructured" else \
        "per-block" if sparsity is None else f"{sparsity:g}"
    return _run_directory(model, f"{method}-{amount}")


def _print_summary(report: dict, out_dir: str) -> None:
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table = Table(title=f"{report['model']['source']} → {out_dir}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if "perplexity" in after:
        table.add_row("perplexity", f"{before['perplexity']['perplexity']:.3f}", f"{after['perplexity']['perplexity']:.3f}")
    table.add_row("sparsity (prunable linears)", f"{before['sparsity']:.1%}", f"{after['sparsity']:.1%}")
    table.add_row("parameters", f"{before['parameters']['total']:,}", f"{after['parameters']['total']:,}")
    table.add_row("nonzero parameters", f"{before['parameters']['nonzero']:,}", f"{after['parameters']['nonzero']:,}")
    if "speed" in after:
        for key, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")):
            table.add_row(label, f"{before['speed'][key]:.1f}", f"{after['speed'][key]:.1f}")
    out.print(table)
    _print_task_table(before, after, ("before", "after"))
    if "perplexity" in after:
        p = after["perplexity"]
        out.print(f"perplexity protocol: {p['dataset']} ({p['split']}), {p['windows']} windows x {p['seqlen']} "
                  f"tokens, BOS {p['bos']}")
    runtime = after.get("runtime")
    if runtime and runtime.get("speed"):
        dense, ours = before["speed"]["decode_tokens_per_s"], runtime["speed"]["decode_tokens_per_s"]
        out.print(f"decode: {ours:.1f} tokens/s in the {runtime['mode']} runtime vs {dense:.1f} dense (PyTorch, "
                  f"{before['speed']['setup']['dtype']}): {ours / dense:.2f}x; weights read per token "
                  f"{runtime['weight_bytes_per_token'] / 2**20:.0f} vs {before['speed']['weight_bytes_per_token'] / 2**20:.0f} MiB")
    if report.get("export"):
        e = report["export"]
        dense_size = f" (the dense model in {e['dtype']}: {e['dense_bytes_same_dtype'] / 2**20:.1f} MiB)" \
            if e.get("dense_bytes_same_dtype") else ""
        out.print(f"exported: format {e['format']} ({e['dtype']}), {e['weight_bytes'] / 2**20:.1f} MiB of weights"
                  f"{dense_size}")
    out.print(f"report: {Path(out_dir) / 'report.md'}")


@app.command()
@stage_command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    method: str = typer.Option("magnitude", help="magnitude (no data), wanda, sparsegpt, admm (Wanda's mask + ADMM "
                                                 "weight update), admm-gradual, or alps"),
    sparsity: Optional[float] = typer.Option(None, help="fraction of prunable weights to remove, in [0, 1); "
                                                         "default 0.5 for unstructured, implied by N:M"),
    pattern: str = typer.Option("unstructured", help="'unstructured' or N:M (N kept of every M inputs), e.g. 2:4"),
    per_row: Optional[bool] = typer.Option(None, "--per-row/--per-layer",
                                           help="unstructured threshold per output row or per layer "
                                                "(default: the method's choice, per row for wanda)"),
    allocation: str = typer.Option("uniform", help="how sparsity is spread over blocks: uniform or owl"),
    block_sparsity: Optional[str] = typer.Option(None, help="explicit per-block sparsities instead: '0.6,0.7,...', a "
                                                            ".json file, or a search run directory"),
    refine: Optional[str] = typer.Option(None, help="training-free mask refinement after pruning: dsnot"),
    calibration: str = CALIBRATION,
    nsamples: int = NSAMPLES,
    seqlen: int = typer.Option(512, help="window length in tokens (calibration and evaluation)"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    order: str = typer.Option("sublayer", help="sublayer: one pass per block, each linear calibrated on pruned "
                                               "upstream outputs; block: the reference two-pass order, less memory"),
    batch_size: int = typer.Option(8, help="calibration windows per forward batch"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-<method>-<amount>)"),
    reconstruct: Optional[int] = typer.Option(None, "--reconstruct", metavar="STEPS",
                                              help="layer-wise reconstruction: after each block is pruned, train its "
                                                   "norms and a MaskLoRA for STEPS steps to match the dense block"),
    streamed: bool = typer.Option(False, "--streamed",
                                  help="out of core, for models larger than memory: read each block from the "
                                       "safetensors checkpoint when it is reached, write it into the export, let it "
                                       "go (no evaluation: run `sparseforge eval` on the export)"),
    run: RunOptions = None,
) -> None:
    """Prune a model one-shot, evaluate before and after, export it, and write a report.

    Calibrated methods checkpoint after every block; rerunning the same command after an interruption resumes.
    """
    from .prune.pruner import DEFAULT_SPARSITY

    if sparsity is None and pattern == "unstructured" and block_sparsity is None:
        sparsity = DEFAULT_SPARSITY
    out_dir = out_dir or _default_out(model, method, pattern, sparsity)
    if streamed:
        from .streaming.prune import prune_streamed

        report = prune_streamed(model, out_dir, method=method, sparsity=sparsity, pattern=pattern, per_row=per_row,
                                allocation=allocation, refine=refine, calibration=calibration, nsamples=nsamples,
                                seqlen=seqlen, seed=seed, batch_size=batch_size, order=order, device=run.device,
                                format=run.format, dtype=run.export_dtype, block_sparsity=block_sparsity,
                                reconstruct={"steps": reconstruct} if reconstruct is not None else None,
                                bos=run.bos, overwrite=run.overwrite, restart=run.restart)
        out.print((Path(out_dir) / "report.md").read_text().rstrip())
        return
    stages = [{"prune": {"method": method, "sparsity": sparsity, "pattern": pattern, "per_row": per_row,
                         "allocation": allocation, "refine": refine, "order": order, "batch_size": batch_size,
                         **({"block_sparsity": block_sparsity} if block_sparsity is not None else {})}}]
    if reconstruct is not None:
        stages.append({"retrain": {"method": "reconstruct", "steps": reconstruct}})
    _run_stages(model, stages, {"calibration": calibration, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
                out_dir, run=run)


@app.command()
@stage_command()
def retrain(
    model: str = typer.Argument(..., help="a pruned model: a sparseforge run/export directory (masks are read from "
                                          "it), or any model with method imp"),
    method: str = typer.Option("perp", help="perp (train a small parameter subset), full (all weights, mask "
                                            "fixed) or imp (iterative magnitude pruning with full retraining)"),
    params: str = typer.Option("norm,lora", help="perp: comma-separated groups from bias, norm, lm_head, lora"),
    lora_variant: str = typer.Option("mask", help="mask (MaskLoRA) or scale (ScaleLoRA): merged without losing "
                                                  "sparsity; prune_at_merge; plain (merged dense)"),
    rank: int = typer.Option(16, help="LoRA rank"),
    alpha: float = typer.Option(32.0, help="LoRA alpha (scale alpha/rank; ScaleLoRA ignores it)"),
    steps: int = typer.Option(100, help="optimizer steps (IMP: over all rounds)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: 5e-4 perp, 2e-5 full and imp)"),
    batch_size: int = typer.Option(8, help="windows per step"),
    seqlen: int = typer.Option(512, help="training window length in tokens (also the evaluation window)"),
    train_data: str = typer.Option("default", help="training text (its training side): default, wikitext2, c4, or a "
                                             ".txt/.jsonl file"),
    seed: int = typer.Option(0, help="seed for the order of training windows"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="recompute activations in the backward pass (less memory)"),
    imp_sparsity: float = typer.Option(0.5, help="imp: final sparsity"),
    imp_rounds: int = typer.Option(3, help="imp: prune-retrain rounds"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-<method>)"),
    masks_from_zeros: bool = typer.Option(False, "--masks-from-zeros", help=MASKS_FROM_ZEROS_HELP),
    run: RunOptions = None,
) -> None:
    """Recover a pruned model's quality by retraining, evaluate before and after, export it, and write a report.

    The sparsity pattern is kept exactly (except with --lora-variant plain). Training checkpoints every 25 steps;
    rerunning the same command after an interruption resumes.
    """
    stage = {"retrain": {"method": method, "params": [p.strip() for p in params.split(",") if p.strip()],
                         "lora": {"variant": lora_variant, "rank": rank, "alpha": alpha}, "steps": steps, "lr": lr,
                         "batch": batch_size, "gradient_checkpointing": gradient_checkpointing,
                         "imp": {"sparsity": imp_sparsity, "rounds": imp_rounds}}}
    _run_stages(model, [stage], {"calibration": train_data, "seqlen": seqlen, "seed": seed},
                out_dir or _run_directory(model, method), run=run,
                masks_from_zeros=masks_from_zeros)


def _install_runtime(handle, runtime: Optional[str], values_dtype: Optional[str] = None):
    """The sparse runtime on a loaded model, when asked for, said in one line."""
    if runtime is None:
        if values_dtype is not None:
            raise SparseforgeError("--runtime-dtype needs --runtime")
        return None
    from .runtime import install_runtime

    installed = install_runtime(handle, runtime, log=_log, values_dtype=values_dtype)
    _log(installed.describe())
    return installed


def _ratios(text: str, what: str) -> float | list[float]:
    """``0.25`` for every block, or ``0.1,0.2,...`` with one value per block."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparseforgeError(f"--{what} must be a fraction or a comma-separated list of fractions, got '{text}'") from None
    if not values:
        raise SparseforgeError(f"--{what} is empty")
    return values[0] if len(values) == 1 else values


def _run_stages(model: str, stages: list[dict], data: dict, out_dir: str, run: "RunOptions",
                masks_from_zeros: bool = False) -> dict:
    """What every stage command does: build a recipe from its options, run it, print the summary."""
    from .pipeline import run_recipe
    from .recipe import parse_recipe

    recipe = parse_recipe({
        "model": model, "device": run.device, "masks_from_zeros": masks_from_zeros,
        "data": {**data, "bos": run.bos, "evaluation": run.eval_data, "eval_windows": run.eval_windows},
        "stages": stages, "evaluate": {"perplexity": run.ppl, "speed": run.speed},
        "export": {"format": run.format, "dtype": run.export_dtype},
    }, origin="arguments")
    report = run_recipe(recipe, out_dir, overwrite=run.overwrite, log=_log, restart=run.restart)
    _print_summary(report, out_dir)
    return report


@app.command()
@stage_command(format=DENSE_FORMAT)
def shrink(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ffn: str = typer.Option("0", help="fraction of FFN neurons to remove: one value, or one per block, comma-separated"),
    heads: str = typer.Option("0", help="fraction of query heads to remove: one value, or one per block"),
    score: str = typer.Option("fluctuation", help="importance: magnitude (no data), wanda, fluctuation (FLAP)"),
    round_to: int = typer.Option(1, help="keep FFN widths a multiple of this, e.g. 8 or 64"),
    head_unit: str = typer.Option("auto", help="with GQA: auto (within when groups hold several query heads, "
                                               "else group), within (query heads inside each group) or group "
                                               "(whole key/value groups)"),
    compensate: bool = typer.Option(False, "--compensate", help="add removed neurons' mean contribution to the output bias"),
    calibration: str = CALIBRATION,
    nsamples: int = NSAMPLES,
    seqlen: int = typer.Option(512, help="window length in tokens (calibration and evaluation)"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-shrink)"),
    run: RunOptions = None,
) -> None:
    """Remove FFN neurons and attention heads physically: a smaller dense model that really runs faster.

    The export loads with plain transformers when every block keeps the same widths; otherwise the structure is
    recorded in config.json and sparseforge.load_model rebuilds it.
    """
    stage = {"shrink": {"ffn": _ratios(ffn, "ffn"), "heads": _ratios(heads, "heads"), "score": score,
                        "round_to": round_to, "head_unit": head_unit, "compensate": compensate}}
    _run_stages(model, [stage], {"calibration": calibration, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
                out_dir or _run_directory(model, "shrink"), run=run)


@app.command()
@stage_command(format=DENSE_FORMAT)
def finercut(
    model: str = typer.Argument(..., help=MODEL_HELP),
    remove: float = typer.Option(0.25, help="fraction of all attention + FFN sub-layers to remove (a count if >= 1)"),
    unit: str = typer.Option("sublayer", help="sublayer (FinerCut's greedy search) or block (whole blocks by "
                                              "input/output cosine similarity; --remove is then a fraction of blocks)"),
    distance: str = typer.Option("js", help="js, js_reference (the paper code's argument order), kl, l2, angular"),
    exclude: float = typer.Option(0.0, help="protect the first blocks until this fraction is removed (paper: 0.4 "
                                            "for LLaMA-3-8B)"),
    calibration: str = CALIBRATION,
    nsamples: int = typer.Option(8, help="calibration windows (the paper: 10)"),
    seqlen: int = typer.Option(128, help="calibration window length (the paper: 256)"),
    eval_seqlen: int = typer.Option(512, help="evaluation window length in tokens"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-finercut)"),
    run: RunOptions = None,
) -> None:
    """Remove whole attention and FFN sub-layers, one at a time, where the output distribution moves least.

    The search checkpoints after every removal; rerunning the same command after an interruption resumes.
    """
    stage = {"finercut": {"remove": remove, "unit": unit, "distance": distance, "exclude": exclude,
                          "nsamples": nsamples, "seqlen": seqlen}}
    _run_stages(model, [stage], {"calibration": calibration, "seqlen": eval_seqlen, "seed": seed},
                out_dir or _run_directory(model, "finercut"), run=run)


skip_app = typer.Typer(help="Input-adaptive FFN skipping while decoding (FFN-SkipLLM).", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(skip_app, name="skip")


@skip_app.command("calibrate")
@stage_command(ppl=typer.Option(True, "--ppl/--no-ppl", help="perplexity before and after (text scored as if the "
                                                             "policy had generated it)"),
               speed=typer.Option(False, "--speed", help="measure decode speed with and without the policy"),
               format=DENSE_FORMAT)
def skip_calibrate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    target: float = typer.Option(0.25, help="share of all FFN blocks to skip on generated tokens, e.g. 0.1-0.35"),
    k: Optional[int] = typer.Option(None, help="FFNs skipped after a saturated one (default: the best of 1-4)"),
    similarity: str = typer.Option("residual", help="residual: cos(stream before, after the FFN); ffn_only: "
                                                    "cos(FFN input, FFN output)"),
    cold_start: Optional[int] = typer.Option(None, help="first layers never skipped (default: from calibration)"),
    cold_end: Optional[int] = typer.Option(None, help="last layers never skipped (default: from calibration)"),
    warmup: int = typer.Option(0, help="generated tokens decoded with the full model before skipping starts"),
    calibration: str = CALIBRATION,
    nsamples: int = typer.Option(8, help="calibration prompts"),
    prompt_tokens: int = typer.Option(48, help="tokens per calibration prompt"),
    new_tokens: int = typer.Option(32, help="tokens generated per calibration prompt"),
    seed: int = typer.Option(0, help="seed for drawing calibration prompts"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-skip<target>)"),
    run: RunOptions = None,
) -> None:
    """Calibrate where and how much to skip FFN blocks per token, and save the policy with the model.

    Attention always runs, so the KV cache stays exact. `sparseforge generate DIR` and sparseforge.load_model(DIR)
    restore the policy.
    """
    stage = {"skip": {"target": target, "k": k, "similarity": similarity, "cold_start": cold_start,
                      "cold_end": cold_end, "warmup": warmup, "nsamples": nsamples, "prompt_tokens": prompt_tokens,
                      "new_tokens": new_tokens}}
    _run_stages(model, [stage], {"calibration": calibration, "seed": seed},
                out_dir or _run_directory(model, f"skip{target:g}"), run=run)


activation_app = typer.Typer(help="Activation sparsity while decoding (TEAL): per-layer input thresholds.",
                               no_args_is_help=True, rich_markup_mode=None)
app.add_typer(activation_app, name="activations")


@activation_app.command("calibrate")
@stage_command(ppl=typer.Option(True, "--ppl/--no-ppl", help="perplexity before and after (with the thresholds)"),
               format=DENSE_FORMAT)
def activations_calibrate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    target: float = typer.Option(0.4, help="model-wide share of linear inputs zeroed (weighted by the weights "
                                           "each entry reads), in [0, 1), e.g. 0.25-0.5"),
    allocation: str = typer.Option("greedy", help="uniform: every site at the target; greedy: TEAL's block-wise "
                                                  "greedy split between a block's four inputs; searched: EvoPress "
                                                  "levels per block, each split greedily"),
    calibration: str = CALIBRATION,
    nsamples: int = typer.Option(16, help="calibration windows"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    greedy_windows: int = typer.Option(4, help="windows the greedy walk runs each block on"),
    step: float = typer.Option(0.05, help="greedy increment of one input's sparsity"),
    generations: int = typer.Option(20, help="searched: EvoPress generations"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-act<target>)"),
    run: RunOptions = None,
) -> None:
    """Calibrate which input entries of each linear are zeroed while decoding, and save the thresholds with the
    model.

    `sparseforge generate DIR`, `sparseforge eval DIR` and sparseforge.load_model(DIR) restore them; scored text is
    computed with the same zeroing as decoding.
    """
    stage = {"activation_sparsity": {"target": target, "allocation": allocation, "nsamples": nsamples,
                                     "seqlen": seqlen, "greedy_windows": greedy_windows, "step": step,
                                     "generations": generations}}
    _run_stages(model, [stage], {"calibration": calibration, "seed": seed},
                out_dir or _run_directory(model, f"act{target:g}"), run=run)


@app.command()
@stage_command(speed=typer.Option(False, "--speed", help="measure prefill/decode speed, dense vs routed"),
               format=DENSE_FORMAT)
def factorize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    experts: int = typer.Option(4, help="experts per FFN (a shared one included); must divide the FFN width"),
    topk: int = typer.Option(1, help="routed experts run per token"),
    partition: str = typer.Option("contiguous", help="which neurons form an expert: contiguous, random, kmeans "
                                                             "(weights), coactivation (activations on the data)"),
    shared_expert: bool = typer.Option(False, "--shared-expert", help="one expert always runs, the router picks "
                                                                      "topk of the others"),
    router_steps: int = typer.Option(30, help="stage 1: router training steps (0: untrained routers)"),
    expert_steps: int = typer.Option(10, help="stage 2: expert fine-tuning steps (0: dense weights kept)"),
    router_lr: float = typer.Option(1e-2, help="stage 1 learning rate"),
    expert_lr: float = typer.Option(1e-3, help="stage 2 learning rate"),
    batch_size: int = typer.Option(4, help="training windows per step"),
    seqlen: int = typer.Option(256, help="tokens per training window"),
    pa_weight: float = typer.Option(0.05, help="Prior-Approximate loss weight (summed over layers)"),
    balance_weight: float = typer.Option(0.01, help="load-balancing loss weight (summed over layers)"),
    lm_weight: float = typer.Option(0.0, help="stage 1 LM loss weight (with --router-grad straight_through)"),
    router_grad: str = typer.Option("pa_only", help="pa_only (hard top-k, the reference) or straight_through "
                                                    "(the LM loss reaches the router)"),
    train_data: str = TRAIN_DATA,
    seed: int = typer.Option(0, help="seed for partitions, routers and batches"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-<E>e<K>k)"),
    run: RunOptions = None,
) -> None:
    """Split every FFN into routed experts (FactorLLM) and run only the top-k per token.

    No weight changes in the split; routers learn from the dense FFN (Prior-Approximate loss), then the experts are
    fine-tuned. The exported directory is a plain Hugging Face model plus its routers (experts.json,
    experts.safetensors); sparseforge.load_model(DIR) and `sparseforge generate DIR` run it sparsely.
    """
    stage = {"factorize": {"experts": experts, "topk": topk, "partition": partition, "shared_expert": shared_expert,
                           "router_steps": router_steps, "expert_steps": expert_steps, "router_lr": router_lr,
                           "expert_lr": expert_lr, "batch": batch_size, "seqlen": seqlen, "pa_weight": pa_weight,
                           "balance_weight": balance_weight, "lm_weight": lm_weight, "router_grad": router_grad}}
    _run_stages(model, [stage], {"calibration": train_data, "seed": seed},
                out_dir or _run_directory(model, f"{experts}e{topk}k"), run=run)


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP + "; a directory saved with a skip policy or experts uses them"),
    prompt: str = typer.Argument(..., help="text to continue"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, help="sampling temperature (with --sample)"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass (with --sample)"),
    seed: int = typer.Option(0, help="sampling seed"),
    policy: Optional[Path] = typer.Option(None, help="a skip_policy.json (or a directory holding one) to apply"),
    no_skip: bool = typer.Option(False, "--no-skip", help="ignore the saved skip policy: the full model"),
    device: str = DEVICE,
    runtime: Optional[str] = RUNTIME,
    runtime_dtype: Optional[str] = RUNTIME_DTYPE,
) -> None:
    """Generate text with the KV cache, skipping FFN blocks as the model's skip policy decides (or running only the
    routed experts of a factorized model)."""
    from .models.loading import load_model
    from .skip import generate as skip_generate
    from .skip import install_policy, read_policy, uninstall_policy
    from .skip.generation import check_sampling
    from .skip.policy import check_fingerprint

    check_sampling(max_new_tokens, sample, temperature, top_p, seed)
    handle = load_model(model, device=device)
    _install_runtime(handle, runtime, runtime_dtype)
    if no_skip:
        uninstall_policy(handle)
    elif policy is not None:
        chosen = read_policy(policy)
        check_fingerprint(chosen, handle.adapter, str(policy))
        install_policy(handle, chosen)
    result = skip_generate(handle, prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                           temperature=temperature, top_p=top_p, seed=seed)
    out.print(prompt + result["texts"][0], highlight=False, markup=False)
    summary = result["skip"]
    experts, skip = handle.attachment("experts"), handle.attachment("skip")
    if experts is not None:
        _log(f"{experts.settings.describe()}: {experts.settings.topk} of "
             f"{experts.layout.routed} routed experts ran per token in every FFN")
    elif summary is None:
        _log("no skip policy: every FFN block ran")
    else:
        _log(f"{skip.policy.describe()}: skipped {summary['ratio']:.1%} of FFN blocks over "
             f"{summary['governed_tokens']} tokens ({summary['warmup_tokens']} warm-up tokens ran densely)")


@app.command()
def continual(
    benchmark: str = typer.Option("split-fashion-mnist", help="split-fashion-mnist, split-cifar10 (offline), "
                                                              "split-cifar100, split-miniimagenet (--train-data DIR)"),
    strategy: str = typer.Option("dst", help="dst (per-task masks rewired by DST), static (per-task random masks), "
                                             "finetune (one dense network), dense-per-task (upper bound)"),
    density: float = typer.Option(0.2, help="share of weights each task's mask keeps, in (0, 1]"),
    init: str = typer.Option("uniform", help="mask initialisation: uniform or erk"),
    growth: str = typer.Option("random", help="regrowth: random, unfired, gradient (RigL), momentum (SNFS)"),
    drop: str = typer.Option("magnitude", help="which active weights die: magnitude or set"),
    tasks: Optional[int] = typer.Option(None, help="number of tasks (default: the benchmark's); must divide the "
                                                   "classes"),
    backbone: str = typer.Option("mlp", help="mlp (784-256-256) or resnet (small CIFAR ResNet)"),
    epochs: int = typer.Option(3, help="epochs per task"),
    batch_size: int = typer.Option(64, help="training batch"),
    lr: float = typer.Option(1e-3, help="Adam learning rate"),
    delta_t: int = typer.Option(50, help="optimizer steps between topology updates"),
    drop_fraction: float = typer.Option(0.5, help="share of active weights rewired at the first update (cosine "
                                                  "decay to 0.005 over the task)"),
    new_weights: str = typer.Option("zero", help="a new task's own weights start at zero (the reference) or at a "
                                                 "fresh initialisation (init)"),
    seeds: int = typer.Option(1, help="seeds to run (resumable, one line each in runs.jsonl)"),
    seed: int = typer.Option(0, help="first seed"),
    baselines: bool = typer.Option(False, "--baselines", help="also run the static mask, fine-tuning and a dense "
                                                             "network per task"),
    train_data: Optional[str] = typer.Option(None, help="image directory (split-miniimagenet)"),
    workers: int = typer.Option(1, help="runs in parallel processes"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/continual-...)"),
) -> None:
    """Task-incremental continual learning with a sparse sub-network per task (dynamic sparse training).

    Earlier tasks' weights are frozen but shared, so nothing is forgotten: backward transfer is exactly zero under
    task scoring. Reports the accuracy matrix, average accuracy, backward and forward transfer under both scorings
    (within the task's classes, and over all logits as the study's code does), with plots.
    """
    from .dst.api import continual as run
    from .dst.api import summary_table
    from .dst.continual import ContinualConfig

    config = ContinualConfig(strategy=strategy, backbone=backbone, density=density, init=init, growth=growth,
                             drop=drop, delta_t=delta_t, drop_fraction=drop_fraction, new_weights=new_weights,
                             epochs=epochs, batch=batch_size, lr=lr, seed=seed)
    out_dir = out_dir or str(Path("runs") / f"continual-{benchmark}-{config.label().replace(' ', '-')}")
    summary = run(config, out_dir, benchmark, seeds, tasks, train_data, baselines, workers)
    out.print(summary_table(summary["rows"]), highlight=False, markup=False)
    _log(f"{summary['benchmark']}; written to {out_dir}")


@app.command()
@stage_command()
def dst(
    model: str = typer.Argument("mlp", help="an image backbone (mlp, resnet) or a language model: " + MODEL_HELP),
    method: str = typer.Option("rigl", help="set, rigl, snfs, static (a fixed random mask) or dense"),
    density: Optional[float] = typer.Option(None, help="share of weights kept, in (0, 1] (default: 0.2 for image "
                                                       "backbones, 0.5 for language models)"),
    init: str = typer.Option("erk", help="mask initialisation: uniform or erk"),
    train_data: Optional[str] = typer.Option(None, help="images: fashion-mnist (default), cifar10, cifar100; "
                                                        "language models: " + TEXT),
    epochs: int = typer.Option(10, help="training epochs (image backbones)"),
    steps: int = typer.Option(200, help="training steps (language models)"),
    seqlen: int = typer.Option(256, help="tokens per training window (language models)"),
    from_scratch: bool = typer.Option(True, "--from-scratch/--from-pretrained",
                                      help="language models: re-initialise the weights, or start from the loaded "
                                           "ones under random masks"),
    batch_size: int = typer.Option(128, help="training batch (images) or windows per step (language models: at "
                                            "most 8)"),
    lr: float = typer.Option(1e-3, help="learning rate"),
    delta_t: int = typer.Option(100, help="optimizer steps between topology updates"),
    drop_fraction: float = typer.Option(0.3, help="share of active weights rewired at the first update"),
    stop_fraction: float = typer.Option(0.75, help="no topology updates after this share of training"),
    seed: int = typer.Option(0, help="seed for masks, initialisation and batches"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/dst-...)"),
    run: RunOptions = None,
) -> None:
    """Train a model sparse from scratch with dynamic sparse training (SET, RigL, SNFS): an image classifier, or
    any supported language model (its attention and FFN projections).

    Every layer keeps exactly its share of weights throughout. An image run writes the weights (zeros where
    pruned), the masks and the test accuracy; a language-model run is the recipe stage `dst:` (run directory with
    the exported model, report.json/report.md with perplexity and per-layer sparsity, recipe.yaml).
    """
    from .dst.backbones import BACKBONES

    if model in BACKBONES:
        from .dst.api import train_sparse
        from .dst.train import SparseTrainConfig

        density = SparseTrainConfig.density if density is None else density
        out_dir = out_dir or _run_directory(model, f"dst-{method}-{density:g}")
        config = SparseTrainConfig(method=method, density=density, init=init, backbone=model, epochs=epochs,
                                   batch=batch_size, lr=lr, delta_t=delta_t, drop_fraction=drop_fraction,
                                   stop_fraction=stop_fraction, seed=seed)
        result = train_sparse(config, out_dir, train_data or "fashion-mnist", run.overwrite)
        out.print(f"{method} at density {result['density']:.3f}: test accuracy {100 * result['accuracy']:.2f}% "
                  f"after {result['steps']} steps ({result['updates']} topology updates, {result['seconds']:.0f} s)",
                  highlight=False)
        _log(f"written to {out_dir}")
    else:
        from .dst.stage import DstStage

        density = DstStage.model_fields["density"].default if density is None else density
        out_dir = out_dir or _run_directory(model, f"dst-{method}-{density:g}")
        stage = {"dst": {"method": method, "density": density, "init": init, "from_scratch": from_scratch,
                         "steps": steps, "lr": lr, "batch": min(batch_size, 8), "seqlen": seqlen, "delta_t": delta_t,
                         "drop_fraction": drop_fraction, "stop_fraction": stop_fraction}}
        _run_stages(model, [stage], {"calibration": train_data or "default", "seed": seed},
                    out_dir, run=run)


@app.command()
@stage_command()
def search(
    model: str = typer.Argument(..., help=MODEL_HELP),
    algorithm: str = typer.Option("nsga2", help="nsga2 (whole network, a front), evopress (one allocation at "
                                                "--target), decompose (groups of blocks, combined by impairment)"),
    pick: Optional[float] = typer.Option(None, help="average sparsity of the front point to export (default: "
                                                    "--target)"),
    target: Optional[float] = typer.Option(None, help="evopress: the average sparsity to search at; also marks OWL "
                                                      "on the plot"),
    method: str = typer.Option("wanda", help="one-shot method of every variant: magnitude, wanda, sparsegpt"),
    pattern: str = typer.Option("unstructured", help="unstructured, or an N:M family such as nm:8 (levels pick N)"),
    levels: str = typer.Option("0.3:0.9:0.05", help="per-block sparsity levels: lo:hi:step or a,b,c"),
    search_windows: int = typer.Option(8, help="calibration windows scored by the KL objective"),
    search_seqlen: int = typer.Option(128, help="their length in tokens"),
    population: int = typer.Option(16, help="NSGA-II population (also each group's, with decompose)"),
    generations: int = typer.Option(12, help="generations (NSGA-II, EvoPress)"),
    groups: int = typer.Option(5, help="decompose: groups of consecutive blocks"),
    gpir_points: int = typer.Option(10, help="decompose: front points per group measured in the full model"),
    offspring: int = typer.Option(16, help="evopress: children per generation"),
    workers: int = typer.Option(0, help="0: evaluate serially here; N: on N Ray workers (a local Ray is started "
                                        "unless --ray-address is given)"),
    ray_address: Optional[str] = typer.Option(None, help="join a Ray cluster (host:port, ray://host:port or auto)"),
    ray_timeout: float = typer.Option(10.0, help="seconds to wait for --ray-address before giving up"),
    cache_dir: Optional[str] = typer.Option(None, help="where layer variants are cached (default "
                                                       "$SPARSEFORGE_CACHE/search)"),
    cache_budget: float = typer.Option(4.0, help="disk budget of the variant cache in GB (least recently used "
                                                 "variants are evicted beyond it)"),
    calibration: str = CALIBRATION,
    nsamples: int = typer.Option(CALIBRATION_WINDOWS, help="calibration windows for the variants' statistics"),
    seqlen: int = typer.Option(512, help="their length (and the evaluation window length)"),
    seed: int = typer.Option(0, help="seed of the windows and the search"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<model>-search-...)"),
    run: RunOptions = None,
) -> None:
    """Search per-block sparsity levels for the best quality at each size, and export the model at one point.

    Every block is pruned at every level once (cached within --cache-budget); a candidate is then only a swap of
    tensors, scored by its KL divergence from the dense model. The run directory holds the Pareto front
    (report.md, report.json with each point's per-block sparsities, search_front.png with uniform and OWL on the
    same axes) and the model pruned at --pick. Evaluations are memoised: the same search run again (another
    --pick, or after an interruption) replays instead of recomputing.
    """
    stage = {"search": {"algorithm": algorithm, "pick": pick, "target": target, "method": method,
                        "pattern": pattern, "levels": levels, "windows": search_windows, "seqlen": search_seqlen,
                        "population": population, "generations": generations, "groups": groups,
                        "group_generations": generations, "gpir_points": gpir_points, "offspring": offspring,
                        "workers": workers, "ray_address": ray_address, "ray_timeout": ray_timeout,
                        "cache_dir": cache_dir, "cache_budget_gb": cache_budget}}
    chosen = pick if pick is not None else target
    out_dir = out_dir or _run_directory(model, f"search-{algorithm}" + (f"-{chosen:g}" if chosen is not None else ""))
    report = _run_stages(model, [stage], {"calibration": calibration, "nsamples": nsamples, "seqlen": seqlen,
                                          "seed": seed},
                         out_dir, run=run)
    found = next(s for s in report["stages"] if s.get("stage") == "search")
    table = Table(title=f"{found['algorithm']} front: KL to dense vs average sparsity")
    for column in ("average sparsity", "KL to dense", "uniform at that sparsity"):
        table.add_column(column, justify="right")
    uniform = {round(p["average_sparsity"], 6): p["kl"] for p in found["uniform"]}
    for point in found["front"]:
        same = uniform.get(round(point["average_sparsity"], 6))
        table.add_row(f"{point['average_sparsity']:.4f}", f"{point['kl']:.4f}", "-" if same is None else f"{same:.4f}")
    out.print(table)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    tasks: Optional[str] = typer.Option(None, help="zero-shot tasks through lm-eval, comma-separated or 'all': "
                                        "arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, openbookqa, "
                                        "lambada_openai"),
    qa: Optional[str] = typer.Option(None, help="knowledge QA by greedy generation: triviaqa, nq_open, or 'all'"),
    limit: Optional[int] = typer.Option(None, help="at most this many items per task (default all)"),
    qa_prompt: str = typer.Option("plain-5shot", help="QA prompt format: plain, plain-5shot, chat, chat-5shot"),
    baseline: Optional[str] = typer.Option(None, help="also measure this (dense) model with the same settings, "
                                           "for 'retained' columns, QA agreement and speed ratios"),
    ppl: bool = typer.Option(True, "--ppl/--no-ppl", help="perplexity under the pinned protocol"),
    speed: bool = typer.Option(False, "--speed", help="prefill and decode tokens/s (median of repeats)"),
    eval_data: str = EVAL_DATA,
    seqlen: int = typer.Option(512, help="evaluation window length in tokens"),
    eval_windows: int = EVAL_WINDOWS,
    batch_size: int = typer.Option(1, help="batch size for the speed measurement"),
    prompt_tokens: int = typer.Option(128, help="prompt length for the speed measurement"),
    new_tokens: int = typer.Option(32, help="decoded tokens for the speed measurement"),
    repeats: int = typer.Option(3, help="repeats for the speed measurement (median reported)"),
    threads: Optional[int] = typer.Option(None, help="torch threads for the speed measurement (default: all)"),
    dtype: Optional[str] = typer.Option(None, help="compute dtype: float32, float16, bfloat16 (default: the model's)"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="write report.json and report.md into this directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out directory"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics to this JSON file"),
    bos: str = BOS,
    device: str = DEVICE,
    runtime: Optional[str] = RUNTIME,
    runtime_dtype: Optional[str] = RUNTIME_DTYPE,
) -> None:
    """Evaluate a model: perplexity, sparsity, zero-shot tasks, knowledge QA and speed, optionally next to a baseline."""
    from .atomic import atomic_write_text, check_output_directory, check_output_file
    from .evaluation.session import EvalSettings, evaluate_session, write_eval_report
    from .evaluation.tasks import QA_TASKS, ZERO_SHOT_TASKS, parse_task_names
    from .models.loading import load_model

    settings = EvalSettings(perplexity=ppl, data=eval_data, seqlen=seqlen, windows=eval_windows or None, limit=limit,
                            tasks=parse_task_names(tasks, ZERO_SHOT_TASKS) if tasks else [],
                            qa=parse_task_names(qa, QA_TASKS) if qa else [], qa_prompt=qa_prompt, speed=speed,
                            speed_batch_size=batch_size, speed_prompt_tokens=prompt_tokens, speed_new_tokens=new_tokens,
                            speed_repeats=repeats, speed_threads=threads, bos=bos)
    if out_dir:  # output locations are checked before minutes of evaluation, not after
        check_output_directory(out_dir, overwrite)
    if json_out:
        check_output_file(json_out)
    handle = load_model(model, dtype=dtype, device=device)
    in_runtime = _install_runtime(handle, runtime, runtime_dtype)
    reference = load_model(baseline, dtype=dtype, device=device) if baseline else None
    report = evaluate_session(handle, settings, reference)
    if in_runtime is not None:
        report["runtime"] = in_runtime.summary()
    _print_eval(report)
    if out_dir:
        write_eval_report(report, out_dir, overwrite=overwrite)
        _log(f"report written to {out_dir}/report.md")
    if json_out:
        atomic_write_text(json_out, json.dumps(report["metrics"]["after"], indent=1))


def _print_eval(report: dict) -> None:
    metrics, reference = report["metrics"]["after"], report["metrics"]["before"]
    table = Table(title=report["model"]["source"])
    for column in ("metric", "baseline", "model") if reference else ("metric", "value"):
        table.add_column(column, justify="left" if column == "metric" else "right")

    def row(name: str, pick) -> None:
        values = [pick(m) for m in ((reference, metrics) if reference else (metrics,))]
        table.add_row(name, *values)

    if "perplexity" in metrics:
        row("perplexity", lambda m: f"{m['perplexity']['perplexity']:.3f}")
    row("sparsity (prunable linears)", lambda m: f"{m['sparsity']:.2%}")
    row("nonzero parameters", lambda m: f"{m['parameters']['nonzero']:,}")
    if "speed" in metrics:
        row("prefill tokens/s", lambda m: f"{m['speed']['prefill_tokens_per_s']:.1f}")
        row("decode tokens/s", lambda m: f"{m['speed']['decode_tokens_per_s']:.1f}")
    out.print(table)
    _print_task_table(reference, metrics, ("baseline", "model"))


def _print_task_table(before: dict | None, after: dict, labels: tuple[str, str]) -> None:
    from .evaluation.report import task_rows

    rows = task_rows(before, after)
    if rows:
        tasks = Table(title="zero-shot tasks and knowledge QA")
        for column in ("task", "metric", *labels, "retained"):
            tasks.add_column(column, justify="left" if column in ("task", "metric") else "right")
        for values in rows:
            tasks.add_row(*values)
        out.print(tasks)


@app.command()
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         masks_from_zeros: bool = typer.Option(False, "--masks-from-zeros", help=MASKS_FROM_ZEROS_HELP)) -> None:
    """Show architecture, parameter counts, pruning masks and a per-layer sparsity table.

    Masks are what the export recorded; exact zeros are counted separately (a dense model has some)."""
    from .evaluation.stats import parameter_counts, sparsity_summary
    from .export.saving import read_format
    from .interop import describe_checkpoint
    from .models.loading import load_model, resolve_model_directory

    handle = load_model(model, masks_from_zeros=masks_from_zeros)
    geometry = handle.adapter.head_geometry()
    params = parameter_counts(handle)
    summary = sparsity_summary(handle)
    out.print(f"[bold]{model}[/bold]: {handle.model_type} (family {handle.adapter.family}), "
              f"{handle.adapter.num_blocks} blocks, dtype {str(handle.dtype).removeprefix('torch.')}")
    out.print(f"heads: {geometry.num_heads} query / {geometry.num_kv_heads} key-value, head dim {geometry.head_dim}; "
              f"tied embeddings: {handle.adapter.tied_embeddings()}")
    masked = [row for row in summary["per_layer"] if row["name"] in handle.masks]
    kept = sum(int(handle.masks[row["name"]].sum()) for row in masked)
    masked_params = sum(row["shape"][0] * row["shape"][1] for row in masked)
    out.print(f"parameters: {params['total']:,} total, {params['nonzero']:,} nonzero; "
              f"prunable linears: {summary['prunable_params']:,}, exact zeros {summary['overall']:.2%}")
    out.print(f"pruning masks: {len(masked)} of {len(summary['per_layer'])} linears" +
              (f", {1 - kept / masked_params:.2%} of their weights masked" if masked else
               " (none recorded; --masks-from-zeros reads zeros as masks)"))
    path = Path(model)
    description = read_format(resolve_model_directory(path)) if path.is_dir() else None
    if description:
        out.print(f"export format: {description['format']} ({description['dtype']})")
    elif path.is_dir() and (foreign := describe_checkpoint(resolve_model_directory(path))):
        out.print(foreign)
    table = Table(title="per-layer sparsity")
    for column in ("layer", "role", "shape", "exact zeros", "masked"):
        table.add_column(column, justify="left" if column in ("layer", "role", "shape") else "right")
    for row in summary["per_layer"]:
        mask = handle.masks.get(row["name"])
        table.add_row(row["name"], row["role"], "x".join(map(str, row["shape"])), f"{row['sparsity']:.2%}",
                      "-" if mask is None else f"{1 - mask.float().mean().item():.2%}")
    out.print(table)


@app.command("export")
def export_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_path: str = typer.Option(..., "--out", help="output: a directory, or a .gguf file for --format gguf"),
    format: str = typer.Option("auto", help="auto (smallest exact sparseforge format), dense, bitmask, nm, or gguf "
                                            "(llama.cpp)"),
    export_dtype: Optional[str] = EXPORT_DTYPE,
    gguf_type: str = typer.Option("f16", help="tensor type of a GGUF file's matrices: f16, bf16, f32, q8_0"),
    masks_from_zeros: bool = typer.Option(False, "--masks-from-zeros", help=MASKS_FROM_ZEROS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output written by sparseforge"),
) -> None:
    """Write a model in another format: a sparseforge directory (dense, bitmask, nm) or a GGUF file for llama.cpp.

    Reads anything `info` reads, llm-compressor's output and compressed-tensors sparse checkpoints included, so a
    model pruned elsewhere becomes a compact export, and a shrunk model a GGUF file."""
    from .evaluation.stats import weight_file_bytes
    from .export.exporting import export_model
    from .models.loading import load_model

    handle = load_model(model, masks_from_zeros=masks_from_zeros)
    written = export_model(handle, out_path, format=format, dtype=export_dtype, gguf_type=gguf_type,
                           overwrite=overwrite)
    for warning in written.get("warnings", []):
        console.print(f"warning: {warning}")
    size = written.get("bytes") or weight_file_bytes(Path(out_path))
    detail = written.get("tensor_type") or written.get("dtype")
    out.print(f"wrote {out_path}: format {written['format']} ({detail}), {size / 2**20:.1f} MiB of weights")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML: model, data, stages, evaluate, export"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/<recipe name>)"),
    overwrite: bool = OVERWRITE,
    restart: bool = RESTART,
) -> None:
    """Run a recipe and write a run directory (model/, report.json, report.md, plots).

    Calibrated stages checkpoint after every block; rerunning the same command after an interruption resumes.
    """
    from .pipeline import run_recipe
    from .recipe import load_recipe

    loaded = load_recipe(recipe)
    out_dir = out_dir or str(Path("runs") / recipe.stem)
    _print_summary(run_recipe(loaded, out_dir, overwrite=overwrite, log=_log, restart=restart), out_dir)


def _version(value: bool) -> None:
    if value:
        out.print(f"sparseforge {__version__}")
        raise typer.Exit()


_DEBUG = {"on": bool(os.environ.get("SPARSEFORGE_DEBUG"))}


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="print the full traceback of an internal error")) -> None:
    _DEBUG["on"] = _DEBUG["on"] or debug
    _quiet_libraries()


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage error, exit, abort) classes of every click the installed typer may raise: typer >= 0.17 ships its
    own copy of click (``typer._click``) and its own ``Exit``/``Abort`` (``typer.exceptions``); older typers use
    click's."""
    import importlib

    found: dict[str, list[type]] = {"ClickException": [], "Exit": [], "Abort": []}
    for module_name in ("click.exceptions", "typer.exceptions", "typer._click.exceptions"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, classes in found.items():
            if isinstance(getattr(module, name, None), type):
                classes.append(getattr(module, name))
    return tuple(found["ClickException"]), tuple(found["Exit"]), tuple(found["Abort"])


def _error(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False, markup=True)


def _usage_message(exc) -> str:
    """A click usage error as one line, with the hint to --help that click prints on a second line."""
    command = getattr(getattr(exc, "ctx", None), "command_path", "sparseforge")
    return f"{exc.format_message()} (see '{command} --help')"


# Option spellings of the previous release, accepted for one more with a warning (docs/cli.md), per command.
_TRAIN_RENAMES = {"--data": "--train-data", "--batch": "--batch-size"}
DEPRECATED = {
    "prune": {"--data": "--eval-data", "--dtype": "--export-dtype"},
    "eval": {"--data": "--eval-data", "--windows": "--eval-windows"},
    "retrain": _TRAIN_RENAMES,
    "factorize": {**_TRAIN_RENAMES, "--train-seqlen": "--seqlen"},
    "dst": _TRAIN_RENAMES,
    "continual": _TRAIN_RENAMES,
    "shrink": {"--dtype": "--export-dtype"},
    "finercut": {"--dtype": "--export-dtype", "--calib-seqlen": "--seqlen"},
    "search": {"--windows": "--search-windows"},
}


def modernise(args: list[str]) -> list[str]:
    """``args`` with deprecated option spellings replaced by today's, warning once for each on stderr.

    finercut's ``--seqlen`` used to be the evaluation window; a command line that still uses ``--calib-seqlen``
    was written for that meaning, so there its ``--seqlen`` becomes ``--eval-seqlen``.
    """
    command = next((a for a in args if not a.startswith("-")), None)
    renames = dict(DEPRECATED.get(command, {}))
    names = {a.partition("=")[0] for a in args}
    if command == "finercut" and "--calib-seqlen" in names:
        renames["--seqlen"] = "--eval-seqlen"
    result = []
    for arg in args:
        name, equals, value = arg.partition("=")
        if name in renames:
            console.print(f"warning: {name} is deprecated; use {renames[name]}", soft_wrap=True, highlight=False,
                          markup=False)
            arg = renames[name] + equals + value
        result.append(arg)
    return result


def main() -> None:
    """Entry point: every way a command can end maps to one exit code and, on failure, one line on stderr.

    0 success; 2 bad input or usage (``error: ...``); 130 / 143 interrupted by SIGINT / SIGTERM (``interrupted;
    ...`` with where a rerun resumes); 1 an internal error (one line; the traceback with ``--debug``).
    """
    from .interrupts import Interrupted, install_handlers

    click_error, click_exit, click_abort = _click_exceptions()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_handlers()
    try:
        code = app(args=modernise(sys.argv[1:]), standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click_exit as exc:
        sys.exit(exc.exit_code)
    except click_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command: its help is the answer, not an error
            console.print(exc.format_message(), soft_wrap=True, highlight=False, markup=False)
        else:
            _error(_usage_message(exc))
        sys.exit(2)
    except SparseforgeError as exc:
        _error(str(exc))
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt, *click_abort) as exc:
        interrupted = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        hint = f"rerun the same command to resume from {interrupted.resume}" if interrupted.resume else \
            "nothing half-written was left behind"
        console.print(f"interrupted ({interrupted}); {hint}", soft_wrap=True, highlight=False, markup=False)
        sys.exit(interrupted.exit_code)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if _DEBUG["on"]:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        _error(f"internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback and "
               "please report it")
        sys.exit(1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
