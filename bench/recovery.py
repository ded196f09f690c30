"""Recovery benchmark: one-shot masks x recovery methods at the same training-token budget, side by side.

For every mask (method:sparsity or method:N:M) the model is pruned once; every recovery configuration starts from
a copy of that pruned model, trains on the same packed windows of the training side of the default corpus, and is
measured on the same evaluation windows and zero-shot items. Reconstruction prunes again with reconstruction inside
the layer-sequential pass, with as many steps per block as give the same token budget per block. Rows are appended
to ``results.json`` as they finish, so an interrupted run resumes where it stopped. Every cell runs in its own
process, so its peak memory is its own.

    ../.venv/bin/python bench/recovery.py --steps 16 --batch 4 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import markdown_table, print_setup  # noqa: E402

CONFIGS = {  # name: method, parameter groups, LoRA variant, learning rate (else the method's --lr-*), checkpointing
    "none": {},
    "norm": {"method": "perp", "params": ["norm"]},
    "norm+mask": {"method": "perp", "params": ["norm", "lora"], "variant": "mask"},
    "norm+scale": {"method": "perp", "params": ["norm", "lora"], "variant": "scale"},
    "norm+prune_at_merge": {"method": "perp", "params": ["norm", "lora"], "variant": "prune_at_merge"},
    "norm+plain (dense)": {"method": "perp", "params": ["norm", "lora"], "variant": "plain"},
    "all-perp": {"method": "perp", "params": ["bias", "norm", "lm_head", "lora"], "variant": "mask"},
    "reconstruct": {"method": "reconstruct", "params": ["norm", "lora"], "variant": "mask"},  # block by block
    "full": {"method": "full"},
    "full@1e-4": {"method": "full", "lr": 1e-4},
    "norm+mask+gc": {"method": "perp", "params": ["norm", "lora"], "variant": "mask", "checkpointing": True},
    "full@1e-4+gc": {"method": "full", "lr": 1e-4, "checkpointing": True},
}


def parse_mask(spec: str) -> dict:
    method, _, amount = spec.partition(":")
    if ":" in amount:
        return {"method": method, "pattern": amount}
    return {"method": method, "sparsity": float(amount)}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--masks", default="magnitude:0.6,wanda:0.6,magnitude:2:4,wanda:2:4")
    parser.add_argument("--configs", default="none,norm,norm+mask,norm+scale,reconstruct,full")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr-perp", type=float, default=1e-3)
    parser.add_argument("--lr-full", type=float, default=2e-5)
    parser.add_argument("--lr-reconstruct", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (pruning, reconstruction)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "recovery"))
    parser.add_argument("--fractions", action="store_true",
                        help="only write the trainable-fraction table of every parameter-group configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one cell, as JSON
    return parser.parse_args()


def measure(handle, args) -> dict:
    from sparseforge.evaluation.suite import evaluate, prepare_evaluation

    windows, corpus = prepare_evaluation(handle, "default", args.eval_seqlen, args.eval_windows)
    tasks = args.tasks.split(",") if args.tasks else []
    metrics = evaluate(handle, windows, corpus, progress=False, tasks=tasks, limit=args.limit)
    accs = [m["metrics"]["acc"] for m in (metrics.get("zero_shot") or {}).values()]
    return {"perplexity": metrics["perplexity"]["perplexity"], "sparsity": metrics["sparsity"],
            "zero_shot": {t: m["metrics"]["acc"] for t, m in (metrics.get("zero_shot") or {}).items()},
            "zero_shot_avg": sum(accs) / len(accs) if accs else None}


def worker(args: argparse.Namespace) -> dict:
    """One cell in its own process: load the pruned model (or prune with reconstruction), recover, measure.

    Its own process, so the peak memory while training is this configuration's alone: the model plus whatever
    the training needs, nothing a previous cell left behind.
    """
    import torch

    import sparseforge as sf
    from sparseforge.memory import PeakMemory

    torch.set_num_threads(args.threads)
    cell = json.loads(args.worker)
    config = CONFIGS[cell["config"]]
    method, params = config.get("method"), config.get("params")
    lora = {"variant": config.get("variant", "mask"), "rank": args.rank}
    lr = config.get("lr") or (args.lr_full if method == "full" else args.lr_perp)
    tokens = args.steps * args.batch * args.seqlen
    extra: dict = {}
    trainable, peak = 0.0, None
    if method == "reconstruct":
        handle = sf.load_model(args.model)
        started = time.perf_counter()
        total = sum(p.numel() for p in handle.model.parameters())
        per_block = max(1, tokens // (8 * args.seqlen))  # prune batches hold 8 windows
        with PeakMemory() as memory:
            sf.prune(handle, **parse_mask(cell["mask"]), calibration="default", nsamples=args.nsamples,
                     seqlen=args.seqlen, seed=args.seed, progress=False,
                     reconstruct={"params": params, "lora": lora, "steps": per_block, "lr": args.lr_reconstruct})
        record = handle.history[-1]["reconstruction"]
        trainable, peak = max(b["trainable"] for b in record["blocks"]) / total, memory.peak_mb
        extra = {"mse_before_sum": record["mse_before_sum"], "mse_after_sum": record["mse_after_sum"],
                 "steps_per_block": per_block,
                 "note": "trainable: one block's; seconds and memory include pruning (reconstruction runs inside it)"}
    else:
        handle = sf.load_model(cell["pruned"])
        started = time.perf_counter()
        if method is not None:
            sf.retrain(handle, method=method, params=params or ("norm",), lora=lora, steps=args.steps,
                       batch=args.batch, seqlen=args.seqlen, seed=args.seed, lr=lr, progress=False,
                       gradient_checkpointing=config.get("checkpointing", False))
            record = handle.history[-1]
            trainable, peak = record["trainable"]["fraction"], record["training"]["peak_memory_mb"]
            extra = {"loss_first": record["training"]["loss_first"], "loss_last": record["training"]["loss_last"],
                     "memory_at_start_mb": record["training"]["memory_at_start_mb"],
                     "sparsity_preserved": record["sparsity_preserved"], "stopped": record["training"]["stopped"]}
    seconds = time.perf_counter() - started
    return {"mask": cell["mask"], "config": cell["config"], **measure(handle, args), "trainable_fraction": trainable,
            "seconds": round(seconds, 1), "peak_memory_mb": peak, **extra}


FRACTION_CONFIGS = [["bias"], ["norm"], ["bias", "norm"], ["lm_head"], ["lora"], ["norm", "lora"],
                    ["bias", "norm", "lm_head", "lora"]]


def trainable_fractions(args: argparse.Namespace) -> None:
    """Trainable parameters of every group combination (LoRA rank ``--rank`` and 8), on the model and on OPT-shaped
    tiny model (which has biases), without training: what PERP's "tiny subset" is at this scale."""
    import sparseforge as sf
    from sparseforge.retrain.lora import LoRAConfig
    from sparseforge.retrain.selection import select_parameters

    rows = []
    for model in (args.model, "tiny-opt"):
        pruned = sf.load_model(model)
        sf.prune(pruned, method="magnitude", sparsity=0.5, progress=False)
        for rank in (args.rank, 8):
            for groups in FRACTION_CONFIGS:
                if rank != args.rank and "lora" not in groups and "lm_head" not in groups:
                    continue
                handle = copy.deepcopy(pruned)
                described = select_parameters(handle, groups, LoRAConfig("mask", rank)).describe()
                rows.append([model, "+".join(groups), rank if {"lora", "lm_head"} & set(groups) else "–",
                             f"{described['trainable']:,}", f"{described['fraction']:.4%}"])
    table = markdown_table(["model", "groups", "LoRA rank", "trainable", "fraction of the model"], rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainable_fractions.md").write_text("# Trainable parameters per configuration\n\n" + table + "\n")
    print(table)


def run_cell(args: argparse.Namespace, cell: dict) -> dict:
    argv = [sys.executable, __file__, "--worker", json.dumps(cell)]
    for key, value in vars(args).items():
        if key not in ("worker", "out", "masks", "configs", "fractions"):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"cell {cell} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = arguments()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.fractions:
        trainable_fractions(args)
        return
    import torch

    import sparseforge as sf

    torch.set_num_threads(args.threads)
    tokens = args.steps * args.batch * args.seqlen
    setup = print_setup(model=args.model, data="default (training side for training and calibration, evaluation "
                        "side for perplexity)", train_tokens=tokens, steps=args.steps, batch=args.batch,
                        seqlen=args.seqlen, lr_perp=args.lr_perp, lr_full=args.lr_full,
                        lr_reconstruct=args.lr_reconstruct, lora_rank=args.rank, nsamples=args.nsamples,
                        eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, tasks=args.tasks,
                        limit=args.limit, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    done = {(r["mask"], r["config"]) for r in rows}

    def save() -> None:
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
        os.replace(tmp, results_path)
        write_table(out, setup, rows)

    if ("dense", "none") not in done:
        dense = sf.load_model(args.model)
        rows.append({"mask": "dense", "config": "none", **measure(dense, args), "trainable_fraction": 0.0,
                     "seconds": 0.0, "peak_memory_mb": None})
        save()
    with tempfile.TemporaryDirectory(prefix="recovery-") as scratch:
        for mask_spec in args.masks.split(","):
            saved = None
            for config in args.configs.split(","):
                if (mask_spec, config) in done:
                    continue
                if CONFIGS[config].get("method") != "reconstruct" and saved is None:  # prune once per mask, share it
                    handle = sf.load_model(args.model)
                    sf.prune(handle, **parse_mask(mask_spec), calibration="default", nsamples=args.nsamples,
                             seqlen=args.seqlen, seed=args.seed, progress=False)
                    saved = str(Path(scratch) / mask_spec.replace(":", "_"))
                    sf.save_model(handle, saved, format="dense")
                    del handle
                row = run_cell(args, {"mask": mask_spec, "config": config, "pruned": saved})
                rows.append(row)
                print(json.dumps(row), flush=True)
                save()


def write_table(out: Path, setup: dict, rows: list[dict]) -> None:
    dense = next((r for r in rows if r["mask"] == "dense"), None)
    unpruned = {r["mask"]: r["perplexity"] for r in rows if r["config"] == "none"}
    full: dict[str, dict] = {}  # the best full masked retraining per mask, by perplexity, with its own memory setting
    for r in rows:
        if r["config"].startswith("full") and (r["mask"] not in full or r["perplexity"] < full[r["mask"]]["perplexity"]):
            full[r["mask"]] = r
    checkpointed = {r["mask"]: r for r in rows if r["config"] == "full@1e-4+gc"}
    body = []
    for r in rows:
        gap = unpruned.get(r["mask"], float("nan")) - dense["perplexity"] if dense else float("nan")
        closed = (unpruned.get(r["mask"], float("nan")) - r["perplexity"]) / gap if gap and gap > 0 else None
        full_row = full.get(r["mask"])
        full_closed = (unpruned[r["mask"]] - full_row["perplexity"]) / gap if full_row and gap and gap > 0 else None
        vs_full = closed / full_closed if closed is not None and full_closed else None
        log_closed = (math.log(unpruned[r["mask"]]) - math.log(r["perplexity"])) / \
            (math.log(unpruned[r["mask"]]) - math.log(dense["perplexity"])) if closed is not None else None
        same_memory_setting = checkpointed.get(r["mask"]) if r["config"].endswith("+gc") else full_row
        memory = r["peak_memory_mb"] / same_memory_setting["peak_memory_mb"] if same_memory_setting and \
            r["peak_memory_mb"] and same_memory_setting["peak_memory_mb"] else None
        body.append([r["mask"], r["config"], f"{r['perplexity']:.2f}",
                     "–" if closed is None else f"{closed:.0%}", "–" if vs_full is None else f"{vs_full:.0%}",
                     "–" if log_closed is None else f"{log_closed:.0%}",
                     "–" if r["zero_shot_avg"] is None else f"{r['zero_shot_avg']:.3f}",
                     f"{r['sparsity']:.1%}", f"{r['trainable_fraction']:.3%}", f"{r['seconds']:.0f}",
                     "–" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}",
                     "–" if memory is None else f"{memory:.2f}"])
    header = ["mask", "recovery", "perplexity", "gap closed", "of full's closure", "log-ppl gap closed",
              "zero-shot avg", "sparsity",
              "trainable", "seconds", "peak MB (training)", "memory / full"]
    text = ["# Recovery after pruning", "", "Setup: `" + json.dumps(setup) + "`", "",
            "Gap closed = (pruned ppl - recovered ppl) / (pruned ppl - dense ppl); 'of full's closure' divides by the "
            "best full masked retraining of the same mask; 'log-ppl gap closed' is the same on log perplexity (the "
            "loss), a stricter view when pruning collapsed the model. Seconds: training (or pruning with reconstruction) only. "
            "Peak MB: resident memory of the cell's own process while training, model and libraries included; "
            "'memory / full' compares with full retraining under the same gradient-checkpointing setting (+gc).", "",
            markdown_table(header, body), ""]
    (out / "results.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
