"""Pruning models larger than memory: streamed (out-of-core) pruning, memory against llm-compressor, scaling to 8B.

Parts (each configuration in its own subprocess, so every peak RSS is that run's own):

* ``compare``: the default model, the job of ``oneshot.py --part compare`` (Wanda and SparseGPT, 50% and 2:4, the
  same calibration windows), sparseforge streamed (``prune --streamed``, export included) vs llm-compressor (and,
  with ``--in-memory``, sparseforge's in-memory path): peak RSS, time, perplexity of the export.
* ``synthetic``: Llama-geometry models with random bf16 weights written to disk by this script (1B, 3B, 8B: the
  shapes of Llama-3.2-1B/3B and Llama-3.1-8B), pruned streamed with Wanda 50% on a small calibration set into a
  bf16 bitmask export: peak RSS, weights and activations resident, time per block; the export checked back.
* ``depth``: the 1B geometry cut to 4, 8 and 16 blocks: peak RSS against depth.
* ``llmcompressor-1b``: llm-compressor and sparseforge streamed on the 1B-geometry model, same windows.

    .venv/bin/python bench/scale.py --part synthetic depth --work /tmp/scale
    .venv/bin/python bench/scale.py --part compare --nsamples 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEOMETRIES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # for the projection only
}


def block_params(g: dict) -> int:
    head_dim = g["hidden_size"] // g["num_attention_heads"]
    kv = g["num_key_value_heads"] * head_dim
    return 2 * g["hidden_size"] ** 2 + 2 * g["hidden_size"] * kv + 3 * g["hidden_size"] * g["intermediate_size"] \
        + 2 * g["hidden_size"]


def write_synthetic(directory: Path, geometry: dict, layers: int | None = None, seed: int = 0) -> Path:
    """A Llama checkpoint with random bf16 weights (std 0.02), one shard per block plus one for the rest, an index,
    and the default model's tokenizer files; written one block at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from sparseforge.models.default import default_model_dir

    g = dict(geometry, **({"num_hidden_layers": layers} if layers else {}))
    if (directory / "model.safetensors.index.json").exists():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, **g)
    config.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, tmp / name)
    generator = torch.Generator().manual_seed(seed)
    h, inter = g["hidden_size"], g["intermediate_size"]
    kv = g["num_key_value_heads"] * (h // g["num_attention_heads"])
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp / name))
        weight_map.update({k: name for k in tensors})

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    outside = {"model.embed_tokens.weight": rand(g["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    if not g["tie_word_embeddings"]:
        outside["lm_head.weight"] = rand(g["vocab_size"], h)
    shard("outside.safetensors", outside)
    del outside
    for i in range(g["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shard(f"block-{i:03d}.safetensors", {
            f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
            f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
            f"{p}.mlp.gate_proj.weight": rand(inter, h), f"{p}.mlp.up_proj.weight": rand(inter, h),
            f"{p}.mlp.down_proj.weight": rand(h, inter),
            f"{p}.input_layernorm.weight": torch.ones(h), f"{p}.post_attention_layernorm.weight": torch.ones(h)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


# ---- workers (one configuration per process) -----------------------------------------------------------------
def worker(config: dict, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file

    import sparseforge as sf
    from sparseforge.memory import peak_resident_mb

    torch.set_num_threads(threads)
    calibration = load_file(config["calibration"])["input_ids"]
    options = dict(method=config["method"], pattern=config["pattern"], sparsity=config.get("sparsity"),
                   calibration=calibration, order=config.get("order", "sublayer"),
                   batch_size=config.get("batch_size", 8), progress=False)
    start = time.perf_counter()
    if config["kind"] == "streamed":
        report = sf.prune_streamed(config["model"], config["out"], format=config.get("format", "auto"),
                                   dtype=config.get("dtype"), overwrite=True, **options)
        result = {"memory": report["memory"], "export": report["export"], "blocks_seconds": report.get("seconds")}
    else:
        handle = sf.load_model(config["model"])
        sf.prune(handle, **options)
        result = {"memory": handle.history[-1]["memory"]}
    result.update(config, prune_seconds=round(time.perf_counter() - start, 2), peak_rss_mib=round(peak_resident_mb(), 1))
    if config.get("evaluation"):
        from sparseforge.evaluation.perplexity import perplexity

        model = sf.load_model(config["out"] + "/model") if config["kind"] == "streamed" else handle
        with torch.no_grad():
            result["perplexity"] = perplexity(model.model, load_file(config["evaluation"])["input_ids"],
                                              progress=False)["perplexity"]
    if config.get("check_export"):
        result["export_check"] = check_export(Path(config["out"]) / "model", config["model"])
    return result


def check_export(export: Path, source: str) -> dict:
    """The export read back tensor by tensor (a model larger than memory is never decoded whole): its checksum and
    manifest, every masked tensor decoded, its sparsity, and block 0's kept weights equal to the source's."""
    import torch
    from safetensors import safe_open

    from sparseforge.export.formats import ENCODINGS
    from sparseforge.export.saving import read_format, verify_weights
    from sparseforge.streaming.source import WeightSource

    description = read_format(export)
    weights = verify_weights(export, description)
    dtype = getattr(torch, description["dtype"])
    origin = WeightSource(source)
    kept = total = 0
    equal = True
    with safe_open(str(weights), framework="pt") as stored:
        names = list(stored.keys())
        for key, info in description["tensors"].items():
            parts = {n[len(key) + 1:]: stored.get_tensor(n) for n in names if n.startswith(key + ".")}
            weight, mask = ENCODINGS[info["encoding"]].decode(parts, tuple(info["shape"]), info, dtype)
            kept, total = kept + int(mask.sum()), total + mask.numel()
            if key.startswith("model.layers.0."):
                equal &= bool(torch.equal(weight[mask], origin.tensor(key).to(dtype)[mask]))
    return {"sha256_verified": True, "masked_tensors": len(description["tensors"]), "sparsity": 1 - kept / total,
            "block0_kept_weights_equal_source": equal}


def _run(config: dict, threads: int, results: dict, save) -> dict:
    from _common import run_cell

    key = json.dumps({k: v for k, v in config.items() if k not in ("calibration", "evaluation", "out")},
                     sort_keys=True)
    return run_cell(results, save, key, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                         json.dumps(config), "--threads", str(threads)])


def _llmcompressor(args, model_dir: Path, method: str, pattern: str, sparsity, results, save) -> dict:
    from llmcompressor_env import ensure_venv, run_worker

    key = json.dumps({"tool": "llm-compressor", "model": str(model_dir), "method": method, "pattern": pattern,
                      "sparsity": sparsity, "nsamples": args.nsamples, "seqlen": args.seqlen}, sort_keys=True)
    if key not in results["cells"]:
        python = ensure_venv(args.llmcompressor_venv)
        worker_args = ["--model", model_dir, "--calibration", args.calibration, "--evaluation", args.evaluation,
                       "--method", method, "--pattern", pattern, "--threads", args.threads]
        if sparsity is not None:
            worker_args += ["--sparsity", sparsity]
        results["cells"][key] = run_worker(python, worker_args)
        save()
        print(json.dumps(results["cells"][key]), flush=True)
    return results["cells"][key]


def _windows(args, vocab_model: str) -> None:
    """The calibration (and evaluation) windows every configuration of a part uses, written once."""
    import torch
    from safetensors.torch import save_file

    import sparseforge as sf
    from sparseforge.calibration.data import calibration_data
    from sparseforge.evaluation.suite import prepare_evaluation

    handle = sf.load_model(vocab_model)
    save_file({"input_ids": calibration_data(handle, "default", args.nsamples, args.seqlen, args.seed)},
              str(args.calibration))
    windows, _ = prepare_evaluation(handle, "default", args.seqlen, args.eval_windows)
    save_file({"input_ids": windows.contiguous()}, str(args.evaluation))
    del handle, torch


def compare(args, results, save) -> list[str]:
    from _common import markdown_table

    from sparseforge.models.default import default_model_dir

    _windows(args, "default")
    rows = []
    for method in args.methods:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            base = {"model": str(default_model_dir()), "method": method, "pattern": pattern, "sparsity": sparsity,
                    "calibration": str(args.calibration), "evaluation": str(args.evaluation),
                    "nsamples": args.nsamples, "seqlen": args.seqlen}
            theirs = _llmcompressor(args, default_model_dir(), method, pattern, sparsity, results, save)
            label = f"{method} {'50%' if sparsity else pattern}"
            for order in args.orders:
                for batch in args.batch_sizes:
                    ours = _run({**base, "kind": "streamed", "out": str(args.work / "compare-out"),
                                 **({"order": order} if order != "sublayer" else {}),
                                 **({"batch_size": batch} if batch != 8 else {})}, args.threads, results, save)
                    rows.append(_compare_row(label, f"streamed, {order} order, batch {batch}", ours, theirs))
            if args.in_memory:
                mem = _run({**base, "kind": "memory"}, args.threads, results, save)
                rows.append(_compare_row(label, "in memory, sublayer order, batch 8", mem, theirs))
    return [markdown_table(["config", "sparseforge path", "ppl ours", "ppl llm-compressor",
                            "s ours (blocks / all: reading and export included)", "s llm-compressor (oneshot)",
                            "time ratio (blocks / all)", "peak RSS MiB ours", "peak RSS MiB llm-compressor",
                            "RSS ratio", "weights resident MiB", "activations MiB"], rows)]


def _compare_row(label: str, path: str, ours: dict, theirs: dict) -> list:
    blocks = ours.get("blocks_seconds") or ours["prune_seconds"]
    return [label, path, f"{ours['perplexity']:.3f}", f"{theirs['perplexity']:.3f}",
            f"{blocks:.1f} / {ours['prune_seconds']:.1f}", f"{theirs['prune_seconds']:.1f}",
            f"{blocks / theirs['prune_seconds']:.2f} / {ours['prune_seconds'] / theirs['prune_seconds']:.2f}",
            f"{ours['peak_rss_mib']:.0f}", f"{theirs['peak_rss_mib']:.0f}",
            f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}",
            f"{ours['memory']['weights_resident_peak_mib']:.0f}", f"{ours['memory']['activations_peak_mib']:.0f}"]


def _synthetic_run(args, name: str, layers: int | None, results, save, check: bool = False) -> dict:
    model = write_synthetic(args.work / f"llama-{name}{f'-{layers}' if layers else ''}", GEOMETRIES[name], layers)
    out = args.work / f"out-{name}-{layers or 'full'}"
    result = _run({"kind": "streamed", "model": str(model), "method": "wanda", "pattern": "unstructured",
                   "sparsity": 0.5, "format": "bitmask", "dtype": "bfloat16", "calibration": str(args.calibration),
                   "out": str(out), "check_export": check, "nsamples": args.nsamples, "seqlen": args.seqlen},
                  args.threads, results, save)
    shutil.rmtree(out, ignore_errors=True)
    return result


def _plot(path: Path, panels: list[dict]) -> None:
    """One figure of side-by-side panels, each ``{"x", "series": {label: ys}, "reference": {label: ys}, "xlabel",
    "ylabel", "title"}``: measured series with markers, reference lines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, ys in panel["series"].items():
            ax.plot(panel["x"], ys, marker="o", label=label)
        for label, ys in panel["reference"].items():
            ax.plot(panel["x"], ys, linestyle="--", label=label)
        ax.set(xlabel=panel["xlabel"], ylabel=panel["ylabel"], title=panel["title"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def synthetic(args, results, save) -> list[str]:
    from _common import markdown_table

    _windows(args, "default")
    rows, points, sizes = [], [], []
    for name in args.sizes:
        g = GEOMETRIES[name]
        r = _synthetic_run(args, name, None, results, save, check=True)
        per_block = r["blocks_seconds"] / g["num_hidden_layers"]
        fp32_gib = (block_params(g) * g["num_hidden_layers"] + g["vocab_size"] * g["hidden_size"] *
                    (1 if g["tie_word_embeddings"] else 2)) * 4 / 2**30
        points.append((block_params(g), per_block))
        sizes.append((fp32_gib, r["peak_rss_mib"] / 1024))
        check = r.get("export_check", {})
        rows.append([name, g["hidden_size"], g["num_hidden_layers"], f"{fp32_gib:.1f}",
                     f"{r['peak_rss_mib'] / 1024:.2f}", f"{r['memory']['weights_resident_peak_mib']:.0f}",
                     f"{r['memory']['activations_peak_mib']:.0f}", f"{block_params(g) * 4 / 2**20:.0f}",
                     f"{per_block:.1f}", f"{r['prune_seconds'] / 60:.1f}",
                     f"{r['export']['weight_bytes'] / 2**30:.2f}",
                     f"{check.get('sparsity', float('nan')):.4f}", check.get("block0_kept_weights_equal_source")])
    lines = [markdown_table(["geometry", "hidden", "blocks", "fp32 weights GiB", "peak RSS GiB",
                             "weights resident MiB", "activations MiB", "one block fp32 MiB", "s / block",
                             "total min (incl. export)", "export GiB (bf16 bitmask)", "export sparsity",
                             "block 0 kept = source"], rows)]
    if len(points) >= 2:  # time per block ~ a + b * params per block (least squares over the measured sizes)
        n = len(points)
        mx, my = sum(p for p, _ in points) / n, sum(t for _, t in points) / n
        b = sum((p - mx) * (t - my) for p, t in points) / sum((p - mx) ** 2 for p, _ in points)
        a = my - b * mx
        projected = []
        for name in ("8b", "70b"):
            g = GEOMETRIES[name]
            seconds = (a + b * block_params(g)) * g["num_hidden_layers"]
            projected.append(f"{name}: {seconds / 60:.0f} min ({a + b * block_params(g):.1f} s/block x "
                             f"{g['num_hidden_layers']})")
        lines.append("projection on this machine (fit of s/block against parameters per block, same calibration): "
                     + "; ".join(projected))
        params = [p / 1e6 for p, _ in points]
        _plot(args.out / "synthetic.png", [
            {"x": params, "series": {"measured": [t for _, t in points]},
             "reference": {"fit a + b x params": [a + b * p * 1e6 for p in params]},
             "xlabel": "parameters per block (millions)", "ylabel": "s per block",
             "title": f"Wanda 50%, {args.nsamples} x {args.seqlen} tokens ({', '.join(args.sizes)})"},
            {"x": [w for w, _ in sizes], "series": {"peak RSS, streamed": [m for _, m in sizes]},
             "reference": {"fp32 weights of the model": [w for w, _ in sizes]},
             "xlabel": "model fp32 weights (GiB)", "ylabel": "GiB",
             "title": "peak resident memory against model size"}])
        lines.append("plot: synthetic.png")
    return lines


def depth(args, results, save) -> list[str]:
    from _common import markdown_table

    _windows(args, "default")
    rows, points = [], []
    g = GEOMETRIES["1b"]
    for layers in args.depths:
        r = _synthetic_run(args, "1b", layers, results, save)
        points.append((layers, r["memory"]["peak_rss_mib"], r["peak_rss_mib"]))
        rows.append([layers, f"{r['memory']['peak_rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['memory']['weights_resident_peak_mib']:.0f}", f"{r['memory']['activations_peak_mib']:.0f}",
                     f"{r['prune_seconds']:.0f}"])
    block_mib = block_params(g) * 4 / 2**20
    lines = [markdown_table(["blocks (1B geometry)", "peak RSS MiB, pruning", "peak RSS MiB, process (incl. export)",
                             "weights resident MiB", "activations MiB", "s"], rows)]
    _plot(args.out / "depth.png", [{
        "x": [p[0] for p in points],
        "series": {"peak RSS, pruning stage": [p[1] for p in points], "peak RSS, process": [p[2] for p in points]},
        "reference": {"every block resident in fp32": [points[0][2] + (p[0] - points[0][0]) * block_mib
                                                       for p in points]},
        "xlabel": "blocks (1B geometry)", "ylabel": "MiB", "title": "peak resident memory against depth"}])
    for column, label in ((1, "pruning"), (2, "whole process")):
        slope = (points[-1][column] - points[0][column]) / (points[-1][0] - points[0][0])
        lines.append(f"peak RSS growth per added block, {label}: {slope:.1f} MiB = {slope / block_mib:.1%} of one "
                     f"block's fp32 size ({block_mib:.0f} MiB)")
    lines.append("plot: depth.png")
    return lines


def llmcompressor_1b(args, results, save) -> list[str]:
    from _common import markdown_table

    _windows(args, "default")
    model = write_synthetic(args.work / "llama-1b", GEOMETRIES["1b"])
    rows = []
    for method in args.methods:
        ours = _run({"kind": "streamed", "model": str(model), "method": method, "pattern": "unstructured",
                     "sparsity": 0.5, "format": "bitmask", "dtype": "bfloat16", "calibration": str(args.calibration),
                     "out": str(args.work / "out-1b-llmc"), "nsamples": args.nsamples, "seqlen": args.seqlen},
                    args.threads, results, save)
        theirs = _llmcompressor(args, model, method, "unstructured", 0.5, results, save)
        rows.append([f"{method} 50%", f"{ours['prune_seconds']:.0f}", f"{theirs['prune_seconds']:.0f}",
                     f"{ours['prune_seconds'] / theirs['prune_seconds']:.2f}", f"{ours['peak_rss_mib']:.0f}",
                     f"{theirs['peak_rss_mib']:.0f}", f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}"])
    return [markdown_table(["1B geometry", "s ours (streamed, incl. export)", "s llm-compressor", "time ratio",
                            "peak RSS MiB ours", "peak RSS MiB llm-compressor", "RSS ratio"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["compare", "synthetic", "depth", "llmcompressor-1b"],
                        default=["synthetic", "depth"])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--sizes", nargs="+", default=["1b", "3b", "8b"], choices=["1b", "3b", "8b"])
    parser.add_argument("--depths", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--nsamples", type=int, default=None, help="default: 64 for compare, 8 otherwise")
    parser.add_argument("--seqlen", type=int, default=None, help="default: 512 for compare, 256 otherwise")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-memory", action="store_true", help="compare: also sparseforge's in-memory path")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8],
                        help="compare: calibration windows per forward batch of the streamed runs")
    parser.add_argument("--orders", nargs="+", default=["sublayer"], choices=["sublayer", "block"],
                        help="compare: calibration orders of the streamed runs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sparseforge-scale",
                        help="where the synthetic checkpoints (about 25 GB for 1B+3B+8B) and exports are written")
    parser.add_argument("--llmcompressor-venv", type=Path,
                        default=Path.home() / ".cache" / "sparseforge" / "llmcompressor-venv")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.threads)))
        return
    sys.path.insert(0, str(HERE))
    from _common import cached_results, print_setup

    args.work.mkdir(parents=True, exist_ok=True)
    results, save = cached_results(args.out)
    parts = {"compare": compare, "synthetic": synthetic, "depth": depth, "llmcompressor-1b": llmcompressor_1b}
    for part in args.part:
        args.nsamples_given, args.seqlen_given = args.nsamples, args.seqlen
        nsamples = args.nsamples or (64 if part == "compare" else 8)
        seqlen = args.seqlen or (512 if part == "compare" else 256)
        args.nsamples, args.seqlen = nsamples, seqlen
        args.calibration = args.work / f"calibration-{nsamples}x{seqlen}.safetensors"
        args.evaluation = args.work / f"evaluation-{args.eval_windows}x{seqlen}.safetensors"
        print_setup(bench="scale", part=part, nsamples=nsamples, seqlen=seqlen, seed=args.seed,
                    calibration="default (calibration split)", work=str(args.work))
        text = "\n\n".join(parts[part](args, results, save))
        (args.out / f"{part}.md").write_text(text + "\n")
        print(text, flush=True)
        args.nsamples, args.seqlen = args.nsamples_given, args.seqlen_given


if __name__ == "__main__":
    main()
