"""Sparse checkpoints in and out of the ecosystem, measured with the other tools themselves.

Each foreign tool runs in its own virtual environment (built on first use, see `llmcompressor_env.py`): llm-compressor
0.14, compressed-tensors 0.14.0.1 (the last release with the sparse compressors, `transformers<5`) and llama.cpp
through llama-cpp-python 0.3.36 (built from source for this CPU). Parts:

* ``fixtures``: rewrite the small compressed-tensors fixtures of the tests (`tests/fixtures/compressed_tensors/`),
  written by compressed-tensors 0.14.0.1 itself from a seeded tiny Llama pruned 50% and 2:4;
* ``compressed-tensors``: the default model pruned by sparseforge (SparseGPT 50% and 2:4), written by
  compressed-tensors as sparse-bitmask / sparse-24-bitmask, read back: masks, logits, PERP, the sparse runtime;
* ``llmcompressor``: llm-compressor prunes the default model (Wanda 50%, SparseGPT 2:4) and saves it its way (dense
  with zeros + recipe.yaml); sparseforge reads the masks from the recipe, evaluates it, runs PERP on it;
* ``reader``: our bitmask/nm exports turned into plain checkpoints by the standalone reader in the
  compressed-tensors environment (no sparseforge there) and loaded by its transformers 4.x;
* ``gguf``: the dense and a uniformly FFN -25% shrunk default model written as GGUF (f16 and q8_0) and run in
  llama.cpp: greedy tokens against sparseforge's, decode speed, sizes.

    .venv/bin/python bench/interop.py --part all            # results in bench/results/interop/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import markdown_table, print_setup  # noqa: E402
from llmcompressor_env import (LEGACY_COMPRESSED_TENSORS, LLAMA_CPP, LLAMA_CPP_BUILD_ENV, ensure_venv,  # noqa: E402
                               run_worker)

import sparseforge as sf  # noqa: E402
from sparseforge.calibration.data import calibration_data  # noqa: E402
from sparseforge.evaluation.perplexity import perplexity  # noqa: E402
from sparseforge.evaluation.stats import weight_file_bytes  # noqa: E402
from sparseforge.evaluation.suite import prepare_evaluation  # noqa: E402
from sparseforge.models.default import default_model_dir  # noqa: E402

CACHE = Path("~/.cache/sparseforge").expanduser()
FIXTURES = HERE.parent / "tests" / "fixtures" / "compressed_tensors"
CT_WORKER = HERE / "compressed_tensors_worker.py"
LLAMA_WORKER = HERE / "llamacpp_worker.py"
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "The best way to learn a new language is",
           "Water boils at a temperature of", "In the year 1969, humans"]


def _ct_python() -> Path:
    return ensure_venv(CACHE / "ct-legacy-venv", LEGACY_COMPRESSED_TENSORS)


def _mask_digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.to(torch.uint8).numpy().tobytes()).hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    # "+ 0" makes -0.0 (a negative weight times a zero mask) and 0.0 one value
    return hashlib.sha256((tensor.detach() + 0).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _masks_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ppl(handle, windows) -> float:
    with torch.no_grad():
        return perplexity(handle.model, windows, progress=False)["perplexity"]


def _masks_kept_after_perp(handle, steps: int) -> tuple[bool, dict]:
    masks = {k: v.clone() for k, v in handle.masks.items()}
    sf.retrain(handle, method="perp", steps=steps, batch=2, seqlen=256, progress=False)
    views = {v.name: v for v in handle.adapter.linears()}
    kept = all(not bool((views[name].weight.detach()[~mask] != 0).any()) for name, mask in masks.items())
    return kept and _masks_equal(masks, handle.masks), handle.history[-1]


# ---- fixtures -----------------------------------------------------------------------------------------------
def fixtures(args) -> list[str]:
    """Tiny Llama (seeded), magnitude-pruned 50% and 2:4 by sparseforge, written by compressed-tensors itself."""
    python = _ct_python()
    lines = []
    for name, fmt, prune in (("bitmask50", "sparse-bitmask", {"sparsity": 0.5}),
                             ("24", "sparse-24-bitmask", {"pattern": "2:4"})):
        handle = sf.load_model("tiny-llama", dtype="float16")
        sf.prune(handle, method="magnitude", progress=False, **prune)
        with tempfile.TemporaryDirectory() as tmp:
            dense = Path(tmp) / "dense"
            handle.model.save_pretrained(dense)
            info = run_worker(python, ["--model", dense, "--out", Path(tmp) / "ct", "--format", fmt], worker=CT_WORKER)
            target = FIXTURES / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in ("config.json", "model.safetensors"):
                shutil.copy2(Path(tmp) / "ct" / file, target / file)
        expected = {"written_by": info, "source": "tiny-llama float16, sparseforge magnitude " + json.dumps(prune),
                    "masks": {f"{k}.weight": _mask_digest(m) for k, m in handle.masks.items()},
                    "kept": {f"{k}.weight": int(m.sum()) for k, m in handle.masks.items()},
                    "weights": {k: _tensor_digest(v) for k, v in handle.model.state_dict().items()}}
        (target / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        size = sum(f.stat().st_size for f in target.iterdir())
        lines.append(f"fixture {name}: {fmt} by compressed-tensors {info['compressed_tensors']}, "
                     f"{info['compressed_modules']} modules, {size / 1024:.0f} KiB")
    return lines


# ---- compressed-tensors ---------------------------------------------------------------------------------------
def compressed_tensors_part(args, windows, calibration, tmp: Path, sizes: dict) -> list[str]:
    python = _ct_python()
    rows = []
    for label, prune, fmt in (("SparseGPT 50%", {"sparsity": 0.5}, "sparse-bitmask"),
                              ("SparseGPT 2:4", {"pattern": "2:4"}, "sparse-24-bitmask")):
        ours = sf.load_model(args.model)
        sf.prune(ours, method="sparsegpt", calibration=calibration, progress=False, **prune)
        dense_dir, ct_dir = tmp / f"dense-{fmt}", tmp / f"ct-{fmt}"
        sf.save_model(ours, dense_dir, format="dense", dtype="float16")
        info = run_worker(python, ["--model", dense_dir, "--out", ct_dir, "--format", fmt], worker=CT_WORKER)
        start = time.perf_counter()
        read = sf.load_model(str(ct_dir))
        load_s = time.perf_counter() - start
        reference = sf.load_model(str(dense_dir), dtype="float32")
        # against the pruner's own masks: a kept weight that rounds to zero in fp16 is pruned in a sparse-bitmask
        # (which stores nonzeros) but kept in a sparse-24-bitmask (which stores the two largest of four)
        differing = sum(int((read.masks[k] != m).sum()) for k, m in ours.masks.items())
        kept_zero = sum(int(((reference.masks[k] == 0) & m).sum()) for k, m in ours.masks.items())
        with torch.no_grad():
            same_logits = torch.equal(read.model(windows[:2]).logits, reference.model(windows[:2]).logits)
        ppl_read = _ppl(read, windows)
        runtime = sf.load_model(str(ct_dir), runtime="sparse")
        ppl_runtime = _ppl(runtime, windows)
        kept, history = _masks_kept_after_perp(read, args.perp_steps)
        ppl_perp = _ppl(read, windows)
        sizes[f"compressed-tensors {fmt} ({label})"] = weight_file_bytes(ct_dir)
        if fmt == "sparse-bitmask":
            sizes["dense fp16 with zeros (sparseforge dense export)"] = weight_file_bytes(dense_dir)
        for our_fmt in ("bitmask", "nm") if fmt == "sparse-24-bitmask" else ("bitmask",):
            sf.save_model(read, tmp / f"ours-{our_fmt}-{fmt}", format=our_fmt, dtype="float16")
            sizes[f"sparseforge {our_fmt} fp16 ({label})"] = weight_file_bytes(tmp / f"ours-{our_fmt}-{fmt}")
        rows.append([label, fmt, info["compressed_tensors"], len(read.masks), f"{differing} ({kept_zero})", same_logits,
                     f"{ppl_read:.3f}", f"{ppl_runtime:.3f}", f"{ppl_perp:.3f} ({args.perp_steps} steps)", kept,
                     f"{load_s:.1f}"])
        print(rows[-1], flush=True)
    return [markdown_table(["checkpoint", "format", "written by compressed-tensors", "masks read",
                            "mask positions differing from the pruner's (kept weights that are 0 in fp16)",
                            "logits = dense reconstruction", "ppl", "ppl in sparse runtime",
                            "ppl after PERP", "masks kept by PERP", "load s"], rows)]


# ---- llm-compressor -------------------------------------------------------------------------------------------
def llmcompressor_part(args, windows, tmp: Path, sizes: dict) -> list[str]:
    python = ensure_venv(CACHE / "llmcompressor-venv")
    rows = []
    for method, pattern in (("wanda", "unstructured"), ("sparsegpt", "2:4")):
        saved = tmp / f"llmc-{method}"
        result = run_worker(python, ["--model", default_model_dir(), "--calibration", tmp / "calibration.safetensors",
                                     "--evaluation", tmp / "evaluation.safetensors", "--method", method,
                                     "--pattern", pattern, "--sparsity", 0.5, "--threads", args.threads,
                                     "--save", saved])
        handle = sf.load_model(str(saved))
        views = {v.name: v for v in handle.adapter.linears()}
        nonzero = {name: (view.weight.detach() != 0) for name, view in views.items()}
        equal = handle.masks.keys() == nonzero.keys() and all(torch.equal(handle.masks[k], nonzero[k])
                                                             for k in handle.masks)
        ppl = _ppl(handle, windows)
        kept, _ = _masks_kept_after_perp(handle, args.perp_steps)
        ppl_perp = _ppl(handle, windows)
        sizes[f"llm-compressor {method} {pattern} output (dense {result['param_dtypes']})"] = weight_file_bytes(saved)
        label = f"{method} {'50%' if pattern == 'unstructured' else pattern}"
        theirs = f"{result['perplexity']:.4f} (transformers {result['transformers_version']})"
        rows.append([label, result["llmcompressor_version"], ", ".join(result["saved"]), len(handle.masks), equal,
                     theirs, f"{ppl:.4f}", f"{ppl / result['perplexity']:.6f}",
                     f"{ppl_perp:.3f} ({args.perp_steps} steps)", kept])
        print(rows[-1], flush=True)
    return [markdown_table(["llm-compressor run", "version", "files it saved", "masks read from recipe",
                            "masks = nonzeros of targeted linears", "ppl in llm-compressor's env",
                            "ppl in sparseforge", "ratio", "ppl after PERP", "masks kept by PERP"], rows)]


# ---- standalone reader ----------------------------------------------------------------------------------------
_READ_IN_PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file, save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = load_file(sys.argv[2])["input_ids"][:2]
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous()}, sys.argv[3])
import transformers; print(json.dumps({"transformers": transformers.__version__}))
"""


def reader_part(args, windows, tmp: Path) -> list[str]:
    """reader.py runs in the compressed-tensors environment, where sparseforge is not installed. Its output is
    loaded by plain transformers twice: there (4.57) next to our dense export of the same weights, and here (5.x)
    next to sparseforge's own loading. transformers 4.x reads the rotary base of a config written by 5.x wrongly
    (it knows no ``rope_parameters``), so 4.x is compared with our dense export, which shares that config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    python = _ct_python()
    reader = HERE.parent / "src" / "sparseforge" / "export" / "reader.py"
    script = tmp / "logits.py"
    script.write_text(_READ_IN_PLAIN_TRANSFORMERS)
    rows = []
    handle = sf.load_model(args.model)
    sf.prune(handle, method="magnitude", pattern="2:4", progress=False)
    sf.save_model(handle, tmp / "reader-dense", format="dense")

    def logits_there(directory: Path, name: str) -> tuple[torch.Tensor, str]:
        out = subprocess.run([str(python), str(script), str(directory), str(tmp / "evaluation.safetensors"),
                              str(tmp / name)], capture_output=True, text=True, check=True)
        return load_file(str(tmp / name))["logits"], json.loads(out.stdout.strip().splitlines()[-1])["transformers"]

    dense_there, version = logits_there(tmp / "reader-dense", "logits-dense.safetensors")
    for fmt in ("bitmask", "nm"):
        export, plain = tmp / f"reader-{fmt}", tmp / f"reader-{fmt}-plain"
        sf.save_model(handle, export, format=fmt)
        proc = subprocess.run([str(python), str(reader), str(export), str(plain)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr)
        there, _ = logits_there(plain, f"logits-{fmt}.safetensors")
        with torch.no_grad():
            here = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()(windows[:2]).logits
            ours = sf.load_model(str(export)).model(windows[:2]).logits
        rows.append([fmt, f"{weight_file_bytes(export) / 2**20:.1f} MiB", torch.equal(there, dense_there),
                     torch.equal(here, ours)])
        print(rows[-1], flush=True)
    import transformers

    return [markdown_table(["our export", "size", f"reader.py output = our dense export, both in transformers "
                            f"{version} (no sparseforge)", f"reader.py output in transformers "
                            f"{transformers.__version__} = sparseforge's loading"], rows)]


# ---- GGUF / llama.cpp -----------------------------------------------------------------------------------------
def _linear_macs(handle) -> int:
    """Multiply-accumulates per token of every linear layer plus the LM head (what decoding reads and computes)."""
    blocks = sum(v.weight.numel() for v in handle.adapter.linears())
    return blocks + handle.model.get_output_embeddings().weight.numel()


def gguf_part(args, calibration, tmp: Path, sizes: dict) -> list[str]:
    python = ensure_venv(CACHE / "llamacpp-venv", LLAMA_CPP, LLAMA_CPP_BUILD_ENV)
    dense = sf.load_model(args.model)
    shrunk = sf.load_model(args.model)
    sf.shrink(shrunk, ffn=0.25, calibration=calibration, progress=False)
    files = {}
    for label, handle in (("dense", dense), ("shrunk", shrunk)):
        for ttype in ("f16", "q8_0"):
            path = tmp / f"{label}-{ttype}.gguf"
            sf.export_model(handle, path, format="gguf", gguf_type=ttype)
            files[f"{label} {ttype}"] = str(path)
            sizes[f"GGUF {ttype}, {label}"] = path.stat().st_size
    tokenizer = dense.tokenizer
    prompts = [{"text": text, "ids": tokenizer(text).input_ids} for text in PROMPTS]
    spec = {"models": files, "prompts": prompts, "new_tokens": args.new_tokens, "speed_tokens": args.speed_tokens,
            "repeats": args.repeats, "threads": args.threads}
    (tmp / "spec.json").write_text(json.dumps(spec))
    result = run_worker(python, ["--spec", tmp / "spec.json"], worker=LLAMA_WORKER)
    rows = []
    for label in files:
        # sparseforge decodes the same weights: the GGUF file read back (f16/q8_0 values), computed in float32
        back = sf.load_model(files[label])
        agree, first_divergence = 0, []
        for prompt, theirs in zip(prompts, result["tokens"][label]):
            ids = torch.tensor([prompt["ids"]])
            with torch.no_grad():
                ours = back.model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            agree += same is None
            first_divergence.append("-" if same is None else str(same))
        same_tokenization = all(p["ids"] == t for p, t in zip(prompts, result["tokenized"][label]))
        rows.append([label, f"{agree}/{len(prompts)}", ", ".join(first_divergence), same_tokenization,
                     f"{result['decode_tokens_per_s'][label]:.1f}"])
        print(rows[-1], flush=True)
    speed = result["decode_tokens_per_s"]
    ideal = _linear_macs(dense) / _linear_macs(shrunk)
    lines = [markdown_table(["GGUF", f"prompts with identical {args.new_tokens} greedy tokens",
                             "first divergence per prompt", "llama.cpp tokenizes the prompts as we do",
                             "llama.cpp decode tok/s"], rows)]
    for ttype in ("f16", "q8_0"):
        ratio = speed[f"shrunk {ttype}"] / speed[f"dense {ttype}"]
        lines.append(f"shrunk FFN -25% vs dense in llama.cpp, {ttype}: {ratio:.3f}x decode (ideal from removed "
                     f"linear MACs incl. LM head: {ideal:.3f}x)")
    lines.append(f"llama-cpp-python {result['llama_cpp_python']}, {result['threads']} threads, {args.repeats} "
                 f"alternating rounds of {args.speed_tokens} tokens; per-round tok/s: "
                 f"{json.dumps(result['decode_rounds'])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all",
                        choices=["all", "fixtures", "compressed-tensors", "llmcompressor", "reader", "gguf"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--perp-steps", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "interop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_setup(bench="interop", part=args.part, model=args.model, calibration="default", nsamples=args.nsamples,
                seqlen=args.seqlen, evaluation="default", eval_windows=args.eval_windows, seed=args.seed,
                perp_steps=args.perp_steps, new_tokens=args.new_tokens, speed_tokens=args.speed_tokens,
                repeats=args.repeats)
    if args.part == "fixtures":
        print("\n".join(fixtures(args)))
        return
    lines, sizes = [], {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        from safetensors.torch import save_file

        handle = sf.load_model(args.model)
        calibration = calibration_data(handle, "default", args.nsamples, args.seqlen, args.seed)
        windows, _ = prepare_evaluation(handle, "default", args.seqlen, args.eval_windows)
        save_file({"input_ids": calibration.contiguous()}, str(tmp / "calibration.safetensors"))
        save_file({"input_ids": windows.contiguous()}, str(tmp / "evaluation.safetensors"))
        del handle
        parts = ["compressed-tensors", "llmcompressor", "reader", "gguf"] if args.part == "all" else [args.part]
        for part in parts:
            lines.append(f"## {part}")
            if part == "compressed-tensors":
                lines += compressed_tensors_part(args, windows, calibration, tmp, sizes)
            elif part == "llmcompressor":
                lines += llmcompressor_part(args, windows, tmp, sizes)
            elif part == "reader":
                lines += reader_part(args, windows, tmp)
            else:
                lines += gguf_part(args, calibration, tmp, sizes)
    lines.append("## sizes (weight files)")
    lines.append(markdown_table(["checkpoint", "MiB"], [[k, f"{v / 2**20:.1f}"] for k, v in sizes.items()]))
    text = "\n\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.part}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
