"""Activation sparsity (TEAL) on the default model: quality against FFN skipping at equal ideal decode speed-up.

For every allocation (uniform, greedy, searched) and model-wide target: thresholds calibrated on the default calibration
text (one set of site statistics; one greedy walk serves every target and the search, whose fitness is the KL
divergence from the dense model on 2 calibration windows, 20 EvoPress generations), then, with the thresholds active:
perplexity (8 x 512 tokens of the default evaluation text, as ``ffnskip.py``), LAMBADA (first 200, accuracy),
TriviaQA and NQ-open (first 100 each, greedy; exact match and agreement with the dense model's answers), the
sparsity each part realised, and the ideal decode speed-up from the multiply-accumulates of the skipped weight
columns at the realised per-site sparsity (attention over the context and the LM head counted, as for FFN
skipping; the threshold comparisons are not counted: one compare per input entry against the entry's row of
weights). FFN skipping's cells are read from ``results/ffnskip/results.json`` (same evaluation text, same tasks)
and interpolated at each cell's ideal speed-up. Cells are cached in ``results.json``; an interrupted run resumes.

    .venv/bin/python bench/activation_sparsity.py
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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--targets", default="0.25,0.4,0.5")
    parser.add_argument("--allocations", default="uniform,greedy,searched")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--greedy-windows", type=int, default=4)
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--generations", type=int, default=20, help="searched allocation: EvoPress generations")
    parser.add_argument("--qa", default="triviaqa,nq_open")
    parser.add_argument("--qa-limit", type=int, default=100)
    parser.add_argument("--lambada-limit", type=int, default=200)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--context", type=float, default=128 + 65 / 2,
                        help="context of the ideal decode speed-up (ffnskip.py's: 128-token prompt, 64 new)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "activation_sparsity"))
    return parser.parse_args()


def ideal_decode(adapter, realised: list[dict[str, float]], weights: list[dict[str, int]], context: float) -> float:
    from sparseforge.evaluation.macs import macs_per_token

    dense = macs_per_token(adapter, context)
    saved = sum(value * weights[b][site] for b, block in enumerate(realised) for site, value in block.items())
    return dense / (dense - saved)


def measure(handle, args, windows, corpus, reference=None) -> dict:
    from sparseforge.evaluation.suite import evaluate

    attachment = handle.attachment("activation_sparsity")
    cell = {}
    parts = (("perplexity", dict(windows=windows, corpus=corpus)),
             ("lambada", dict(tasks=["lambada_openai"], limit=args.lambada_limit)),
             ("qa", dict(qa=args.qa.split(","), limit=args.qa_limit, reference=reference)))
    for part, options in parts:
        if attachment is not None:
            attachment.counter.reset()
        metrics = evaluate(handle, progress=False, **options)
        if part == "perplexity":
            cell["perplexity"] = metrics["perplexity"]["perplexity"]
        elif part == "lambada":
            cell["lambada_acc"] = metrics["zero_shot"]["lambada_openai"]["metrics"]["acc"]
        else:
            for task, entry in metrics["qa"].items():
                cell[f"{task}_em"] = entry["metrics"]["exact_match"]
                cell[f"{task}_agreement"] = entry["metrics"].get("agreement_with_reference")
            cell["reference"] = {"qa": metrics["qa"]}
        if attachment is not None:
            cell[f"realised_{part}"] = attachment.summary()
    return cell


def skip_curve(path: Path) -> list[tuple[float, float]]:
    """(ideal decode speed-up, perplexity) of FFN skipping's adaptive cells, by speed-up."""
    if not path.exists():
        return []
    cells = json.loads(path.read_text())["cells"]
    return sorted((c["speed"]["ideal_decode"], c["perplexity"]) for name, c in cells.items()
                  if name.startswith("adaptive") and "perplexity" in c)


def interpolate(curve: list[tuple[float, float]], speedup: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= speedup <= x1:
            return y0 + (y1 - y0) * (speedup - x0) / (x1 - x0)
    return None


def main() -> None:
    import torch

    args = arguments()
    torch.set_num_threads(args.threads)
    import sparseforge as sf
    from sparseforge.calibration.data import calibration_data
    from sparseforge.evaluation.suite import prepare_evaluation
    from sparseforge.teal.allocation import allocation_from_paths
    from sparseforge.teal.calibrate import greedy_paths, site_statistics
    from sparseforge.teal.runtime import install_thresholds
    from sparseforge.teal.search import search_levels, searched_allocation

    out = Path(args.out)
    results, save = cached_results(out)
    results["setup"] = print_setup(bench="activation_sparsity", model=args.model, targets=args.targets,
                                   allocations=args.allocations, calibration={"nsamples": args.nsamples,
                                   "seqlen": args.seqlen, "greedy_windows": args.greedy_windows, "step": args.step},
                                   qa=args.qa, qa_limit=args.qa_limit, lambada_limit=args.lambada_limit,
                                   perplexity={"windows": args.ppl_windows, "seqlen": 512}, context=args.context,
                                   threads=args.threads, seed=args.seed)
    cells = results.setdefault("cells", {})
    handle = sf.load_model(args.model)
    windows, corpus = prepare_evaluation(handle, "default", 512, args.ppl_windows)
    if "dense" not in cells:
        cells["dense"] = measure(handle, args, windows, corpus)
        save()
    reference = cells["dense"]["reference"]
    targets = [float(t) for t in args.targets.split(",")]
    calibration = calibration_data(handle, "default", args.nsamples, args.seqlen, args.seed)
    start = time.perf_counter()
    statistics = site_statistics(handle, calibration, seed=args.seed, progress=False)
    statistics_seconds = time.perf_counter() - start
    paths, greedy_seconds = None, 0.0
    for allocation in args.allocations.split(","):
        for target in targets:
            name = f"{allocation} {target:.2f}"
            if name in cells:
                continue
            if allocation != "uniform" and paths is None:  # one walk, far enough for every target and search
                start = time.perf_counter()
                reach = max(search_levels(t)[-1] for t in targets) if "searched" in args.allocations else max(targets)
                paths = greedy_paths(handle, statistics, calibration[:args.greedy_windows], reach, args.step,
                                     progress=False)
                greedy_seconds = time.perf_counter() - start
            search_seconds, history = 0.0, None
            if allocation == "uniform":
                thresholds = statistics.uniform(target)
            elif allocation == "greedy":
                thresholds = statistics.with_allocation(allocation_from_paths(paths, statistics.weights, target),
                                                        "greedy", target)
            else:
                start = time.perf_counter()
                chosen, history = searched_allocation(handle, statistics, paths, calibration[:2], target,
                                                      args.generations, seed=args.seed, progress=False)
                search_seconds = time.perf_counter() - start
                thresholds = statistics.with_allocation(chosen, "searched", target)
            install_thresholds(handle, thresholds)
            started = time.perf_counter()
            cell = measure(handle, args, windows, corpus, reference)
            cell.pop("reference")
            cell.update(allocated=thresholds.overall(), sparsity=thresholds.sparsity,
                        ideal_decode=ideal_decode(handle.adapter, cell["realised_perplexity"]["per_block"],
                                                  statistics.weights, args.context),
                        calibration_seconds=round(statistics_seconds + search_seconds
                                                  + (greedy_seconds if allocation != "uniform" else 0.0), 1),
                        search=history,
                        seconds=round(time.perf_counter() - started, 1))
            cells[name] = cell
            save()
            print(name, json.dumps({k: v for k, v in cell.items() if k not in ("sparsity", "search") and
                                    not k.startswith("realised")}), flush=True)
            handle.detach("activation_sparsity")
    write_tables(results, out)


def write_tables(results: dict, out: Path) -> None:
    from sparseforge.teal.plots import plot_quality_against_skipping

    cells = results["cells"]
    dense = cells["dense"]
    curve = skip_curve(HERE / "results" / "ffnskip" / "results.json")
    rows = [["dense", "-", "-", f"{dense['perplexity']:.2f}", f"{dense['lambada_acc']:.3f}", "1.00 / 1.00", "1.000",
             "-", "-"]]
    for name, cell in cells.items():
        if name == "dense":
            continue
        skip = interpolate(curve, cell["ideal_decode"])
        loss, skip_loss = cell["perplexity"] - dense["perplexity"], (skip - dense["perplexity"]) if skip else None
        rows.append([name, f"{cell['allocated']:.3f}", f"{cell['realised_perplexity']['overall']:.3f}",
                     f"{cell['perplexity']:.2f}", f"{cell['lambada_acc']:.3f}",
                     f"{cell['triviaqa_agreement']:.2f} / {cell['nq_open_agreement']:.2f}",
                     f"{cell['ideal_decode']:.3f}", f"{skip:.2f}" if skip else "beyond FFN skipping's range",
                     f"{loss / skip_loss:.4f}" if skip_loss else "-"])
    table = markdown_table(["cell", "allocated", "realised (perplexity text)", "perplexity", "LAMBADA acc",
                            "QA agreement (TriviaQA / NQ)", "ideal decode", "FFN skipping's perplexity there",
                            "perplexity loss vs FFN skipping's"], rows)
    (out / "results.md").write_text(table + "\n")
    plot_quality_against_skipping(cells, curve, out / "activation_sparsity.png")
    print(table)


if __name__ == "__main__":
    main()
