"""FactorLLM benchmark: dense FFNs factorized into routed experts, trained briefly, run with sparse dispatch.

For each expert configuration (``E x K``: E experts, top-K) and partition rule: factorize the default model, train
the routers with the Prior-Approximate loss and then the experts with the LM loss under one fixed budget, and
measure perplexity, zero-shot accuracy and TriviaQA exact match as a share of the dense model's, FFN
multiply-accumulates per token, and (once per configuration) prefill and decode speed against the dense model in
the same process, next to the ideal speed-up from the multiply-accumulates and to a statically shrunk model with
the same active FFN width (what the rest of the model allows at this size). At ``--compare-at`` the PA-trained
router is compared with an untrained (random) router and a router trained with the LM loss alone (straight-through
gate) at equal steps, and a shared-expert variant with the same compute is measured. Cells are appended to
``results.json`` as they finish, so an interrupted run resumes.

    .venv/bin/python bench/factorize.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import cached_results, markdown_table, print_setup  # noqa: E402


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--configs", default="4x1,4x2,8x2", help="experts x top-k")
    parser.add_argument("--partitions", default="contiguous,random,kmeans,coactivation")
    parser.add_argument("--compare-at", default="4x1:coactivation", help="router comparison and shared expert here")
    parser.add_argument("--router-steps", type=int, default=10)
    parser.add_argument("--expert-steps", type=int, default=10)
    parser.add_argument("--router-lr", type=float, default=3e-2)
    parser.add_argument("--expert-lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--tasks", default="arc_easy,piqa,winogrande")
    parser.add_argument("--limit", type=int, default=80, help="items per zero-shot task")
    parser.add_argument("--qa", default="triviaqa")
    parser.add_argument("--qa-limit", type=int, default=50)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--speed-prompt", type=int, default=128)
    parser.add_argument("--speed-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "factorize"))
    parser.add_argument("--render-only", action="store_true", help="rewrite results.md from results.json")
    return parser.parse_args()


def quality(handle, args, windows, corpus, reference=None) -> dict:
    from sparseforge.evaluation.suite import evaluate

    metrics = evaluate(handle, windows, corpus, tasks=args.tasks.split(","), qa=args.qa.split(",") if args.qa else [],
                       limit=args.limit, reference=reference, progress=False)
    accs = {task: entry["metrics"]["acc"] for task, entry in metrics["zero_shot"].items()}
    row = {"perplexity": metrics["perplexity"]["perplexity"], "zero_shot": accs,
           "zero_shot_avg": sum(accs.values()) / len(accs)}
    for task, entry in (metrics.get("qa") or {}).items():
        row[f"{task}_em"] = entry["metrics"]["exact_match"]
        row[f"{task}_agreement"] = entry["metrics"].get("agreement_with_reference")
    if "experts" in metrics:
        row["usage"] = metrics["experts"]
    return row, metrics


def speed(dense_model, handle, routing, args, prompt) -> dict:
    """Dense, routed, and a static model with the routed model's active FFN width, alternated in one process."""
    import torch
    from sparseforge.evaluation.speed import compare_speed
    from sparseforge.models.handle import LoadedModel
    from sparseforge.models.surgery import keep_ffn_neurons
    from sparseforge.moe.cost import ideal_expert_speedups

    layout = routing.layout
    active = layout.shared + routing.settings.topk * layout.size
    static = LoadedModel(copy.deepcopy(dense_model), None, "static")
    for layer in range(static.adapter.num_blocks):
        keep_ffn_neurons(static.adapter, layer, torch.arange(active))
    measured = compare_speed({"dense": dense_model, "routed": handle.model, "static": static.model},
                             new_tokens=args.speed_new_tokens, repeats=args.repeats, prompt_ids=prompt)
    results = measured["results"]
    ideal = ideal_expert_speedups(handle.adapter, routing, args.speed_prompt, args.speed_new_tokens)
    row = {"setup": measured["setup"], "ideal_prefill": ideal["prefill"], "ideal_decode": ideal["decode"]}
    for kind in ("prefill", "decode"):
        dense_rate = results["dense"][f"{kind}_tokens_per_s"]
        row[f"{kind}_speedup"] = results["routed"][f"{kind}_tokens_per_s"] / dense_rate
        row[f"{kind}_static_speedup"] = results["static"][f"{kind}_tokens_per_s"] / dense_rate
        row[f"{kind}_over_ideal"] = row[f"{kind}_speedup"] / ideal[kind]
        row[f"{kind}_over_static"] = row[f"{kind}_speedup"] / row[f"{kind}_static_speedup"]
    row["dense_decode_tokens_per_s"] = results["dense"]["decode_tokens_per_s"]
    return row


def cells_to_run(args) -> list[dict]:
    cells = []
    for config in args.configs.split(","):
        experts, topk = (int(x) for x in config.split("x"))
        for index, partition in enumerate(args.partitions.split(",")):
            cells.append({"name": f"{experts}E{topk}K {partition}", "experts": experts, "topk": topk,
                          "partition": partition, "router": "pa", "speed": index == 0})
    config, partition = args.compare_at.split(":")
    experts, topk = (int(x) for x in config.split("x"))
    base = {"experts": experts, "topk": topk, "partition": partition, "speed": False}
    cells += [{**base, "name": f"{experts}E{topk}K {partition}, random router", "router": "random"},
              {**base, "name": f"{experts}E{topk}K {partition}, LM-only router", "router": "lm"},
              {**base, "name": f"{experts}E({topk}+1 shared)K {partition}", "router": "pa", "shared": True,
               "speed": True}]
    return cells


def train_cell(handle, cell, args) -> None:
    from sparseforge.moe import factorize_model

    objective = {"pa": {}, "random": {}, "lm": {"pa_weight": 0.0, "balance_weight": 0.0, "lm_weight": 1.0,
                                                 "router_grad": "straight_through"}}[cell["router"]]
    factorize_model(handle, experts=cell["experts"], topk=cell["topk"], partition=cell["partition"],
                    shared_expert=cell.get("shared", False),
                    router_steps=0 if cell["router"] == "random" else args.router_steps,
                    expert_steps=args.expert_steps, router_lr=args.router_lr, expert_lr=args.expert_lr,
                    batch=args.batch, seqlen=args.seqlen, seed=args.seed, progress=False, **objective)


def main() -> None:
    import torch

    args = arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import sparseforge as sf
    from sparseforge.data.sources import load_corpus
    from sparseforge.data.windows import tokenize_corpus
    from sparseforge.evaluation.suite import prepare_evaluation
    from sparseforge.moe.plots import plot_expert_usage

    out = Path(args.out)
    results, save = cached_results(out)
    if args.render_only:
        (out / "results.md").write_text(render(results))
        return
    budget = {"router_steps": args.router_steps, "expert_steps": args.expert_steps, "router_lr": args.router_lr,
              "expert_lr": args.expert_lr, "batch": args.batch, "seqlen": args.seqlen,
              "train_tokens": (args.router_steps + args.expert_steps) * args.batch * args.seqlen}
    results["setup"] = print_setup(model=args.model, training=budget, tasks=args.tasks, limit=args.limit,
                                   qa=args.qa, qa_limit=args.qa_limit, qa_prompt="plain-5shot, greedy, batch 32",
                                   perplexity={"windows": args.ppl_windows, "seqlen": args.ppl_seqlen},
                                   speed={"prompt": args.speed_prompt, "new_tokens": args.speed_new_tokens,
                                          "repeats": args.repeats, "batch": 1}, seed=args.seed)
    cells = results["cells"]

    dense = sf.load_model(args.model)
    windows, corpus = prepare_evaluation(dense, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows)
    prompt = tokenize_corpus(dense.tokenizer, load_corpus("default", "evaluation"))[: args.speed_prompt][None]
    if "dense" not in cells:
        start = time.perf_counter()
        row, metrics = quality(dense, args, windows, corpus)
        cells["dense"] = {**row, "metrics_qa": metrics.get("qa"), "seconds": time.perf_counter() - start}
        save()
    reference = {"qa": cells["dense"]["metrics_qa"]}
    for cell in cells_to_run(args):
        if cell["name"] in cells:
            continue
        print(f"cell {cell['name']}", flush=True)
        start = time.perf_counter()
        handle = sf.load_model(args.model)
        train_cell(handle, cell, args)
        trained = time.perf_counter() - start
        row, _ = quality(handle, args, windows, corpus, reference)
        record = handle.history[-1]
        row.update(cell=cell, train_seconds=trained, losses=record["losses"], cost=record["cost"],
                   seconds=time.perf_counter() - start)
        if cell["speed"]:
            row["speed"] = speed(dense.model, handle, handle.experts, args, prompt)
        plot_expert_usage(row["usage"]["per_layer"], out / f"usage_{cell['name'].split(',')[0].replace(' ', '_')}"
                          f"{'_' + cell['router'] if cell['router'] != 'pa' else ''}.png", cell["name"])
        cells[cell["name"]] = row
        save()
        print(json.dumps({k: v for k, v in row.items() if k not in ("usage", "losses")}, default=str)[:600],
              flush=True)
    (out / "results.md").write_text(render(results))
    print(render(results))


# chance accuracy of each zero-shot task (ARC-Easy: nearly all items have 4 choices; PIQA, WinoGrande: 2)
CHANCE = {"arc_easy": 0.25, "piqa": 0.5, "winogrande": 0.5, "arc_challenge": 0.25, "hellaswag": 0.25,
          "boolq": 0.5, "openbookqa": 0.25}


def _pct(value, dense) -> str:
    return f"{100 * value / dense:.0f}%" if value is not None and dense else "–"


def informative_tasks(dense: dict, margin: float = 0.05) -> list[str]:
    """Tasks the dense model answers clearly above chance (at 135M WinoGrande is at chance: nothing to keep)."""
    return [t for t, acc in dense["zero_shot"].items() if acc - CHANCE[t] >= margin]


def above_chance(cell: dict, dense: dict) -> float:
    """Share of the dense model's margin over chance that the cell keeps, averaged over the informative tasks
    (0 = chance level, 1 = the dense model's accuracy): '% of dense accuracy' counts guessing as performance."""
    tasks = informative_tasks(dense)
    shares = [(cell["zero_shot"][t] - CHANCE[t]) / (dense["zero_shot"][t] - CHANCE[t]) for t in tasks]
    return sum(shares) / len(shares)


def render(results: dict) -> str:
    cells, setup = results["cells"], results["setup"]
    dense = cells["dense"]
    header = ["cell", "router", "train s", "perplexity", "zero-shot avg", "% of dense", "above-chance kept",
              "TriviaQA EM", "% of dense",
              "agreement", "FFN MMACs/token", "ideal decode", "decode", "decode / ideal", "static same width",
              "decode / static", "prefill", "ideal prefill", "balance"]
    rows = [["dense", "–", "–", f"{dense['perplexity']:.2f}", f"{dense['zero_shot_avg']:.3f}", "100%", "100%",
             f"{dense['triviaqa_em']:.2f}", "100%", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–"]]
    for name, cell in cells.items():
        if name == "dense":
            continue
        speed = cell.get("speed") or {}
        balance = [b for b in cell["usage"]["balance"] if b is not None]
        rows.append([name, cell["cell"]["router"], f"{cell['train_seconds']:.0f}", f"{cell['perplexity']:.1f}",
                     f"{cell['zero_shot_avg']:.3f}", _pct(cell["zero_shot_avg"], dense["zero_shot_avg"]),
                     f"{100 * above_chance(cell, dense):.0f}%",
                     f"{cell['triviaqa_em']:.2f}", _pct(cell["triviaqa_em"], dense["triviaqa_em"]),
                     f"{cell['triviaqa_agreement']:.2f}",
                     f"{cell['cost']['ffn_macs_per_token']['routed'] / 1e6:.1f} / "
                     f"{cell['cost']['ffn_macs_per_token']['dense'] / 1e6:.1f}",
                     f"{cell['cost']['decode']:.2f}" if not speed else f"{speed['ideal_decode']:.2f}",
                     f"{speed['decode_speedup']:.2f}" if speed else "–",
                     f"{speed['decode_over_ideal']:.2f}" if speed else "–",
                     f"{speed['decode_static_speedup']:.2f}" if speed else "–",
                     f"{speed['decode_over_static']:.2f}" if speed else "–",
                     f"{speed['prefill_speedup']:.2f}" if speed else "–",
                     f"{speed['ideal_prefill']:.2f}" if speed else f"{cell['cost']['prefill']:.2f}",
                     f"{sum(balance) / len(balance):.2f}"])
    return "\n".join(["# FactorLLM: factorized FFNs with sparse dispatch", "",
                      f"Setup: `{json.dumps(setup)}`", "",
                      "Zero-shot: mean accuracy over the tasks; 'above-chance kept': the share of the dense model's "
                      "margin over chance accuracy that is kept, averaged over the tasks where the dense model is at "
                      f"least 0.05 above chance ({', '.join(informative_tasks(dense))}); chance over all tasks is "
                      f"{sum(CHANCE[t] for t in dense['zero_shot']) / len(dense['zero_shot']):.3f} on average, "
                      f"{100 * sum(CHANCE[t] for t in dense['zero_shot']) / len(dense['zero_shot']) / dense['zero_shot_avg']:.0f}% "
                      "of dense, so '% of dense' alone flatters a broken model). TriviaQA: exact match and agreement with the dense "
                      "model's answers. Speed: batch 1, alternated with the dense model in one process; 'static same "
                      "width' is a model with every FFN cut to the routed model's active width (no router), the "
                      "speed the rest of the model allows. Balance: 1 = tokens spread evenly over experts.", "",
                      markdown_table(header, rows), ""])


if __name__ == "__main__":
    main()
