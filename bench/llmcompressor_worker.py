"""Prune a model with llm-compressor's Wanda or SparseGPT and report time, memory and perplexity.

Runs with the interpreter of a separate virtual environment that has llm-compressor installed (see
`llmcompressor_env.py`), so it must not import sparseforge. The caller hands it the exact calibration and
evaluation windows as token ids; the last line on stdout is one JSON object, everything else (llm-compressor's
loguru log, warnings, tracebacks) goes to stderr.

    python llmcompressor_worker.py --model DIR --calibration calib.safetensors --evaluation eval.safetensors \
        --method sparsegpt --sparsity 0.5 --pattern unstructured --threads 2 [--out-json F] [--save DIR]

How the windows reach llm-compressor unchanged (checked against llmcompressor 0.14 source):
  * `--feed dataloader` (default) hands `oneshot` a DataLoader (batch 1, given order, default collator); oneshot
    uses a DataLoader as is (`get_calibration_dataloader`), so every window is used once, in order, untouched;
  * `--feed dataset` hands it a tokenized `datasets.Dataset` (`input_ids` + `attention_mask` of ones): a dataset
    with an `input_ids` column is not re-tokenised, `shuffle_calibration_samples=False` picks `LengthAwareSampler`
    instead of `RandomSampler`, `num_calibration_samples=n` keeps all n, and batch 1 with the "truncation"
    collator and `max_seq_length=seqlen` cuts nothing; but that sampler orders by length with a non-stable
    `torch.argsort`, which permutes equal-length windows once n >= 17 (same windows, different order; the
    results then differ only by floating-point rounding, which SparseGPT can amplify).
  A forward pre-hook on the input embedding records the ids that actually reach the model during `oneshot`; the
  worker fails unless they are exactly the calibration windows, and reports whether the order was kept.

N:M convention: sparseforge's "N:M" keeps N of every M; llm-compressor's `mask_structure="N:M"` *prunes* N of
every M (`topk(..., N, largest=False)` is the pruned set), so sparseforge N:M is passed as "(M-N):M". For 2:4
and 4:8 both strings are the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

# Keep stdout for the final JSON line only: point file descriptor 1 (and sys.stdout) at stderr for the whole run,
# keeping a private copy of the real stdout. llm-compressor's loguru sink is sys.stdout at import time.
_REAL_STDOUT_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # oneshot warns and sets it otherwise
os.environ.setdefault("TQDM_DISABLE", "1")  # llm-compressor's per-layer progress bars flood stderr
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only; never reach for the Hub

import torch  # noqa: E402


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="local Hugging Face model directory")
    p.add_argument("--calibration", required=True, type=Path, help=".safetensors with int64 input_ids [n, seqlen]")
    p.add_argument("--evaluation", required=True, type=Path, help=".safetensors with int64 input_ids [w, seqlen]")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (ignored for N:M)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (N kept of every M)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--feed", choices=["dataset", "dataloader"], default="dataloader",
                   help="hand oneshot a tokenized datasets.Dataset (its LengthAwareSampler may permute equal-length "
                        "windows) or a DataLoader that keeps the given order")
    p.add_argument("--out-json", type=Path, default=None)
    p.add_argument("--save", type=Path, default=None,
                   help="also save the pruned model here as llm-compressor does (save_compressed=True: dense weights "
                        "with zeros plus recipe.yaml), after the timings")
    p.add_argument("--log-level", default=os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    for name in ("calibration", "evaluation"):
        if not getattr(args, name).is_file():
            p.error(f"--{name}: no such file {getattr(args, name)}")
    if not (args.model / "config.json").is_file():
        p.error(f"--model must be a local Hugging Face model directory (no config.json in {args.model})")
    if args.pattern == "unstructured":
        if not 0.0 <= args.sparsity < 1.0:
            p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
        args.kept_n = args.group_m = None
    else:
        try:
            n, m = (int(x) for x in args.pattern.split(":"))
        except ValueError:
            p.error(f"--pattern must be 'unstructured' or N:M, got {args.pattern!r}")
        if not 0 < n < m:
            p.error(f"--pattern N:M needs 0 < N < M, got {args.pattern!r}")
        args.kept_n, args.group_m = n, m
        args.sparsity = (m - n) / m
    return args


def _load_windows(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if "input_ids" not in tensors:
        raise ValueError(f"{path}: no tensor named 'input_ids' (found {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{path}: input_ids must be int64 [n, seqlen>=2], got {ids.dtype} {list(ids.shape)}")
    return ids.contiguous()


def _decoder_layer_classes(model) -> list[str]:
    names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise RuntimeError("cannot find the decoder layer class (model._no_split_modules)")
    return names


def _target_linears(model, layer_classes: list[str]) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside a decoder layer (so never lm_head)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in layer_classes:
            for sub_name, sub in module.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    out[f"{name}.{sub_name}"] = sub
    if not out:
        raise RuntimeError("no Linear layers found inside the decoder layers")
    return out


def _sparsity_report(linears: dict[str, torch.nn.Linear], kept_n: int | None, group_m: int | None) -> dict:
    zeros = total = 0
    nm_ok = True
    per_layer_min, per_layer_max = 1.0, 0.0
    for module in linears.values():
        w = module.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_layer_min = min(per_layer_min, z / w.numel())
        per_layer_max = max(per_layer_max, z / w.numel())
        if group_m is not None:
            if w.shape[1] % group_m:
                nm_ok = False
            else:
                nonzero = (w.reshape(w.shape[0], -1, group_m) != 0).sum(-1)
                nm_ok &= bool((nonzero <= kept_n).all())
    return {"achieved_sparsity": zeros / total, "layer_sparsity_min": per_layer_min,
            "layer_sparsity_max": per_layer_max, "nm_valid": nm_ok if group_m is not None else None}


@torch.no_grad()
def _perplexity(model, windows: torch.Tensor) -> float:
    nlls = []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
        nlls.append(float(nll))
    return math.exp(sum(nlls) / len(nlls))


def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a worker would report its parent's resident
    # memory at the fork when that is larger (see sparseforge.memory.peak_resident_mb; this venv lacks sparseforge)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024.0


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import datasets
    import transformers
    from loguru import logger

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.logger import support_log_once
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    logger.remove()  # llm-compressor's import-time sink is sys.stdout; send its log to stderr only
    logger.add(sys.stderr, level=args.log_level.upper(), filter=support_log_once,
               format="{time:HH:mm:ss.SSS} | {function} | {level} - {message}")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    calib = _load_windows(args.calibration)
    evaluation = _load_windows(args.evaluation)
    nsamples, seqlen = calib.shape

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32,
                                                              device_map=None)
    model.to("cpu").eval()
    load_seconds = time.perf_counter() - t0
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model))  # oneshot wants a processor

    vocab = model.get_input_embeddings().num_embeddings
    for name, ids in (("calibration", calib), ("evaluation", evaluation)):
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"{name} token ids outside [0, {vocab})")

    layer_classes = _decoder_layer_classes(model)
    linears = _target_linears(model, layer_classes)

    if args.feed == "dataset":
        calib_data = datasets.Dataset.from_dict({"input_ids": calib.tolist(),
                                                 "attention_mask": torch.ones_like(calib).tolist()})
    else:
        rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in calib]
        calib_data = torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False,
                                                 collate_fn=transformers.default_data_collator)
    if args.group_m is None:
        mask_structure = "0:0"  # llm-compressor's "unstructured"
    else:
        mask_structure = f"{args.group_m - args.kept_n}:{args.group_m}"  # llm-compressor prunes N of M
    common = dict(sparsity=args.sparsity, mask_structure=mask_structure, targets=layer_classes, ignore=[])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common)  # defaults: block_size=128, dampening_frac=0.01
    else:
        modifier = WandaPruningModifier(**common)

    # Record the token ids that reach the model during oneshot (tracing proxies are not tensors).
    seen: list[torch.Tensor] = []

    def _record(_module, inputs):
        ids = inputs[0] if inputs else None
        # skip tracing proxies and the meta-device tensors llm-compressor traces the model with
        if type(ids) is torch.Tensor and ids.device.type != "meta":
            seen.append(ids.detach().clone())

    hook = model.get_input_embeddings().register_forward_pre_hook(_record)

    gc.collect()
    t0 = time.perf_counter()
    pruned = oneshot(
        model=model,
        processor=tokenizer,
        dataset=calib_data,
        recipe=[modifier],
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        dataloader_num_workers=0,
    )
    prune_seconds = time.perf_counter() - t0
    peak_rss_mib = _peak_rss_mib()
    hook.remove()

    if pruned is not model:
        raise RuntimeError("oneshot returned a different model object; expected in-place pruning")
    # oneshot's sequential pipeline wraps every module in compressed-tensors' (cpu -> cpu) offloading; remove it
    # so the evaluation runs the plain Hugging Face model.
    try:
        from compressed_tensors.offload import remove_dispatch
    except ImportError:  # pragma: no cover - older compressed-tensors
        remove_dispatch = None
    if remove_dispatch is not None:
        remove_dispatch(model)

    # The calibration pass of the first subgraph sees every batch once, in dataloader order.
    first = seen[:nsamples]
    if len(first) != nsamples or any(t.shape != (1, seqlen) for t in first):
        raise RuntimeError(f"expected {nsamples} calibration batches of [1, {seqlen}] to reach the model, "
                           f"saw {[tuple(t.shape) for t in first]}")
    got = torch.cat(first)
    if torch.equal(got, calib):
        calibration_order = "exact"
    else:
        key = lambda rows: sorted(tuple(r.tolist()) for r in rows)  # noqa: E731
        if key(got) != key(calib):
            raise RuntimeError("llm-compressor calibrated on different token windows than the ones given")
        calibration_order = "reordered"

    sparsity_info = _sparsity_report(linears, args.kept_n, args.group_m)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})

    t0 = time.perf_counter()
    ppl = _perplexity(model, evaluation)
    eval_seconds = time.perf_counter() - t0

    result = {
        "method": args.method,
        "pattern": args.pattern,
        "sparsity": args.sparsity,
        "nsamples": int(nsamples),
        "seqlen": int(seqlen),
        "threads": torch.get_num_threads(),
        "prune_seconds": prune_seconds,
        "load_seconds": load_seconds,
        "peak_rss_mib": peak_rss_mib,
        "perplexity": ppl,
        "achieved_sparsity": sparsity_info["achieved_sparsity"],
        "llmcompressor_version": llmcompressor.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        # extras
        "mask_structure": mask_structure,
        "target_linears": len(linears),
        "layer_sparsity_min": sparsity_info["layer_sparsity_min"],
        "layer_sparsity_max": sparsity_info["layer_sparsity_max"],
        "nm_valid": sparsity_info["nm_valid"],
        "calibration_feed": args.feed,
        "calibration_order": calibration_order,
        "eval_windows": int(evaluation.shape[0]),
        "eval_seqlen": int(evaluation.shape[1]),
        "eval_seconds": eval_seconds,
        "peak_rss_mib_after_eval": _peak_rss_mib(),
        "param_dtypes": dtypes,
    }
    if args.save is not None:
        model.save_pretrained(str(args.save), save_compressed=True)  # llm-compressor's wrapper adds recipe.yaml
        tokenizer.save_pretrained(str(args.save))
        result["saved"] = sorted(f.name for f in args.save.iterdir())
    if args.out_json is not None:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    result = main()
    sys.stderr.flush()
    with os.fdopen(_REAL_STDOUT_FD, "w") as real_stdout:
        real_stdout.write(json.dumps(result) + "\n")
