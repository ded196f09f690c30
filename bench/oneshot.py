"""One-shot pruning benchmark: magnitude / Wanda / SparseGPT, plain, +OWL and +DSnoT, against llm-compressor.

Every configuration runs in its own subprocess (ours: this script with ``--worker``; llm-compressor: its worker in
a separate virtual environment), so each peak RSS is that configuration's own. All of them use the same
calibration windows and the same evaluation windows, written once to safetensors files. Parts:

* ``compare``: ours vs llm-compressor, Wanda and SparseGPT at 50% unstructured and 2:4 (ratios side by side);
* ``grid``: every method x {plain, OWL, DSnoT} x {50%, 60%, 70%, 2:4, 4:8};
* ``dsnot``: the DSnoT choices the reference leaves open (refined linears, sign check), measured on Wanda;
* ``depth``: peak memory of pruning a random 4-block and 8-block model, to show it grows with one block only.

    ../.venv/bin/python oneshot.py --part compare --nsamples 64 --seqlen 512
    ../.venv/bin/python oneshot.py --part grid --nsamples 16
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


def worker(args: argparse.Namespace) -> dict:
    """Prune one configuration with sparseforge and print one JSON line (runs in its own process)."""
    import torch
    from safetensors.torch import load_file

    import sparseforge as sf
    from sparseforge.evaluation.perplexity import perplexity
    from sparseforge.memory import peak_resident_mb

    torch.set_num_threads(args.threads)
    config = json.loads(args.worker)
    if config.get("depth"):
        handle = _random_llama(config["depth"])
        calibration = torch.randint(0, 259, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    else:
        handle = sf.load_model(args.model)
        calibration = load_file(args.calibration)["input_ids"]
    model_mib = sum(p.numel() * p.element_size() for p in handle.model.parameters()) / 2**20
    rss_before = peak_resident_mb()
    start = time.perf_counter()
    if config["method"] != "dense":
        sf.prune(handle, method=config["method"], sparsity=config.get("sparsity"), pattern=config["pattern"],
                 allocation=config.get("allocation", "uniform"), refine=config.get("refine"), calibration=calibration,
                 order=config.get("order", "sublayer"), progress=False, **config.get("options", {}))
    seconds = time.perf_counter() - start
    result = {**config, "prune_seconds": round(seconds, 2), "peak_rss_mib": round(peak_resident_mb(), 1),
              "rss_before_prune_mib": round(rss_before, 1), "model_mib": round(model_mib, 1)}
    if not config.get("depth"):
        with torch.no_grad():
            result["perplexity"] = perplexity(handle.model, load_file(args.evaluation)["input_ids"],
                                              progress=False)["perplexity"]
        zeros = sum(int((~m).sum()) for m in handle.masks.values())
        result["achieved_sparsity"] = zeros / max(1, sum(m.numel() for m in handle.masks.values()))
        stage = handle.history[-1] if handle.history else {}
        result["events"] = len(stage.get("events", []))
    return result


def _random_llama(depth: int):
    """A seeded random LLaMA-style model, wide enough that one block's activations are visible in RSS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseforge.models.handle import LoadedModel
    from sparseforge.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=512, intermediate_size=1536, num_hidden_layers=depth,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return LoadedModel(LlamaForCausalLM(config).eval(), byte_tokenizer(), f"random-llama-{depth}-blocks")


def _run_ours(args, config: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config), "--model", args.model,
           "--calibration", str(args.calibration), "--evaluation", str(args.evaluation),
           "--threads", str(args.threads), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"worker failed for {config}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_llmcompressor(args, python: Path, model_dir: Path, method: str, pattern: str, sparsity) -> dict:
    sys.path.insert(0, str(HERE))
    from llmcompressor_env import run_worker

    worker_args = ["--model", model_dir, "--calibration", args.calibration, "--evaluation", args.evaluation,
                   "--method", method, "--pattern", pattern, "--threads", args.threads]
    if sparsity is not None:
        worker_args += ["--sparsity", sparsity]
    return run_worker(python, worker_args)


def _label(config: dict) -> str:
    amount = config["pattern"] if config["pattern"] != "unstructured" else f"{config['sparsity']:.0%}"
    extras = [x for x in (config.get("allocation") if config.get("allocation") != "uniform" else None,
                          config.get("refine")) if x]
    return f"{config['method']}{'+' + '+'.join(extras) if extras else ''} {amount}"


def _table(header, rows) -> str:
    sys.path.insert(0, str(HERE))
    from _common import markdown_table

    return markdown_table(header, rows)


def compare(args) -> list[str]:
    from llmcompressor_env import ensure_venv

    from sparseforge.models.default import default_model_dir

    python = Path(args.llmcompressor_python) if args.llmcompressor_python else ensure_venv(args.llmcompressor_venv)
    lines, rows = [], []
    dense = _run_ours(args, {"method": "dense", "pattern": "unstructured"})
    lines.append(f"dense perplexity: {dense['perplexity']:.3f}")
    for method in args.methods:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            if pattern not in args.patterns:
                continue
            config = {"method": method, "pattern": pattern, "sparsity": sparsity}
            ours = {order: _run_ours(args, {**config, "order": order}) for order in args.orders}
            theirs = _run_llmcompressor(args, python, default_model_dir(), method, pattern, sparsity)
            for order, result in ours.items():
                rows.append([_label(config), order, f"{result['perplexity']:.3f}", f"{theirs['perplexity']:.3f}",
                             f"{result['perplexity'] / theirs['perplexity']:.3f}",
                             f"{result['prune_seconds']:.1f}", f"{theirs['prune_seconds']:.1f}",
                             f"{result['prune_seconds'] / theirs['prune_seconds']:.2f}",
                             f"{result['peak_rss_mib']:.0f}", f"{theirs['peak_rss_mib']:.0f}",
                             f"{result['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}"])
            print(rows[-1], flush=True)
    lines.append(_table(["config", "our order", "ppl ours", "ppl llm-compressor", "ppl ratio", "prune s ours",
                         "prune s llm-compressor", "time ratio", "peak RSS MiB ours", "peak RSS MiB llm-compressor",
                         "RSS ratio"], rows))
    import transformers

    lines.append(f"llm-compressor: {theirs.get('llmcompressor_version')}, transformers "
                 f"{theirs.get('transformers_version')}; ours: transformers {transformers.__version__}")
    return lines


def _amounts(args) -> list[tuple[str, float | None]]:
    """'0.5' -> unstructured 50%, '2:4' -> that pattern."""
    return [(a, None) if ":" in a else ("unstructured", float(a)) for a in args.amounts]


def grid(args) -> list[str]:
    rows = []
    dense = _run_ours(args, {"method": "dense", "pattern": "unstructured"})
    rows.append(["dense", "-", f"{dense['perplexity']:.2f}", "-", "-", "-"])
    for pattern, sparsity in _amounts(args):
        for method in ("magnitude", "wanda", "sparsegpt"):
            variants = [{}, {"refine": "dsnot"}]
            if pattern == "unstructured":
                variants[1:1] = [{"allocation": "owl"}, {"allocation": "owl", "refine": "dsnot"}]
            for variant in variants:
                config = {"method": method, "pattern": pattern, "sparsity": sparsity, "order": args.orders[0],
                          **variant}
                result = _run_ours(args, config)
                rows.append([_label(config), args.orders[0], f"{result['perplexity']:.2f}",
                             f"{result['achieved_sparsity']:.3f}", f"{result['prune_seconds']:.1f}",
                             f"{result['peak_rss_mib']:.0f}"])
                print(rows[-1], flush=True)
    return [_table(["config", "order", "perplexity", "achieved sparsity", "prune s", "peak RSS MiB"], rows)]


def dsnot_choices(args) -> list[str]:
    """The two choices the DSnoT reference leaves ambiguous: which linears to refine, and the sign check."""
    rows = []
    for pattern, sparsity in _amounts(args):
        base = {"method": "wanda", "pattern": pattern, "sparsity": sparsity, "order": args.orders[0]}
        plain = _run_ours(args, base)
        rows.append([_label(base), "-", "-", f"{plain['perplexity']:.2f}", "-"])
        print(rows[-1], flush=True)
        for layers in ("all", "attention"):
            for sign_check in (False, True):
                options = {"dsnot": {"layers": layers, "sign_check": sign_check}}
                result = _run_ours(args, {**base, "refine": "dsnot", "options": options})
                rows.append([_label({**base, "refine": "dsnot"}), layers, sign_check, f"{result['perplexity']:.2f}",
                             f"{result['perplexity'] / plain['perplexity']:.3f}"])
                print(rows[-1], flush=True)
    return [_table(["config", "refined linears", "sign check", "perplexity", "vs plain Wanda"], rows)]


def depth(args) -> list[str]:
    rows = []
    for blocks in (4, 8):
        for order in args.orders:
            r = _run_ours(args, {"method": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5, "depth": blocks,
                                 "order": order})
            rows.append([blocks, order, f"{r['model_mib']:.0f}", f"{r['rss_before_prune_mib']:.0f}",
                         f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] - r['rss_before_prune_mib']:.0f}",
                         f"{r['prune_seconds']:.1f}"])
            print(rows[-1], flush=True)
    return [_table(["blocks", "order", "model MiB", "RSS before prune MiB", "peak RSS MiB", "added by pruning MiB",
                    "prune s"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["compare", "grid", "dsnot", "depth"], default="compare")
    parser.add_argument("--model", default="default")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--orders", nargs="+", default=["sublayer"], choices=["sublayer", "block"])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"],
                        help="compare: which methods")
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"], choices=["unstructured", "2:4"],
                        help="compare: 50%% unstructured and/or 2:4")
    parser.add_argument("--amounts", nargs="+", default=["0.5", "0.6", "0.7", "2:4", "4:8"],
                        help="grid and dsnot: unstructured sparsities and/or N:M patterns")
    parser.add_argument("--llmcompressor-venv", type=Path,
                        default=Path(os.environ.get("SPARSEFORGE_CACHE", "~/.cache/sparseforge")).expanduser()
                        / "llmcompressor-venv")
    parser.add_argument("--llmcompressor-python", default=None, help="use an existing venv's python instead")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evaluation", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(HERE))
    from _common import print_setup
    from safetensors.torch import save_file

    import sparseforge as sf
    from sparseforge.evaluation.suite import prepare_evaluation
    from sparseforge.calibration.data import calibration_data

    print_setup(bench="oneshot", part=args.part, model=args.model, calibration="default (calibration split)",
                nsamples=args.nsamples, seqlen=args.seqlen, evaluation="default (evaluation split)",
                eval_windows=args.eval_windows, seed=args.seed, orders=args.orders)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part != "depth":
            handle = sf.load_model(args.model)
            args.calibration = Path(tmp) / "calibration.safetensors"
            args.evaluation = Path(tmp) / "evaluation.safetensors"
            save_file({"input_ids": calibration_data(handle, "default", args.nsamples, args.seqlen, args.seed)},
                      str(args.calibration))
            windows, _ = prepare_evaluation(handle, "default", args.seqlen, args.eval_windows)
            save_file({"input_ids": windows.contiguous()}, str(args.evaluation))
            del handle
        lines = {"compare": compare, "grid": grid, "dsnot": dsnot_choices, "depth": depth}[args.part](args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
