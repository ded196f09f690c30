"""Continual learning with dynamic sparse training (issue 9): the study's grid, baselines, plain DST vs dense.

Parts (all resumable; results in bench/results/continual/):
* grid: Split Fashion-MNIST (5 tasks x 2 classes, full 60k/10k), MLP 784-256-256-10 without biases,
  init {uniform, erk} x growth {random, unfired, gradient, momentum} x sparsity {80, 90, 95}% x seeds, plus a
  static random mask per task, fine-tuning, and a dense network per task.
* cifar: Split CIFAR-10 (5 x 2, 8k/2k from the bigbench CIFAR-10 set), small ResNet, a smaller grid: both inits x
  growth {random, gradient} at 90% sparsity, one seed, with the baselines (about 9 min per run with 2 workers).
* plain: 10-class Fashion-MNIST, MLP, dense vs SET / RigL / SNFS / static at 80% sparsity, seeds.
* newweights: the documented decision "new-task weights start at zero" against a fresh initialisation, at 90% and
  95% sparsity with gradient growth (both inits), same seeds as the grid.

    .venv/bin/python bench/continual.py [--parts grid,cifar,plain] [--seeds 3] [--workers 2] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, print_setup  # noqa: E402

from sparseforge.data.images import load_fashion_mnist  # noqa: E402
from sparseforge.dst.continual import ContinualConfig  # noqa: E402
from sparseforge.dst.grid import config_key, grid_configs, mean_std, read_results, run_grid, summarise  # noqa: E402
from sparseforge.dst.plots import plot_accuracy_matrix, plot_grid, plot_mask_overlap  # noqa: E402
from sparseforge.dst.train import SparseTrainConfig, train_sparse_classifier  # noqa: E402

OUT = Path(__file__).parent / "results" / "continual"
INITS = ["uniform", "erk"]
GROWTHS = ["random", "unfired", "gradient", "momentum"]
DENSITIES = [0.2, 0.1, 0.05]
PLAIN_METHODS = ["dense", "set", "rigl", "snfs", "static"]


def pct(value: tuple[float, float]) -> str:
    return f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"


def grid_table(rows: list[dict]) -> str:
    header = ["run", "sparsity", "seeds", "avg acc, task scoring (%)", "BWT task (pt)", "just learned, task (%)",
              "avg acc, all logits (%)", "BWT all (pt)", "s/run"]
    order = {"dense-per-task": 0, "finetune": 1, "static": 2, "dst": 3}
    rows = sorted(rows, key=lambda r: (order[r["strategy"]], -r["density"], r["init"], r["growth"]))
    return markdown_table(header, [[r["label"], f"{100 * (1 - r['density']):.0f}%", r["seeds"],
                                    pct(r["task_average_accuracy"]), pct(r["task_backward_transfer"]),
                                    pct(r["task_just_learned_accuracy"]), pct(r["all_average_accuracy"]), pct(r["all_backward_transfer"]),
                                    f"{r['seconds']:.0f}"] for r in rows])


def findings(rows: list[dict]) -> list[str]:
    """The study's claims checked on these numbers: ERK vs uniform per sparsity, DST vs static, vs fine-tuning."""
    lines = []
    by = {(r["strategy"], r["init"], r["growth"], r["density"]): r for r in rows}
    for density in sorted({r["density"] for r in rows if r["strategy"] == "dst"}, reverse=True):
        for scoring in ("task", "all"):
            key = f"{scoring}_average_accuracy"
            erk = [by[("dst", "erk", g, density)][key] for g in GROWTHS if ("dst", "erk", g, density) in by]
            uni = [by[("dst", "uniform", g, density)][key] for g in GROWTHS if ("dst", "uniform", g, density) in by]
            if erk and uni:
                best_erk, best_uni = max(erk), max(uni)
                mean_erk = sum(m for m, _ in erk) / len(erk)
                mean_uni = sum(m for m, _ in uni) / len(uni)
                spread = max(s for _, s in erk + uni)
                lines.append(f"sparsity {100 * (1 - density):.0f}%, {scoring} scoring: ERK mean over growth "
                             f"{100 * mean_erk:.2f}% vs uniform {100 * mean_uni:.2f}% (best {100 * best_erk[0]:.2f} vs "
                             f"{100 * best_uni[0]:.2f}; largest seed std {100 * spread:.2f} pt)")
        for init in INITS:
            static = by.get(("static", init, "-", density))
            dst = [by[("dst", init, g, density)] for g in GROWTHS if ("dst", init, g, density) in by]
            if static and dst:
                best = max(dst, key=lambda r: r["task_average_accuracy"][0])
                lines.append(f"sparsity {100 * (1 - density):.0f}%, {init}: best DST ({best['growth']}) "
                             f"{pct(best['task_average_accuracy'])} vs static mask {pct(static['task_average_accuracy'])}"
                             f" (task scoring)")
    return lines


def render_grid(name: str, results: list[dict], title: str) -> str:
    refused = [r for r in results if "refused" in r]
    results = [r for r in results if "refused" not in r]
    rows = summarise(results)
    plot_grid(rows, OUT / f"{name}_grid.png", title, "task")
    plot_grid(rows, OUT / f"{name}_grid_all_logits.png", title + " (all-logits scoring)", "all")
    example = next((r for r in results if r["config"]["strategy"] == "dst"), None)
    parts = [grid_table(rows), "", *[f"- {line}" for line in findings(rows)]]
    parts += [f"- refused before training: {ContinualConfig(**r['config']).label()}: {r['refused']}" for r in refused]
    if example:
        label = ContinualConfig(**example["config"]).label()
        plot_accuracy_matrix(example["accuracy"]["task"], OUT / f"{name}_accuracy_matrix.png",
                             f"{label}: accuracy matrix (task scoring)")
        plot_mask_overlap(example["overlap"], OUT / f"{name}_mask_overlap.png", f"{label}: task-mask overlap")
        parts += ["", f"Example run ({label}, seed {example['config']['seed']}): tasks' weights "
                  f"(active / new / shared) {[(t['active'], t['new'], t['shared']) for t in example['tasks']]}; "
                  f"share of the network used after all tasks {100 * example['used_fraction']:.1f}%."]
    finetune = [r for r in results if r["config"]["strategy"] == "finetune"]
    if finetune:
        parts += ["", "Fine-tuning accuracy matrix (task scoring, seed 0): " + json.dumps(
            [[round(100 * v, 1) for v in row] for row in finetune[0]["accuracy"]["task"]])]
    return "\n".join(parts)


def run_plain(seeds: list[int], epochs: int) -> list[dict]:
    path = OUT / "plain.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    have = {(d["config"]["method"], d["config"]["seed"], d["config"]["epochs"]) for d in done}
    dataset = load_fashion_mnist()
    with open(path, "a") as out:
        for seed in seeds:
            for method in PLAIN_METHODS:
                if (method, seed, epochs) in have:
                    continue
                result = train_sparse_classifier(dataset, SparseTrainConfig(method=method, density=0.2, epochs=epochs,
                                                                            seed=seed), progress=True)["result"]
                print(f"plain {method} seed {seed}: {100 * result['accuracy']:.2f}% in {result['seconds']:.0f} s")
                out.write(json.dumps(result) + "\n")
                out.flush()
                done.append(result)
    return [d for d in done if d["config"]["epochs"] == epochs and d["config"]["seed"] in seeds]


def render_plain(results: list[dict]) -> str:
    accuracy = {m: mean_std([r["accuracy"] for r in results if r["config"]["method"] == m]) for m in PLAIN_METHODS}
    dense = accuracy["dense"][0]
    rows = [[m, f"{100 * (1 - (0.2 if m != 'dense' else 1.0)):.0f}%", pct(accuracy[m]),
             f"{100 * (accuracy[m][0] - dense):+.2f}",
             f"{sum(r['seconds'] for r in results if r['config']['method'] == m) / max(1, sum(1 for r in results if r['config']['method'] == m)):.0f}"]
            for m in PLAIN_METHODS]
    return markdown_table(["method", "sparsity", "test accuracy (%)", "vs dense (pt)", "s/run"], rows)


def wall_time(timings: dict, part: str) -> str:
    """The part's wall time as recorded when it ran (a render-only invocation reads timings.json)."""
    if part not in timings or timings[part] < 1:
        recorded = json.loads((OUT / "timings.json").read_text()) if (OUT / "timings.json").exists() else {}
        if part not in recorded:
            return "wall time not recorded"
        timings[part] = recorded[part]
    return f"wall time {timings[part] / 60:.1f} min"


def render_new_weights(results: list[dict], configs: list[ContinualConfig]) -> str:
    wanted = {config_key(c) for c in configs}
    chosen = [r for r in results if "refused" not in r and config_key(ContinualConfig(**r["config"])) in wanted]
    groups: dict[tuple, list[dict]] = {}
    for result in chosen:
        c = result["config"]
        groups.setdefault((c["density"], c["init"], c["new_weights"]), []).append(result)
    rows = []
    for (density, init, new_weights), members in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
        task = mean_std([m["metrics"]["task"]["average_accuracy"] for m in members])
        every = mean_std([m["metrics"]["all"]["average_accuracy"] for m in members])
        rows.append([f"{100 * (1 - density):.0f}%", init, new_weights, len(members), pct(task), pct(every)])
    return markdown_table(["sparsity", "init", "new weights", "seeds", "avg acc, task scoring (%)",
                           "avg acc, all logits (%)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="grid,plain,cifar,newweights")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task (grid)")
    parser.add_argument("--cifar-epochs", type=int, default=5)
    parser.add_argument("--plain-epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    parts = args.parts.split(",")
    seeds = list(range(args.seeds))
    OUT.mkdir(parents=True, exist_ok=True)
    setup = print_setup(seeds=seeds, epochs_per_task=args.epochs, cifar_epochs=args.cifar_epochs,
                        plain_epochs=args.plain_epochs, workers=args.workers, batch=64, lr=1e-3, delta_t=50,
                        drop_fraction="0.5 -> 0.005 cosine", new_weights="zero")
    sections = [f"# Continual learning with dynamic sparse training\n\nSetup: `{json.dumps(setup)}`\n"]
    timings = {}
    if "grid" in parts:
        base = ContinualConfig(backbone="mlp", epochs=args.epochs)
        configs = grid_configs(base, INITS, GROWTHS, DENSITIES, seeds)
        started = time.perf_counter()
        results = list(read_results(OUT / "grid.jsonl").values()) if args.render_only else \
            run_grid("split-fashion-mnist", configs, OUT / "grid.jsonl", workers=args.workers)
        timings["grid"] = time.perf_counter() - started
        sections.append(f"## Split Fashion-MNIST, MLP ({len(results)} runs; {wall_time(timings, 'grid')})\n\n"
                        + render_grid("fmnist", results, "Split Fashion-MNIST, MLP"))
    if "plain" in parts:
        started = time.perf_counter()
        results = run_plain(seeds, args.plain_epochs)
        timings["plain"] = time.perf_counter() - started
        sections.append(f"## Plain DST vs dense: 10-class Fashion-MNIST, MLP, {args.plain_epochs} epochs\n\n"
                        + render_plain(results))
    if "cifar" in parts:
        base = ContinualConfig(backbone="resnet", epochs=args.cifar_epochs)
        configs = grid_configs(base, INITS, ["random", "gradient"], [0.1], seeds[:1])
        started = time.perf_counter()
        results = list(read_results(OUT / "cifar.jsonl").values()) if args.render_only else \
            run_grid("split-cifar10", configs, OUT / "cifar.jsonl", workers=args.workers)
        timings["cifar"] = time.perf_counter() - started
        sections.append(f"## Split CIFAR-10, small ResNet ({len(results)} runs, seed 0; {wall_time(timings, 'cifar')})"
                        f"\n\n"
                        + render_grid("cifar10", results, "Split CIFAR-10, ResNet"))
    if "newweights" in parts:
        base = ContinualConfig(backbone="mlp", epochs=args.epochs, growth="gradient")
        configs = [replace(c, new_weights=w) for w in ("zero", "init")
                   for c in grid_configs(base, INITS, ["gradient"], [0.1, 0.05], seeds, baselines=False)]
        started = time.perf_counter()
        # the "zero" runs are the grid's own cells (same settings), so only the "init" runs are new
        results = list(read_results(OUT / "grid.jsonl").values()) + (
            list(read_results(OUT / "newweights.jsonl").values()) if args.render_only else
            run_grid("split-fashion-mnist", [c for c in configs if c.new_weights == "init"],
                     OUT / "newweights.jsonl", workers=args.workers))
        timings["newweights"] = time.perf_counter() - started
        sections.append("## New-task weights: zero (reference) vs fresh initialisation, Split Fashion-MNIST "
                        f"({wall_time(timings, 'newweights')} for the 12 'init' runs)\n\n"
                        + render_new_weights(results, configs))
    if not args.render_only:
        recorded = json.loads((OUT / "timings.json").read_text()) if (OUT / "timings.json").exists() else {}
        (OUT / "timings.json").write_text(json.dumps({**recorded, **{k: round(v) for k, v in timings.items()}}))
    (OUT / "results.md").write_text("\n\n".join(sections) + "\n")
    print("\n\n".join(sections))
    print("timings (s): " + json.dumps({k: round(v) for k, v in timings.items()}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
