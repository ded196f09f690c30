"""GPU check of the layer-sequential pipeline: the same pruning on CPU and on CUDA, side by side.

Two CUDA set-ups: the model stays on the CPU and each block moves to the GPU for its turn (``device="cuda"``), and
the whole model on the GPU. For each, the wall time of pruning and the share of mask entries that agree with the
CPU run (not 100%: CUDA and CPU kernels sum in different orders, and ties in scores flip). The model is a seeded
random LLaMA (no download needed), so this runs on a machine without internet.

    python bench/gpu_check.py --blocks 8 --hidden 1024 --nsamples 64 --seqlen 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, print_setup  # noqa: E402

from sparseforge import prune  # noqa: E402
from sparseforge.models.handle import LoadedModel  # noqa: E402
from sparseforge.models.tiny import byte_tokenizer  # noqa: E402


def random_llama(blocks: int, hidden: int, device: str) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=blocks,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048)
    return LoadedModel(LlamaForCausalLM(config).eval().to(device), byte_tokenizer(), "random-llama")


def timed_prune(args, model_device: str, work_device: str | None, method: str, pattern: str, windows) -> tuple:
    handle = random_llama(args.blocks, args.hidden, model_device)
    sparsity = 0.5 if pattern == "unstructured" else None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    prune(handle, method=method, sparsity=sparsity, pattern=pattern, calibration=windows, device=work_device,
          batch_size=args.batch_size, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return handle.masks, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print_setup(bench="gpu_check", blocks=args.blocks, hidden=args.hidden, nsamples=args.nsamples,
                seqlen=args.seqlen, batch_size=args.batch_size,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    windows = torch.randint(0, 259, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in ("wanda", "sparsegpt"):
        for pattern in ("unstructured", "2:4"):
            cpu_masks, cpu_s, _ = timed_prune(args, "cpu", None, method, pattern, windows)
            for label, model_device, work in (("blocks to GPU", "cpu", "cuda"), ("model on GPU", "cuda", None)):
                masks, seconds, peak = timed_prune(args, model_device, work, method, pattern, windows)
                agree = sum(int((masks[k] == cpu_masks[k]).sum()) for k in masks)
                total = sum(m.numel() for m in masks.values())
                rows.append([method, pattern, label, f"{cpu_s:.1f}", f"{seconds:.1f}", f"{cpu_s / seconds:.1f}x",
                             f"{peak:.0f}", f"{agree / total:.4f}"])
                print(rows[-1], flush=True)
    print(markdown_table(["method", "pattern", "set-up", "CPU s", "CUDA s", "speed-up", "peak GPU MiB",
                          "masks equal to CPU"], rows))


if __name__ == "__main__":
    main()
