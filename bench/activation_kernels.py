"""Activation sparsity at the kernel level: the column-layout kernels (``kernels.column_matmul``) against our row
kernels at the same precision, batch 1, in the memory-bound regime of decoding.

    .venv/bin/python bench/activation_kernels.py [--rounds 7] [--activations 0.25 0.4 0.5] [--dtype bfloat16]

Shapes: the four products of a decoder block (fused q/k/v, o, fused gate/up, down) of the TinyLlama-1.1B
geometry and of the default model. Variants: our dense row kernel (the runtime's dense baseline), our 50%
bitmask row kernel, and the column layouts (dense and 50% bitmask) at each activation sparsity, where that share
of the input entries (random positions: TEAL's zeros follow the input, not the layout) falls below the
threshold. Every variant cycles over enough distinct matrices (> ``--cycle-mib``) that each product streams its
weights from DRAM; variants alternate within each round in a rotating order; medians over rounds. The bytes
bound of each variant is the weight bytes it must read (a column layout: the share of its bytes that belongs to
the active inputs: their values and, for the bitmask, their masks and bases) against the dense row kernel's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import copy_bandwidth, half_name, markdown_table, print_setup, streamed_mib  # noqa: E402
from runtime_kernels import MIB, mask_at, measure  # noqa: E402

from sparseforge import kernels  # noqa: E402
from sparseforge.kernels.columns import PreparedColumns  # noqa: E402
from sparseforge.kernels.pages import on_huge_pages  # noqa: E402


SHAPES = {"TinyLlama-1.1B geometry": ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)),
          "default model": ((960, 576), (576, 576), (3072, 576), (576, 1536))}


def column_bytes(packed, active: float) -> float:
    """Weight bytes a column product reads when a share ``active`` of the inputs is nonzero."""
    return packed.nbytes * active


def variants_for(shape, activations, cycle_mib: int, dtype: torch.dtype, gen) -> tuple[dict, int]:
    """name -> (operands, call, bytes read), and the matrices cycled. Every product is bound once per matrix and
    its tensors are on huge pages, as the runtime holds them (``PreparedMatmul``, ``PreparedColumns``,
    ``on_huge_pages``)."""
    count = max(2, math.ceil(cycle_mib * MIB / (shape[0] * shape[1] * 2)))
    weights = [torch.randn(shape, generator=gen) for _ in range(count)]
    masks = [mask_at(shape, 0.5, gen) for _ in range(count)]
    rows_dense = [on_huge_pages(kernels.pack_dense(w, dtype)) for w in weights]
    rows_bitmask = [on_huge_pages(kernels.pack_bitmask(w, m, dtype)) for w, m in zip(weights, masks)]
    columns_dense = [on_huge_pages(kernels.pack_columns(w, None, dtype)) for w in weights]
    columns_bitmask = [on_huge_pages(kernels.pack_columns(w, m, dtype)) for w, m in zip(weights, masks)]
    half = half_name(dtype)
    variants = {f"row dense {half}": ([kernels.PreparedMatmul(p) for p in rows_dense], lambda product, x: product(x),
                                      rows_dense[0].nbytes),
                "row bitmask 50%": ([kernels.PreparedMatmul(p) for p in rows_bitmask], lambda product, x: product(x),
                                    rows_bitmask[0].nbytes)}
    for sparsity in activations:
        for label, packed in (("dense", columns_dense), ("bitmask 50%", columns_bitmask)):
            variants[f"column {label}, activations {sparsity:.0%}"] = (
                [PreparedColumns(p, None, sparsity) for p in packed], lambda product, x: product(x),
                column_bytes(packed[0], 1 - sparsity))
    return variants, count


def activation_input(in_features: int, gen) -> torch.Tensor:
    """A row whose magnitudes are a random permutation of evenly spaced values in (0, 1]: threshold s zeroes a
    share s of the inputs, at random positions."""
    magnitudes = (torch.randperm(in_features, generator=gen).float() + 1) / in_features
    signs = torch.where(torch.rand(in_features, generator=gen) < 0.5, -1.0, 1.0)
    return (magnitudes * signs)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", type=float, nargs="+", default=[0.0, 0.4, 0.5])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cycle-mib", type=int, default=streamed_mib(),
                        help="weight bytes each variant cycles over (default: twice the last-level cache)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                        help="16-bit type of every variant's weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "activation_kernels.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    lines = [f"setup: {print_setup(bench='activation_kernels', activations=args.activations, rounds=args.rounds, cycle_mib=args.cycle_mib, threads=args.threads, dtype=args.dtype, huge_pages=True, kernels=kernels.isa_info())}"]
    bandwidth = copy_bandwidth()
    lines.append(f"memory copy bandwidth: {bandwidth:.1f} GB/s")
    for model, shapes in SHAPES.items():
        totals: dict[str, list[float]] = {}
        for shape in shapes:
            variants, count = variants_for(shape, args.activations, args.cycle_mib, dtype, gen)
            # one x for all: magnitudes spread evenly in (0, 1], so each column variant's threshold (its activation
            # sparsity, closed over by its call) zeroes that share of the inputs
            timed = measure(variants, activation_input(shape[1], gen), args.rounds)
            dense = f"row dense {half_name(dtype)}"
            base, base_bytes = timed[dense], variants[dense][2]
            rows = []
            for name, (_, _, nbytes) in variants.items():
                totals.setdefault(name, [0.0, 0.0, 0.0])
                totals[name][0] += timed[name]
                totals[name][1] += nbytes
                totals[name][2] += base_bytes
                rows.append([name, f"{timed[name] * 1e6:.1f}", f"{nbytes / MIB:.2f}",
                             f"{nbytes / timed[name] / 1e9:.1f}", f"{base / timed[name]:.2f}x",
                             f"{base_bytes / nbytes:.2f}x", f"{base / timed[name] / (base_bytes / nbytes):.2f}"])
            lines.append(f"\n### {model}: {shape[0]} x {shape[1]} (out x in), batch 1, {count} matrices cycled\n")
            lines.append(markdown_table(["variant", "us / matvec", "MiB read", "GB/s", "vs row dense",
                                         "bytes bound", "measured / bound"], rows))
            print("\n".join(lines[-2:]), flush=True)
            del variants
        base_time = totals[f"row dense {half_name(dtype)}"][0]
        rows = [[name, f"{base_time / t:.2f}x", f"{dense_bytes / b:.2f}x", f"{base_time / t / (dense_bytes / b):.2f}"]
                for name, (t, b, dense_bytes) in totals.items()]
        lines.append(f"\n### {model}: one block's four products together\n")
        lines.append(markdown_table(["variant", "vs row dense", "bytes bound", "measured / bound"], rows))
        print("\n".join(lines[-2:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
