"""End-to-end decoding in the sparse runtime: the default model dense and pruned, one process, alternating.

    .venv/bin/python bench/runtime.py [--threads 2] [--prompt 128] [--new-tokens 64] [--repeats 3]
    .venv/bin/python bench/runtime.py --model tinyllama-geometry --new-tokens 32   # 1.1B, random weights

Variants, all measured by :func:`sparseforge.evaluation.speed.compare_speed` in one call (alternating, median of
repeats, greedy, KV cache, batch 1):

* ``torch fp32``: the dense model as users run it today (PyTorch, float32);
* ``runtime dense fp16`` (or bf16): the same dense model in the runtime's own dense 16-bit kernel (isolates
  precision). ``--dtype`` picks the 16-bit type of every runtime variant (default fp16: the models load in fp32);
* ``runtime dense fp16, Python step`` (``--python-step``): the same, decoding through the per-layer Python step
  instead of the native whole-model step (isolates what the native step saves per token);

``--model tinyllama-geometry`` builds a Llama with TinyLlama-1.1B's geometry (hidden 2048, 22 layers, 32 heads, 4
KV heads, FFN 5632, vocab 32000, untied head) with random weights in memory: quality is not the point there, bytes
are.

* ``runtime sparse``: the model magnitude-pruned at 50%, 70% and 2:4, every block linear in the sparse layout
  (bitmask or N:M). Speed depends on the bytes of the layout, not on how the mask was found, so magnitude pruning
  stands in for SparseGPT here (quality is measured elsewhere).
* ``+ activations S`` (``--activations S``): runtime dense and the first sparse amount with uniform activation
  thresholds (TEAL) at S, every block linear in a column layout whose product skips the weights of the zeroed
  inputs. Bytes read count the activation sparsity the thresholds realise on held-out windows of the same kind.

Next to tokens/s: weight bytes read per decoded token and the ideal speed-up they imply against runtime dense,
and the per-token time not explained by streaming those bytes at the measured copy bandwidth ("beyond
streaming": Python and small ops, attention, and the kernels' own shortfall from the copy bandwidth).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import sparseforge as sf
from sparseforge.evaluation.speed import compare_speed, weight_bytes_per_token
from sparseforge.kernels import isa_info
from sparseforge.models.handle import LoadedModel
from sparseforge.models.loading import load_model
from sparseforge.runtime import install_runtime

from _common import copy_bandwidth, half_name, markdown_table, print_setup


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights held: parameters and buffers (shared tensors once) plus the runtime's packed layouts."""
    seen, total = set(), 0
    for module in model.modules():
        held = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t is not None]
        packed = getattr(module, "packed", None)
        if packed is not None:
            held += [t for t in vars(packed).values() if isinstance(t, torch.Tensor)]
        if getattr(module, "values", None) is not None and not getattr(module, "tied", True):
            held.append(module.values)
        for tensor in held:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def tinyllama_geometry() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, None, source="tinyllama-geometry")


def fresh(model: str, cached: dict) -> LoadedModel:
    """A new handle on the model: loaded (a real model) or a copy of the one built in memory."""
    if model != "tinyllama-geometry":
        return load_model(model)
    if "model" not in cached:
        cached["model"] = tinyllama_geometry()
    return copy.deepcopy(cached["model"])


def pruned(model: str, amount: str, cached: dict):
    handle = fresh(model, cached)
    if ":" in amount:
        sf.prune(handle, method="magnitude", pattern=amount, progress=False)
    else:
        sf.prune(handle, method="magnitude", sparsity=float(amount), progress=False)
    return handle


def with_activation_thresholds(handle: LoadedModel, target: float) -> float:
    """Uniform activation thresholds at ``target`` on ``handle`` (calibrated on text for a real model, on random
    tokens for the random-weight geometry); returns the sparsity they realise on other windows of the same kind,
    weighted by the weights each input reads (the share of block weight bytes a column product skips)."""
    from sparseforge.calibration.data import calibration_data
    from sparseforge.teal import install_thresholds
    from sparseforge.teal.calibrate import site_statistics

    if handle.tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        windows = torch.randint(0, handle.model.config.vocab_size, (6, 256), generator=generator)
    else:
        windows = calibration_data(handle, "default", 6, 512, 0)
    with torch.no_grad():
        attachment = install_thresholds(handle, site_statistics(handle, windows[:4], progress=False).uniform(target))
        attachment.counter.reset()
        handle.model(input_ids=windows[4:], use_cache=False)
    return attachment.summary()["overall"]


def values_dtype(model: torch.nn.Module) -> torch.dtype:
    """The 16-bit type the runtime installed in ``model`` holds its weights in."""
    return next(m.packed.values.dtype for m in model.modules() if getattr(m, "packed", None) is not None)


def column_bytes(model: torch.nn.Module) -> int:
    """Bytes of the column-layout weights (those whose reads activation sparsity cuts)."""
    from sparseforge.kernels import ColumnWeight

    return sum(m.read_bytes for m in model.modules() if isinstance(getattr(m, "packed", None), ColumnWeight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--amounts", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default=None,
                        help="16-bit type of the runtime's weights (default: float16)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python-step", action="store_true",
                        help="also time runtime dense with the per-layer Python decode step")
    parser.add_argument("--activations", type=float, default=None,
                        help="also activation sparsity (TEAL, uniform thresholds at this share) on runtime dense "
                             "and on the first sparse amount: column layouts that skip the zeroed inputs")
    parser.add_argument("--out", default=None, help="default: results/runtime-<model>.md")
    args = parser.parse_args()
    args.out = args.out or str(Path(__file__).parent / "results" / f"runtime-{args.model}.md")
    torch.set_num_threads(args.threads)
    setup = print_setup(bench="runtime", model=args.model, amounts=args.amounts, threads=args.threads, dtype=args.dtype,
                        prompt=args.prompt, new_tokens=args.new_tokens, repeats=args.repeats, batch=1,
                        pruning="magnitude (bytes, not quality)", kernels=isa_info())
    bandwidth = copy_bandwidth()
    print(f"memory copy bandwidth: {bandwidth:.1f} GB/s")
    cached: dict = {}
    dense = fresh(args.model, cached)
    install_runtime(dense, "dense", values_dtype=args.dtype)
    half = half_name(values_dtype(dense.model))
    base_name = f"runtime dense {half}"
    models = {base_name: dense.model}
    if args.python_step:
        python_step = fresh(args.model, cached)
        install_runtime(python_step, "dense", native_decode=False, values_dtype=args.dtype)
        models[f"{base_name}, Python step"] = python_step.model
    skipped: dict[str, float] = {}  # variant -> realised activation sparsity (share of block weights not read)
    for amount in args.amounts:
        handle = pruned(args.model, amount, cached)
        runtime = install_runtime(handle, "sparse", values_dtype=args.dtype)
        handle.masks.clear()  # packed into the layouts: the boolean masks (1 byte per weight) are not needed
        models[f"runtime sparse {amount}"] = handle.model
        print(f"{amount}: {runtime.describe()}")
    if args.activations is not None:
        for amount in (None, args.amounts[0]):
            handle = fresh(args.model, cached) if amount is None else pruned(args.model, amount, cached)
            name = f"{base_name if amount is None else f'runtime sparse {amount}'} + activations " \
                   f"{args.activations:g}"
            skipped[name] = with_activation_thresholds(handle, args.activations)
            runtime = install_runtime(handle, "dense" if amount is None else "sparse", values_dtype=args.dtype)
            handle.masks.clear()
            models[name] = handle.model
            print(f"{name}: {runtime.describe()}, realised activation sparsity {skipped[name]:.3f}")
    # the dense original last, so that a model built in memory is copied only while it is still needed
    models = {"torch fp32": cached.pop("model").model if cached else load_model(args.model).model, **models}
    measured = compare_speed(models, prompt_len=args.prompt, new_tokens=args.new_tokens, repeats=args.repeats,
                             threads=args.threads)
    results = measured["results"]
    base = results[base_name]
    fp32 = results["torch fp32"]
    base_bytes = weight_bytes_per_token(models[base_name])
    rows = []
    for name, model in models.items():
        r = results[name]
        read = weight_bytes_per_token(model) - skipped.get(name, 0.0) * column_bytes(model)
        per_token = r["decode_s"] / args.new_tokens
        streaming = read / (bandwidth * 1e9)
        rows.append([name, f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x",
                     f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x", f"{read / 2**20:.0f}",
                     f"{base_bytes / read:.2f}x", f"{per_token * 1e3:.1f}", f"{(per_token - streaming) * 1e3:.1f}",
                     f"{r['prefill_tokens_per_s']:.0f}", f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x",
                     f"{resident_bytes(model) / 2**20:.0f}",
                     f"{resident_bytes(model) / resident_bytes(models[base_name]):.2f}x"])
    table = markdown_table(["variant", "decode tok/s", "vs torch fp32", "vs runtime dense", "MiB read / token",
                            "bytes bound vs runtime dense", "ms / token", "ms / token beyond streaming",
                            "prefill tok/s", "prefill vs runtime dense", "resident weight MiB",
                            "resident vs runtime dense"], rows)
    print(table)
    Path(args.out).write_text(f"# bench/runtime.py\nsetup: {setup}\nmemory copy bandwidth: {bandwidth:.1f} GB/s\n\n"
                              f"{table}\n")


if __name__ == "__main__":
    main()
