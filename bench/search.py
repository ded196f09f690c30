"""Per-block sparsity search on the default model: NSGA-II vs sub-network decomposition vs EvoPress, against
uniform and OWL allocations, all judged on held-out perplexity; and Ray (2 workers) vs serial on the same search.

Parts (each saved to ``results.json`` when done, so an interrupted run resumes with the next part):
  nsga2       whole-network NSGA-II front (KL to dense on calibration windows vs average sparsity)
  decompose   groups of consecutive blocks searched on their local reconstruction error, combined by global
              impairment (GPIR)
  evopress60, evopress70   budget-constrained search at 60% / 70% (level switches, multi-fidelity selection)
  ray         the same short NSGA-II serially and with 2 Ray workers: are the fronts identical, how long each
  nsga2_rerun the NSGA-II search again, alone on the machine: its wall time, and whether the front is identical
  heldout     held-out perplexity of every front point in [--lo, --hi], the uniform allocations, OWL and the
              EvoPress results; hypervolumes; the side-by-side tables and the plot

All candidates of one model share one variant bank (Wanda, every block pruned at every level on the dense
model's inputs), so every allocation is assembled the same way and only the allocation differs.

    .venv/bin/python bench/search.py               # all parts (about 45 min on 2 CPU cores)
    .venv/bin/python bench/search.py --render-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import cached_results, markdown_table, print_setup  # noqa: E402

PARTS = ("nsga2", "decompose", "evopress60", "evopress70", "ray", "heldout", "nsga2_rerun")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--levels", default="0.3:0.9:0.05")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows for the bank's statistics")
    parser.add_argument("--seqlen", type=int, default=512, help="their length")
    parser.add_argument("--windows", type=int, default=4, help="calibration windows scored by the KL objective")
    parser.add_argument("--search-seqlen", type=int, default=128)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--gpir-points", type=int, default=10)
    parser.add_argument("--evo-generations", type=int, default=20)
    parser.add_argument("--offspring", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out evaluation windows")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--lo", type=float, default=0.5, help="held-out assessment range of average sparsity")
    parser.add_argument("--hi", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sparseforge" / "search-bench"))
    parser.add_argument("--out", default=str(HERE / "results" / "search"))
    parser.add_argument("--render-only", action="store_true")
    return parser.parse_args()


def config_for(args, part: str, **overrides):
    from sparseforge.search import SearchConfig

    base = dict(method=args.method, levels=args.levels, windows=args.windows, seqlen=args.search_seqlen,
                population=args.population, generations=args.generations, groups=args.groups,
                group_generations=args.generations, gpir_points=args.gpir_points, offspring=args.offspring,
                stages=[[1, 4], [args.windows, 1]], cache_dir=args.cache_dir, seed=args.seed, reuse=False)
    if part == "nsga2":
        base.update(algorithm="nsga2", target=0.6)
    elif part == "decompose":
        base.update(algorithm="decompose", target=0.6)
    elif part.startswith("evopress"):
        base.update(algorithm="evopress", target=int(part[-2:]) / 100, generations=args.evo_generations)
    return SearchConfig(**(base | overrides))


def run_part(args, handle, part: str, results_so_far: dict) -> dict:
    from sparseforge.search import run_search

    if part == "ray":
        runs = {}
        for workers in (0, 2):
            config = config_for(args, "nsga2", population=8, generations=2, workers=workers, target=None)
            started = time.perf_counter()
            result, _, _ = run_search(handle, config, "default", args.nsamples, args.seqlen, args.seed, print, True)
            runs[workers] = {"front": result["front"], "seconds": round(time.perf_counter() - started, 1),
                             "evaluations": result["evaluations"]}
        return {"serial_seconds": runs[0]["seconds"], "ray_seconds": runs[2]["seconds"],
                "evaluations": runs[0]["evaluations"]["full_model_evaluations"],
                "identical": runs[0]["front"] == runs[2]["front"], "front_points": len(runs[0]["front"]),
                "ray_evaluation_seconds": runs[2]["evaluations"]["seconds"],
                "serial_evaluation_seconds": runs[0]["evaluations"]["seconds"]}
    if part == "nsga2_rerun":
        result, _, _ = run_search(handle, config_for(args, "nsga2"), "default", args.nsamples, args.seqlen, args.seed,
                                  print, True)
        return {"seconds": result["seconds"], "evaluation_seconds": result["evaluations"]["seconds"],
                "identical_front": result["front"] == results_so_far["nsga2"]["front"]}
    result, _, _ = run_search(handle, config_for(args, part), "default", args.nsamples, args.seqlen, args.seed,
                              print, True)
    return result


def assess(args, handle, results: dict, save) -> None:
    """Held-out perplexity of every allocation worth comparing, memoised in results['heldout']."""
    from tqdm.auto import tqdm

    from sparseforge.evaluation.suite import prepare_evaluation
    from sparseforge.search.api import prepare

    windows, corpus = prepare_evaluation(handle, "default", args.eval_seqlen, args.eval_windows)
    _, _, meter = prepare(handle, config_for(args, "nsga2"), "default", args.nsamples, args.seqlen, args.seed, print,
                          False)  # the searches' bank: cached, nothing recomputed
    held = results.setdefault("heldout", {"corpus": corpus, "windows": list(windows.shape), "values": {}})
    todo = allocations(args, results)
    for key, sparsities in tqdm(todo.items(), desc="held-out perplexity", unit="model"):
        if key in held["values"]:
            continue
        measured = meter.perplexity(sparsities, windows)
        held["values"][key] = {"perplexity": measured["perplexity"], "nll": measured["nll"]}
        save()


def _key(sparsities) -> str:
    return ",".join(f"{s:.4f}" for s in sparsities)


def allocations(args, results: dict) -> dict[str, list[float]]:
    cells = results["cells"]
    chosen: dict[str, list[float]] = {}
    for part in ("nsga2", "decompose"):
        for point in cells.get(part, {}).get("front", []):
            if args.lo - 1e-9 <= point["average_sparsity"] <= args.hi + 1e-9:
                chosen[_key(point["sparsities"])] = point["sparsities"]
    for point in cells.get("nsga2", {}).get("uniform", []):
        if args.lo - 1e-9 <= point["average_sparsity"] <= args.hi + 1e-9:
            chosen[_key(point["sparsities"])] = point["sparsities"]
    for part in ("evopress60", "evopress70"):
        if part in cells:
            chosen[_key(cells[part]["front"][0]["sparsities"])] = cells[part]["front"][0]["sparsities"]
            chosen[_key(cells[part]["owl"]["sparsities"])] = cells[part]["owl"]["sparsities"]
    return chosen


def render(args, results: dict) -> str:
    from sparseforge.errors import SparseforgeError
    from sparseforge.search import hypervolume, non_dominated, pick_point
    from sparseforge.search.plots import plot_fronts

    cells = results["cells"]
    held = results.get("heldout", {}).get("values", {})
    lines = [f"# Per-block sparsity search on {args.model}", "", "setup: " + json.dumps(results.get("setup", {})), ""]

    def with_heldout(points):
        return [p | {"nll": held[_key(p["sparsities"])]["nll"], "perplexity": held[_key(p["sparsities"])]["perplexity"]}
                for p in points if _key(p["sparsities"]) in held]

    def wall(part: str) -> str:
        if part == "nsga2" and "nsga2_rerun" in cells:  # the first run shared the machine with other work
            return f"{cells['nsga2_rerun']['seconds'] / 60:.1f} min (rerun alone)"
        return f"{cells[part]['seconds'] / 60:.1f} min"

    lines += ["## Search cost", "", markdown_table(
        ["search", "full-model evaluations", "local (group) evaluations", "tokens scored (full model)", "wall time"],
        [[part, cells[part]["evaluations"]["full_model_evaluations"],
          cells[part]["evaluations"]["by_kind"].get("local", 0), cells[part]["evaluations"]["full_model_tokens"],
          wall(part)] for part in ("nsga2", "decompose", "evopress60", "evopress70") if part in cells]), "",
        "Wall time includes the bank (cached after the first search) and the uniform/OWL reference measurements.", ""]
    if "nsga2_rerun" in cells:
        lines += [f"NSGA-II run twice with the same seed: fronts identical: **{cells['nsga2_rerun']['identical_front']}**.",
                  ""]
    fronts = {}
    for part in ("nsga2", "decompose"):
        if part in cells:
            inside = [p for p in cells[part]["front"] if args.lo - 1e-9 <= p["average_sparsity"] <= args.hi + 1e-9]
            fronts[part] = non_dominated(with_heldout(inside), x="density", y="nll")
    if fronts and held:
        worst = max(p["nll"] for f in fronts.values() for p in f)
        reference = (1 - args.lo, worst + 0.1)
        lines += ["## Fronts on held-out data", "",
                  f"Hypervolume in (density, held-out NLL) over average sparsity [{args.lo}, {args.hi}], reference "
                  f"point ({reference[0]:.2f}, {reference[1]:.3f}); higher is better.", "",
                  markdown_table(["search", "points in range", "hypervolume", "full-model evaluations"],
                                 [[part, len(front), f"{hypervolume(front, reference, x='density', y='nll'):.5f}",
                                   cells[part]["evaluations"]["full_model_evaluations"]]
                                  for part, front in fronts.items()]), ""]
    rows = []
    for target in (0.6, 0.7):
        part = f"evopress{int(target * 100)}"
        if part not in cells:
            continue
        uniform = next((p for p in cells["nsga2"]["uniform"] if abs(p["average_sparsity"] - target) < 1e-6), None) \
            if "nsga2" in cells else None
        candidates = {"uniform": uniform, "OWL": cells[part]["owl"], "EvoPress": cells[part]["front"][0]}
        for search in ("nsga2", "decompose"):
            if search in cells:
                try:
                    candidates[f"{search} front, picked at {target:g}"] = pick_point(cells[search]["front"], target)
                except SparseforgeError:  # the front does not reach the target
                    candidates[f"{search} front, picked at {target:g}"] = None
        for name, point in candidates.items():
            if point is None:
                continue
            value = held.get(_key(point["sparsities"]), {})
            rows.append([f"{target:.0%}", name, f"{point['average_sparsity']:.4f}", f"{point['kl']:.4f}",
                         f"{value['perplexity']:.2f}" if value else "-"])
    if rows:
        lines += ["## Same average sparsity: searched vs uniform vs OWL", "",
                  markdown_table(["target", "allocation", "average sparsity", "KL on calibration", "held-out ppl"],
                                 rows), ""]
    if "ray" in cells:
        ray = cells["ray"]
        lines += ["## Ray (2 local workers) vs serial", "",
                  f"Short NSGA-II (population 8, 2 generations, {ray['evaluations']} full-model evaluations): fronts "
                  f"identical: **{ray['identical']}** ({ray['front_points']} points). Wall time serial "
                  f"{ray['serial_seconds']} s, Ray {ray['ray_seconds']} s (evaluation only: "
                  f"{ray['serial_evaluation_seconds']} s vs {ray['ray_evaluation_seconds']} s; Ray's includes its "
                  "workers' start, model load and dense references).", ""]
    if "nsga2" in cells:
        plot_fronts({part: cells[part]["front"] for part in ("nsga2", "decompose") if part in cells},
                    cells["nsga2"]["uniform"],
                    [cells[p]["owl"] for p in ("evopress60", "evopress70") if p in cells],
                    [cells[p]["front"][0] for p in ("evopress60", "evopress70") if p in cells],
                    Path(args.out) / "fronts_calibration_kl.png", f"{args.model}: search objective (calibration)")
        if held:
            held_view = lambda pts: [p | {"kl": held[_key(p["sparsities"])]["perplexity"]} for p in pts  # noqa: E731
                                     if _key(p["sparsities"]) in held]
            plot_fronts({part: held_view(cells[part]["front"]) for part in ("nsga2", "decompose") if part in cells},
                        held_view(cells["nsga2"]["uniform"]),
                        held_view([cells[p]["owl"] for p in ("evopress60", "evopress70") if p in cells]),
                        held_view([cells[p]["front"][0] for p in ("evopress60", "evopress70") if p in cells]),
                        Path(args.out) / "fronts_heldout_ppl.png", f"{args.model}: held-out perplexity",
                        y_label="held-out perplexity", log_y=True)
        lines += ["![calibration KL](fronts_calibration_kl.png)", "![held-out perplexity](fronts_heldout_ppl.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()
    results, save = cached_results(args.out)
    if not args.render_only:
        import sparseforge as sf

        results["setup"] = print_setup(model=args.model, method=args.method, levels=args.levels,
                                       calibration=f"default, {args.nsamples} x {args.seqlen}",
                                       search_windows=f"{args.windows} x {args.search_seqlen} (seed+1)",
                                       heldout=f"default evaluation text, {args.eval_windows} x {args.eval_seqlen}",
                                       seed=args.seed, population=args.population, generations=args.generations,
                                       groups=args.groups, gpir_points=args.gpir_points,
                                       evo_generations=args.evo_generations, offspring=args.offspring)
        handle = sf.load_model(args.model)
        for part in args.parts.split(","):
            if part == "heldout":
                assess(args, handle, results, save)
            elif part not in results["cells"]:
                print(f"== {part}", flush=True)
                results["cells"][part] = run_part(args, handle, part, results["cells"])
                save()
    text = render(args, results)
    (Path(args.out) / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
