"""High sparsity on the default model: allocation x solver, then the best with DSnoT and with PERP.

Every configuration runs in its own subprocess (this script with ``--worker``), on the same calibration and
evaluation windows, written once. Solvers: Wanda, SparseGPT, ADMM (Wanda's mask + ADMM weight update),
gradual ADMM and ALPS (`sparseforge.prune.admm`). Allocations: uniform, OWL, and a searched one (an EvoPress search
run of this script's own, its picked point re-pruned layer-sequentially by every solver through
``prune(block_sparsity=<search run>)``). Results are cached cell by cell in ``--out/results.json`` so an
interrupted run resumes.

    .venv/bin/python bench/high_sparsity.py --amounts 0.7 2:4 --nsamples 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOLVERS = ["wanda", "sparsegpt", "admm", "admm-gradual", "alps"]


def worker(args) -> dict:
    import torch
    from safetensors.torch import load_file

    import sparseforge as sf
    from sparseforge.evaluation.perplexity import perplexity

    torch.set_num_threads(args.threads)
    config = json.loads(args.worker)
    handle = sf.load_model(args.model)
    calibration = load_file(args.calibration)["input_ids"]
    amount = config["amount"]
    nm = ":" in amount
    options = dict(method=config["solver"], pattern=amount if nm else "unstructured",
                   sparsity=None if nm else float(amount), calibration=calibration, progress=False)
    if config["allocation"] == "searched":
        options["block_sparsity"] = config["search_run"]
    elif config["allocation"] != "uniform":
        options["allocation"] = config["allocation"]
    if config.get("refine"):
        options["refine"] = config["refine"]
    if config.get("reconstruct"):  # layer-wise reconstruction inside the pipeline (calibration data only)
        options["reconstruct"] = {"steps": config["reconstruct"]}
    start, cpu_start = time.perf_counter(), time.process_time()
    sf.prune(handle, **options)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    windows = load_file(args.evaluation)["input_ids"]
    with torch.no_grad():
        # CPU seconds (all threads) as well as wall time: the ratio between solvers survives a busy machine
        result = {**config, "prune_seconds": round(seconds, 1), "prune_cpu_seconds": round(cpu_seconds, 1),
                  "perplexity": perplexity(handle.model, windows, progress=False)["perplexity"]}
    if config.get("perp_steps"):
        start = time.perf_counter()
        sf.retrain(handle, method="perp", steps=config["perp_steps"], batch=4, seqlen=512, progress=False)
        result["perp_seconds"] = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            result["perplexity_perp"] = perplexity(handle.model, windows, progress=False)["perplexity"]
    zeros = sum(int((~m).sum()) for m in handle.masks.values())
    result["achieved_sparsity"] = zeros / sum(m.numel() for m in handle.masks.values())
    return result


def _run(args, config: dict, results: dict, save) -> dict:
    from _common import run_cell

    return run_cell(results, save, json.dumps(config, sort_keys=True), [
        sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config), "--model", args.model,
        "--calibration", str(args.calibration), "--evaluation", str(args.evaluation), "--threads", str(args.threads)])


def _search_run(args, amount: str) -> str:
    """An EvoPress search of this model at ``amount`` (a run directory that prune(block_sparsity=...) reads)."""
    run = args.out / f"search-{amount}"
    if not (run / "report.json").exists():
        cli = Path(sys.executable).with_name("sparseforge")
        subprocess.run([str(cli), "search", args.model, "--algorithm", "evopress", "--target", amount,
                        "--method", "wanda", "--nsamples", str(args.nsamples),
                        "--generations", str(args.search_generations), "--no-ppl", "--format", "dense",
                        "--out", str(run), "--overwrite"], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return str(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--amounts", nargs="+", default=["0.6", "0.7", "0.8", "2:4"])
    parser.add_argument("--solvers", nargs="+", default=SOLVERS)
    parser.add_argument("--allocations", nargs="+", default=["uniform", "owl", "searched"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--perp-steps", type=int, default=50)
    parser.add_argument("--reconstruct-steps", type=int, default=0,
                        help="also the best one-shot cell with layer-wise reconstruction (steps per block)")
    parser.add_argument("--search-generations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "high_sparsity")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evaluation", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(HERE))
    from _common import cached_results, markdown_table, print_setup
    from safetensors.torch import save_file

    import sparseforge as sf
    from sparseforge.calibration.data import calibration_data
    from sparseforge.evaluation.suite import prepare_evaluation

    print_setup(bench="high_sparsity", model=args.model, calibration="default", nsamples=args.nsamples,
                seqlen=args.seqlen, evaluation="default", eval_windows=args.eval_windows, seed=args.seed,
                perp_steps=args.perp_steps, search_generations=args.search_generations)
    results, save = cached_results(args.out)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        handle = sf.load_model(args.model)
        args.calibration, args.evaluation = Path(tmp) / "calibration.safetensors", Path(tmp) / "evaluation.safetensors"
        save_file({"input_ids": calibration_data(handle, "default", args.nsamples, args.seqlen, args.seed)},
                  str(args.calibration))
        windows, _ = prepare_evaluation(handle, "default", args.seqlen, args.eval_windows)
        save_file({"input_ids": windows.contiguous()}, str(args.evaluation))
        del handle
        for amount in args.amounts:
            allocations = ["uniform"] if ":" in amount else args.allocations
            cells = {}
            for allocation in allocations:
                extra = {"search_run": _search_run(args, amount)} if allocation == "searched" else {}
                for solver in args.solvers:
                    cells[(allocation, solver)] = _run(args, {"amount": amount, "allocation": allocation,
                                                              "solver": solver, **extra}, results, save)
            reference = cells[("uniform", "sparsegpt")]["perplexity"]
            best = min(cells, key=lambda k: cells[k]["perplexity"])
            config = {"amount": amount, "allocation": best[0], "solver": best[1],
                      **({"search_run": _search_run(args, amount)} if best[0] == "searched" else {})}
            dsnot = _run(args, {**config, "refine": "dsnot"}, results, save)
            reconstructed = _run(args, {**config, "reconstruct": args.reconstruct_steps}, results, save) \
                if args.reconstruct_steps else None
            perp = _run(args, {**config, "perp_steps": args.perp_steps}, results, save)
            rows = [[allocation, solver, f"{c['perplexity']:.2f}", f"{c['perplexity'] / reference:.3f}",
                     f"{c['prune_seconds']:.0f}", f"{c['prune_cpu_seconds']:.0f}",
                     f"{c['prune_cpu_seconds'] / cells[(allocation, 'sparsegpt')]['prune_cpu_seconds']:.2f}"
                     if (allocation, "sparsegpt") in cells else "-",
                     f"{c['achieved_sparsity']:.3f}"] for (allocation, solver), c in cells.items()]
            rows.append([f"{best[0]} + DSnoT", best[1], f"{dsnot['perplexity']:.2f}",
                         f"{dsnot['perplexity'] / reference:.3f}", f"{dsnot['prune_seconds']:.0f}",
                         f"{dsnot['prune_cpu_seconds']:.0f}", "-", f"{dsnot['achieved_sparsity']:.3f}"])
            if reconstructed is not None:
                rows.append([f"{best[0]} + reconstruction {args.reconstruct_steps} steps/block", best[1],
                             f"{reconstructed['perplexity']:.2f}",
                             f"{reconstructed['perplexity'] / reference:.3f}",
                             f"{reconstructed['prune_seconds']:.0f}", f"{reconstructed['prune_cpu_seconds']:.0f}", "-",
                             f"{reconstructed['achieved_sparsity']:.3f}"])
            rows.append([f"{best[0]} + PERP {args.perp_steps} steps", best[1], f"{perp['perplexity_perp']:.2f}",
                         f"{perp['perplexity_perp'] / reference:.3f}", f"{perp['prune_seconds']:.0f} + "
                         f"{perp['perp_seconds']:.0f}", f"{perp['prune_cpu_seconds']:.0f}", "-",
                         f"{perp['achieved_sparsity']:.3f}"])
            lines.append(f"### {amount}\n\n" + markdown_table(
                ["allocation", "solver", "perplexity", "vs uniform SparseGPT", "prune s (wall)", "prune CPU s",
                 "CPU time vs SparseGPT", "achieved sparsity"], rows))
            print(lines[-1], flush=True)
    text = "\n\n".join(lines)
    name = f"table-{'-'.join(args.amounts)}-{'-'.join(args.allocations)}-{'-'.join(args.solvers)}.md"
    (args.out / name.replace(":", "of")).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
