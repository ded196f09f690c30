"""Sparse-weight CPU kernels (sparseforge.kernels) against our own dense kernel at the same precision, in the
memory-bound regime of decoding: y = x @ W.T with x of 1..16 rows.

    .venv/bin/python bench/runtime_kernels.py [--rounds 7] [--out bench/results/runtime_kernels.txt]

Every variant cycles over enough distinct weight matrices (> --cycle-mib, default twice the last-level cache) that
each matvec streams its weights from DRAM, as in a real decode step. Variants are measured in turn within each
round, their order rotating from round to round, and the median over rounds is reported, so drift and other load
on the machine hit all of them alike. GB/s counts the weight bytes a matvec reads (values, masks or positions,
offsets; ``nbytes``); the physical limit is the copy bandwidth of a large tensor, counted as bytes read plus
bytes written.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from _common import HALF_TYPES, copy_bandwidth, last_level_cache_mib, markdown_table, print_setup, streamed_mib
from sparseforge import kernels
from sparseforge.kernels.pages import huge_page_copy, on_huge_pages

MIB = 2**20
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536),  # default model (SmolLM2-135M): out x in
          (4096, 4096), (11008, 4096), (4096, 11008))  # Llama-7B


def other_load(seconds: float = 2.0) -> float:
    """Busy fraction of all CPUs over ``seconds`` while this process sleeps: the load others put on the machine."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def mask_at(shape, sparsity: float, gen) -> torch.Tensor:
    return torch.rand(shape, generator=gen) >= sparsity


def two_four(shape, gen) -> torch.Tensor:
    lanes = torch.rand(shape[0], shape[1] // 4, 4, generator=gen).argsort(dim=-1)
    return (lanes < 2).reshape(shape)


def build_variants(shape, names, cycle_mib: int, gen) -> tuple[dict, int]:
    """name -> (list of operands, call(operand, x), bytes read per matvec), and the matrices cycled over. Our
    kernels are bound once per matrix (PreparedMatmul) and their tensors moved to huge pages, as the runtime holds
    them, so a call measures the kernel and not the binding; PyTorch's weights get the same pages."""
    count = max(2, math.ceil(cycle_mib * MIB / (shape[0] * shape[1] * 2)))
    variants = {}
    for name in names:
        operands, nbytes = [], 0
        half = HALF_TYPES.get(name.split()[1]) if not name.startswith("PyTorch") else None
        for _ in range(count):
            weight = torch.randn(shape, generator=gen)
            if name.startswith("dense"):
                packed = kernels.pack_dense(weight, half)
            elif name.startswith("bitmask"):
                packed = kernels.pack_bitmask(weight, mask_at(shape, int(name.split()[2][:-1]) / 100, gen), half)
            elif name.startswith("2:4"):
                packed = kernels.pack_nm(weight, two_four(shape, gen), 2, 4, half)
            else:  # PyTorch fp32 / bf16
                operands.append(huge_page_copy(weight if name == "PyTorch fp32" else weight.to(torch.bfloat16)))
                continue
            operands.append(kernels.PreparedMatmul(on_huge_pages(packed)))
            nbytes = packed.nbytes
        if name.startswith("PyTorch"):
            dtype = operands[0].dtype
            variants[name] = (operands, lambda w, x, dt=dtype: torch.nn.functional.linear(x.to(dt), w),
                              operands[0].numel() * operands[0].element_size())
        else:
            variants[name] = (operands, lambda matmul, x: matmul(x), nbytes)
    return variants, count


def same_precision_dense(name: str) -> str:
    """The dense kernel of our own a variant is compared with: the one holding weights in the same 16-bit type."""
    return "dense bf16 (ours)" if " bf16" in name and not name.startswith("PyTorch") else "dense fp16 (ours)"


def measure(variants: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per matvec of every variant; variants alternate within a round, in a rotating order."""
    names = list(variants)
    for operands, call, _ in variants.values():  # warm-up: first touch, lazy build
        call(operands[0], x)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            operands, call, _ = variants[name]
            start = time.perf_counter()
            for operand in operands:
                call(operand, x)
            times[name].append((time.perf_counter() - start) / len(operands))
    return {name: statistics.median(t) for name, t in times.items()}


def shape_tables(args, bandwidth: float, gen) -> None:
    names = ["dense fp16 (ours)", "bitmask fp16 50%", "bitmask fp16 70%", "2:4 fp16", "dense bf16 (ours)",
             "bitmask bf16 50%", "bitmask bf16 70%", "2:4 bf16", "PyTorch fp32", "PyTorch bf16"]
    for shape in SHAPES:
        variants, count = build_variants(shape, names, args.cycle_mib, gen)
        x = torch.randn(1, shape[1], generator=gen)
        seconds = measure(variants, x, args.rounds)
        base = seconds["dense fp16 (ours)"]
        rows = [[name, f"{seconds[name] * 1e6:.1f}", f"{nbytes / MIB:.2f}", f"{nbytes / seconds[name] / 1e9:.1f}",
                 f"{nbytes / seconds[name] / 1e9 / bandwidth:.0%}", f"{base / seconds[name]:.2f}x",
                 f"{seconds[same_precision_dense(name)] / seconds[name]:.2f}x"]
                for name, (_, _, nbytes) in variants.items()]
        print(f"\n### {shape[0]} x {shape[1]} (out x in), batch 1, {count} matrices cycled\n")
        print(markdown_table(["variant", "us / matvec", "MiB read", "GB/s", "of copy BW", "vs dense fp16 (ours)",
                              "vs dense of the same 16-bit type (ours)"], rows))
        del variants


def crossover_table(args, gen) -> None:
    shape, sparsities, batches = (4096, 4096), (30, 50, 70, 90), (1, 2, 4, 8, 16)
    for half in HALF_TYPES:
        names = [f"dense {half} (ours)"] + [f"bitmask {half} {s}%" for s in sparsities]
        variants, count = build_variants(shape, names, args.cycle_mib, gen)
        rows = []
        for batch in batches:
            seconds = measure(variants, torch.randn(batch, shape[1], generator=gen), args.rounds)
            base = seconds[names[0]]
            rows.append([batch, f"{base * 1e6:.0f}"] + [f"{base / seconds[n]:.2f}x" for n in names[1:]])
        print(f"\n### Crossover: bitmask {half} vs dense {half} (ours), 4096 x 4096, {count} matrices cycled\n")
        print(markdown_table(["batch", "dense us / matmul"] + [f"{s}% sparse" for s in sparsities], rows))
        del variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cycle-mib", type=int, default=streamed_mib(),
                        help="weight bytes each variant cycles over (default: twice the last-level cache)")
    parser.add_argument("--out", type=Path, help="also write the output here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    buffer = io.StringIO()
    with redirect_stdout(Tee(sys.stdout, buffer)):
        run(args)
    if args.out:
        args.out.write_text(buffer.getvalue())


def run(args) -> None:
    gen = torch.Generator().manual_seed(0)
    info = kernels.isa_info()
    busy_before = other_load()
    bandwidth = copy_bandwidth(args.rounds)
    print_setup(rounds=args.rounds, cycle_mib=args.cycle_mib, isa=info["auto"], cpu_isas=info["cpu"],
                other_load_before=f"{busy_before:.0%}")
    print(f"last-level cache {last_level_cache_mib()} MiB; memory copy bandwidth: {bandwidth:.1f} GB/s "
          f"(float32 tensor copy_ of max(512 MiB, the cache) on huge pages, read + write bytes, median "
          f"of {args.rounds})")
    shape_tables(args, bandwidth, gen)
    crossover_table(args, gen)
    print(f"\nCPU busy with other processes, 2 s before / after the run: {busy_before:.0%} / {other_load():.0%} "
          "(above a few % means the timings were taken with other load present)")


class Tee(io.TextIOBase):
    """Writes to several streams: the table goes to the terminal and to --out."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


if __name__ == "__main__":
    main()
