"""Structured benchmark: physically smaller models, their quality, and measured vs ideal speed-ups, side by side.

Cells: FFN width -25% / -50%, heads -25%, FinerCut 12.5% / 25% of sub-layers, whole-block removal at the same
removed-parameter budget as each FinerCut cell, and PERP (norms + LoRA) after FFN -25%. For every cell: parameters,
perplexity, zero-shot accuracy (``--limit``ed), the export's reload path and whether it reproduces the logits, and
prefill/decode speed at batch 1 and 8 measured alternately with the dense model in the same process, next to the
ideal speed-up from the removed multiply-accumulates (LM head and attention over the context included). Rows are
appended to ``results.json`` as they finish, so an interrupted run resumes.

    .venv/bin/python bench/structured.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import markdown_table, print_setup  # noqa: E402

CELLS = {
    "dense": {},
    "ffn -25%": {"shrink": {"ffn": 0.25}},
    "ffn -50%": {"shrink": {"ffn": 0.5}},
    "heads -25%": {"shrink": {"heads": 0.25}},
    "finercut 12.5%": {"finercut": 0.125},
    "finercut 25%": {"finercut": 0.25},
    "blocks @ finercut 12.5%": {"blocks_like": "finercut 12.5%"},
    "blocks @ finercut 25%": {"blocks_like": "finercut 25%"},
    "ffn -25% + PERP": {"shrink": {"ffn": 0.25}, "perp": True},
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--score", default="fluctuation")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows for width importance")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length for width importance")
    parser.add_argument("--fc-nsamples", type=int, default=4, help="FinerCut calibration windows (paper: 10)")
    parser.add_argument("--fc-seqlen", type=int, default=128, help="FinerCut calibration length (paper: 256)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--prompt", type=int, default=128, help="speed: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="speed: decoded tokens")
    parser.add_argument("--repeats", type=int, default=5, help="speed: repeats (median)")
    parser.add_argument("--perp-steps", type=int, default=12)
    parser.add_argument("--perp-batch", type=int, default=4)
    parser.add_argument("--perp-seqlen", type=int, default=256)
    parser.add_argument("--perp-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "structured"))
    return parser.parse_args()


def quality(handle, args) -> dict:
    from sparseforge.evaluation.suite import evaluate, prepare_evaluation

    windows, corpus = prepare_evaluation(handle, "default", args.eval_seqlen, args.eval_windows)
    tasks = args.tasks.split(",") if args.tasks else []
    metrics = evaluate(handle, windows, corpus, progress=False, tasks=tasks, limit=args.limit)
    accs = {t: m["metrics"]["acc"] for t, m in (metrics.get("zero_shot") or {}).items()}
    return {"parameters": metrics["parameters"]["total"], "perplexity": metrics["perplexity"]["perplexity"],
            "zero_shot": accs, "zero_shot_avg": sum(accs.values()) / len(accs) if accs else None}


def reload_check(handle) -> dict:
    """Export, reload the way a user would (plain transformers when the shapes allow), compare logits."""
    import torch
    from transformers import AutoModelForCausalLM

    import sparseforge as sf

    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="structured-") as scratch, torch.no_grad():
        sf.save_model(handle, Path(scratch) / "m", format="dense")
        loadable = handle.history[-1].get("transformers_loadable", True) if handle.history else True
        if loadable:
            reloaded, via = AutoModelForCausalLM.from_pretrained(Path(scratch) / "m"), "transformers from_pretrained"
        else:
            reloaded, via = sf.load_model(str(Path(scratch) / "m")).model, "sparseforge.load_model"
        exact = torch.equal(reloaded(input_ids=ids).logits, handle.model(input_ids=ids).logits)
    return {"loads_with": via, "reload_exact": exact}


def build(name: str, args, rows: list[dict]):
    import sparseforge as sf

    cell = CELLS[name]
    handle = sf.load_model(args.model)
    started = time.perf_counter()
    extra: dict = {}
    if "shrink" in cell:
        sf.shrink(handle, **cell["shrink"], score=args.score, nsamples=args.nsamples, seqlen=args.seqlen,
                  seed=args.seed, progress=False)
        blocks = handle.history[-1]["blocks"]
        extra["kept"] = {"ffn": blocks[0]["ffn"], "heads": blocks[0]["heads"], "kv_heads": blocks[0]["kv_heads"]}
    if "finercut" in cell:
        sf.finercut(handle, remove=cell["finercut"], nsamples=args.fc_nsamples, seqlen=args.fc_seqlen,
                    seed=args.seed, checkpoint_dir=Path(args.out) / "finercut_search", progress=False)
        extra["removed"] = [f"{r['kind']}@{r['block']}" for r in handle.history[-1]["removed"]]
        extra["curve"] = [r["divergence"] for r in handle.history[-1]["removed"]]
    if "blocks_like" in cell:
        reference = next(r for r in rows if r["cell"] == cell["blocks_like"])
        budget = rows[0]["parameters"] - reference["parameters"]
        sf.remove_blocks(handle, parameters=budget, nsamples=args.fc_nsamples, seqlen=args.fc_seqlen,
                         seed=args.seed, progress=False)
        extra["removed"] = [f"block@{r['block']}" for r in handle.history[-1]["removed"]]
        extra["budget"] = budget
    seconds = time.perf_counter() - started
    if cell.get("perp"):
        sf.retrain(handle, method="perp", params=["norm", "lora"], lora={"variant": "mask", "rank": 16},
                   steps=args.perp_steps, batch=args.perp_batch, seqlen=args.perp_seqlen, lr=args.perp_lr,
                   seed=args.seed, progress=False)
        extra["perp"] = {"tokens": args.perp_steps * args.perp_batch * args.perp_seqlen,
                         "loss_first": handle.history[-1]["training"]["loss_first"],
                         "loss_last": handle.history[-1]["training"]["loss_last"]}
    return handle, {"seconds": round(seconds, 1), **extra}


def speed(dense, handle, args) -> dict:
    from sparseforge.evaluation.macs import ideal_speedups
    from sparseforge.evaluation.speed import compare_speed

    ideal = ideal_speedups(dense.adapter, handle.adapter, args.prompt, args.new_tokens)
    measured = {"ideal_prefill": ideal["prefill"], "ideal_decode": ideal["decode"]}
    for batch in (1, 8):
        result = compare_speed({"dense": dense.model, "variant": handle.model}, batch_size=batch,
                               prompt_len=args.prompt, new_tokens=args.new_tokens, repeats=args.repeats,
                               seed=args.seed)["results"]
        for phase in ("prefill", "decode"):
            key = f"{phase}_tokens_per_s"
            measured[f"{phase}_b{batch}"] = result["variant"][key] / result["dense"][key]
    return measured


def main() -> None:
    args = arguments()
    import torch

    import sparseforge as sf

    torch.set_num_threads(args.threads)
    setup = print_setup(model=args.model, data="default (calibration: training side; perplexity: evaluation side)",
                        score=args.score, width_calibration=f"{args.nsamples} x {args.seqlen}",
                        finercut_calibration=f"{args.fc_nsamples} x {args.fc_seqlen}, js divergence",
                        eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, tasks=args.tasks,
                        limit=args.limit, speed=f"prompt {args.prompt}, {args.new_tokens} new tokens, batch 1 and 8, "
                        f"median of {args.repeats}, alternating with dense in one process",
                        perp=f"norms + MaskLoRA r16, {args.perp_steps} x {args.perp_batch} x {args.perp_seqlen}, "
                        f"lr {args.perp_lr}", seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    dense = sf.load_model(args.model)
    for name in args.cells.split(","):
        if any(r["cell"] == name for r in rows):
            continue
        if name == "dense":
            row = {"cell": name, **quality(dense, args)}
        else:
            handle, extra = build(name, args, rows)
            row = {"cell": name, **quality(handle, args), **reload_check(handle), **speed(dense, handle, args),
                   **extra}
            if name == "finercut 25%":
                from sparseforge.structured.plots import plot_divergence, plot_structure

                record = next(h for h in handle.history if h["stage"] == "finercut")
                plot_structure(record["blocks"], record["original"], out / "finercut_25_structure.png",
                               "FinerCut 25% on the default model")
                plot_divergence(record["removed"], out / "finercut_25_divergence.png", "js")
            del handle
        rows.append(row)
        print(json.dumps(row), flush=True)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
        os.replace(tmp, results_path)
        write_table(out, setup, rows)


def write_table(out: Path, setup: dict, rows: list[dict]) -> None:
    dense = rows[0]
    body = []
    for r in rows:
        if r["cell"] == "dense":
            body.append(["dense", f"{r['parameters'] / 1e6:.1f}M", f"{r['perplexity']:.2f}",
                         f"{r['zero_shot_avg']:.3f}" if r["zero_shot_avg"] is not None else "–"] + ["–"] * 7)
            continue
        ratio = r["decode_b1"] / r["ideal_decode"]
        body.append([r["cell"], f"{r['parameters'] / 1e6:.1f}M ({1 - r['parameters'] / dense['parameters']:.1%} "
                     "removed)", f"{r['perplexity']:.2f}",
                     f"{r['zero_shot_avg']:.3f}" if r["zero_shot_avg"] is not None else "–",
                     f"{r['ideal_decode']:.3f}", f"{r['decode_b1']:.3f}", f"**{ratio:.2f}**", f"{r['decode_b8']:.3f}",
                     f"{r['ideal_prefill']:.3f}", f"{r['prefill_b1']:.3f} / {r['prefill_b8']:.3f}",
                     f"{r['loads_with']}{'' if r['reload_exact'] else ' (LOGITS DIFFER)'}"])
    table = markdown_table(["cell", "parameters", "perplexity", "zero-shot avg", "ideal decode", "decode b1",
                            "measured / ideal (b1)", "decode b8", "ideal prefill", "prefill b1 / b8", "export loads with"],
                           body)
    removed = [f"- {r['cell']}: {', '.join(r['removed'])}" for r in rows if r.get("removed")]
    text = ["# Structured pruning: size, quality and speed", "", "Setup: `" + json.dumps(setup) + "`", "",
            "Speed columns are ratios to the dense model measured alternately in the same process (> 1 = faster); "
            "ideal = dense MACs / shrunk MACs per token.", "", table, "", "Removed sub-layers, in order:", "",
            *removed, ""]
    (out / "results.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
