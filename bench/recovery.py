"""Recovery benchmark: one-shot masks x recovery methods at the same training-token budget, side by side.

For every mask (method:sparsity or method:N:M) the model is pruned once; every recovery configuration starts from
a copy of that pruned model, trains on the same packed windows of the training side of the default corpus, and is
measured on the same evaluation windows and zero-shot items. Reconstruction prunes again with reconstruction inside
the layer-sequential pass, with as many steps per block as give the same token budget per block. Rows are appended
to ``results.json`` as they finish, so an interrupted run resumes where it stopped.

    ../.venv/bin/python bench/recovery.py --steps 16 --batch 4 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import markdown_table, print_setup  # noqa: E402

CONFIGS = {  # name: (method, params, LoRA variant)
    "none": (None, None, None),
    "norm": ("perp", ["norm"], None),
    "norm+mask": ("perp", ["norm", "lora"], "mask"),
    "norm+scale": ("perp", ["norm", "lora"], "scale"),
    "norm+prune_at_merge": ("perp", ["norm", "lora"], "prune_at_merge"),
    "norm+plain (dense)": ("perp", ["norm", "lora"], "plain"),
    "all-perp": ("perp", ["bias", "norm", "lm_head", "lora"], "mask"),
    "reconstruct": ("reconstruct", ["norm", "lora"], "mask"),
    "full": ("full", None, None),
}


def parse_mask(spec: str) -> dict:
    method, _, amount = spec.partition(":")
    if ":" in amount:
        return {"method": method, "pattern": amount}
    return {"method": method, "sparsity": float(amount)}


def main() -> None:
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
    args = parser.parse_args()

    import torch

    import sparseforge as sf
    from sparseforge.evaluation.suite import evaluate, prepare_evaluation
    from sparseforge.retrain.recovery import retrain

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
    dense = sf.load_model(args.model)
    windows, corpus = prepare_evaluation(dense, "default", args.eval_seqlen, args.eval_windows)
    tasks = args.tasks.split(",") if args.tasks else []

    def measure(handle) -> dict:
        metrics = evaluate(handle, windows, corpus, progress=False, tasks=tasks, limit=args.limit)
        accs = [m["metrics"]["acc"] for m in (metrics.get("zero_shot") or {}).values()]
        return {"perplexity": metrics["perplexity"]["perplexity"], "sparsity": metrics["sparsity"],
                "zero_shot": {t: m["metrics"]["acc"] for t, m in (metrics.get("zero_shot") or {}).items()},
                "zero_shot_avg": sum(accs) / len(accs) if accs else None}

    def save() -> None:
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
        os.replace(tmp, results_path)
        write_table(out, setup, rows)

    if ("dense", "none") not in done:
        rows.append({"mask": "dense", "config": "none", **measure(dense), "trainable_fraction": 0.0,
                     "seconds": 0.0, "peak_memory_mb": None})
        save()
    calibration = {"calibration": "default", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                   "progress": False}
    for mask_spec in args.masks.split(","):
        pruned = None
        for config in args.configs.split(","):
            if (mask_spec, config) in done:
                continue
            method, params, variant = CONFIGS[config]
            lora = {"variant": variant or "mask", "rank": args.rank}
            started = time.perf_counter()
            if method == "reconstruct":
                handle = copy.deepcopy(dense)
                per_block = max(1, tokens // (8 * args.seqlen))  # prune batches hold 8 windows
                sf.prune(handle, **parse_mask(mask_spec), **calibration,
                         reconstruct={"params": params, "lora": lora, "steps": per_block, "lr": args.lr_reconstruct})
                record = handle.history[-1]["reconstruction"]
                trainable = max(b["trainable"] for b in record["blocks"]) / sum(
                    p.numel() for p in dense.model.parameters())
                peak = max(b["peak_memory_mb"] for b in record["blocks"])
                extra = {"mse_before_sum": record["mse_before_sum"], "mse_after_sum": record["mse_after_sum"],
                         "steps_per_block": per_block, "note": "trainable fraction: the largest block's"}
            else:
                if pruned is None:
                    pruned = copy.deepcopy(dense)
                    sf.prune(pruned, **parse_mask(mask_spec), **calibration)
                    started = time.perf_counter()
                handle = copy.deepcopy(pruned)
                trainable, peak, extra = 0.0, None, {}
                if method is not None:
                    retrain(handle, method=method, params=params or ("norm",), lora=lora, steps=args.steps,
                            batch=args.batch, seqlen=args.seqlen, seed=args.seed,
                            lr=args.lr_full if method == "full" else args.lr_perp, progress=False)
                    record = handle.history[-1]
                    trainable = record["trainable"]["fraction"]
                    peak = record["training"]["peak_memory_mb"]
                    extra = {"loss_first": record["training"]["loss_first"],
                             "loss_last": record["training"]["loss_last"],
                             "sparsity_preserved": record["sparsity_preserved"], "stopped": record["training"]["stopped"]}
            seconds = time.perf_counter() - started
            row = {"mask": mask_spec, "config": config, **measure(handle), "trainable_fraction": trainable,
                   "seconds": round(seconds, 1), "peak_memory_mb": peak, **extra}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
            del handle


def write_table(out: Path, setup: dict, rows: list[dict]) -> None:
    dense = next((r for r in rows if r["mask"] == "dense"), None)
    unpruned = {r["mask"]: r["perplexity"] for r in rows if r["config"] == "none"}
    full = {r["mask"]: r for r in rows if r["config"] == "full"}
    body = []
    for r in rows:
        gap = unpruned.get(r["mask"], float("nan")) - dense["perplexity"] if dense else float("nan")
        closed = (unpruned.get(r["mask"], float("nan")) - r["perplexity"]) / gap if gap and gap > 0 else None
        full_row = full.get(r["mask"])
        full_closed = (unpruned[r["mask"]] - full_row["perplexity"]) / gap if full_row and gap and gap > 0 else None
        vs_full = closed / full_closed if closed is not None and full_closed else None
        memory = r["peak_memory_mb"] / full_row["peak_memory_mb"] if full_row and r["peak_memory_mb"] and \
            full_row["peak_memory_mb"] else None
        body.append([r["mask"], r["config"], f"{r['perplexity']:.2f}",
                     "–" if closed is None else f"{closed:.0%}", "–" if vs_full is None else f"{vs_full:.0%}",
                     "–" if r["zero_shot_avg"] is None else f"{r['zero_shot_avg']:.3f}",
                     f"{r['sparsity']:.1%}", f"{r['trainable_fraction']:.3%}", f"{r['seconds']:.0f}",
                     "–" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}",
                     "–" if memory is None else f"{memory:.2f}"])
    header = ["mask", "recovery", "perplexity", "gap closed", "of full's closure", "zero-shot avg", "sparsity",
              "trainable", "seconds", "peak MB (training)", "memory / full"]
    text = ["# Recovery after pruning", "", "Setup: `" + json.dumps(setup) + "`", "",
            "Gap closed = (pruned ppl - recovered ppl) / (pruned ppl - dense ppl). Seconds: training (or pruning "
            "with reconstruction) only. Peak MB: resident memory while training, model included.", "",
            markdown_table(header, body), ""]
    (out / "results.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
