"""How large tensors are allocated while streamed pruning runs: time, resident peak and page faults.

Streamed pruning (``prune --streamed``) asks for the same few large sizes thousands of times (the batches'
hidden states and FFN intermediates). Three ways to serve them, each in its own process, the default model's
llm-compressor comparison job (64 x 512 calibration windows, export written):

* ``recycling``: what streaming does (``sparseforge.kernels.recycling``: tensors of 1 MiB or more from their
  own maps, freed ones kept for the next request of about the same size, never more kept than
  the peak of live memory);
* ``map-per-request``: glibc's mmap threshold fixed at 1 MiB, every large tensor mapped and unmapped (what
  streaming did before, and still does where the native extension cannot be built);
* ``glibc-default``: glibc's adaptive threshold, large tensors carved from its heap.

::

    ../.venv/bin/python allocators.py [--methods wanda sparsegpt] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("recycling", "map-per-request", "glibc-default")


def worker(mode: str, method: str, calibration: str, out: str, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file

    import sparseforge as sf
    import sparseforge.streaming.prune as streaming
    from sparseforge.memory import map_large_allocations, peak_resident_mb

    torch.set_num_threads(threads)
    if mode != "recycling":  # the streamed path with its allocation scope replaced
        streaming.recycled_large_allocations = lambda: contextlib.nullcontext()
        if mode == "map-per-request":
            map_large_allocations()
    windows = load_file(calibration)["input_ids"]
    start = time.perf_counter()
    report = sf.prune_streamed("default", out, method=method, sparsity=0.5, calibration=windows, overwrite=True,
                               restart=True, progress=False)
    return {"mode": mode, "method": method, "blocks_s": report["seconds"],
            "total_s": round(time.perf_counter() - start, 1), "process_peak_mib": round(peak_resident_mb()),
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
            "recycled": report["memory"].get("recycled_allocations")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every cell (the rounds alternate modes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseforge-allocators"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "allocators.md")
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads)))
        return
    sys.path.insert(0, str(HERE))
    from safetensors.torch import save_file

    import sparseforge as sf
    from _common import markdown_table, print_setup
    from sparseforge.calibration.data import calibration_data

    args.work.mkdir(parents=True, exist_ok=True)
    calibration = args.work / "calibration-64x512.safetensors"
    save_file({"input_ids": calibration_data(sf.load_model("default"), "default", 64, 512, 0)}, str(calibration))
    setup = print_setup(bench="allocators", model="default", job="streamed prune, 50%, export written",
                        nsamples=64, seqlen=512, seed=0, rounds=args.rounds)
    cells: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for method in args.methods:
            for mode in args.modes:
                line = subprocess.run([sys.executable, __file__, "--worker", mode, method, str(calibration),
                                       str(args.work / "out"), "--threads", str(args.threads)],
                                      capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                print(line, flush=True)
                cells.setdefault((method, mode), []).append(json.loads(line))
    rows = []
    for (method, mode), runs in cells.items():
        median = {k: statistics.median(r[k] for r in runs) for k in ("blocks_s", "total_s", "process_peak_mib",
                                                                      "minor_faults")}
        recycled = runs[-1]["recycled"]
        rows.append([method, mode, f"{median['blocks_s']:.1f}", f"{median['total_s']:.1f}",
                     f"{median['process_peak_mib']:.0f}", f"{median['minor_faults'] / 1e6:.1f}",
                     f"{recycled['reused']} / {recycled['mapped']}" if recycled else "-"])
    table = markdown_table(["method (50%)", "large allocations", "s blocks", "s all (export included)",
                            "process peak MiB", "minor page faults (millions)", "recycled: reused / mapped"], rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"setup: {json.dumps(setup)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
