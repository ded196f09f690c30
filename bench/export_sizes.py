"""Checkpoint size of a pruned model in every export format, with a bit-exact round-trip check.

    .venv/bin/python bench/export_sizes.py [--model default]

For each pattern (unstructured 50%, 2:4) and dtype (float16, float32) the script exports the same pruned model as
dense, bitmask and nm (where exact) and reloads each export. "Bit-exact" means every reloaded tensor equals the
in-memory model's tensor cast to the export dtype, and the logits equal those of the reloaded dense export.
Ratios are against the dense export of the same dtype, for the whole weight file and for the pruned linear
weights alone (embeddings and norms are never pruned, so they bound the whole-file saving).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import sparseforge as sf
from _common import markdown_table, print_setup
from sparseforge.evaluation.stats import pruned_weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    print_setup(model=args.model, sparsity=0.5, patterns=["unstructured", "2:4"], dtypes=["float16", "float32"])
    base = sf.load_model(args.model)
    prompt = base.tokenizer("The capital of France is", return_tensors="pt").input_ids
    rows = []
    for pattern in ("unstructured", "2:4"):
        handle = sf.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source)
        sf.prune(handle, sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern, progress=False)
        for dtype in ("float16", "float32"):
            target = getattr(torch, dtype)
            expected = {k: v.to(target) if v.is_floating_point() else v for k, v in handle.model.state_dict().items()}
            reference_logits = None
            sizes = {}
            with tempfile.TemporaryDirectory() as tmp:
                for fmt in ("dense", "bitmask", "nm"):
                    if fmt == "nm" and pattern == "unstructured":
                        continue
                    out = Path(tmp) / fmt
                    description = sf.save_model(handle, out, format=fmt, dtype=dtype)
                    reloaded = sf.load_model(str(out))
                    with torch.no_grad():
                        logits = reloaded.model(prompt).logits
                    reference_logits = logits if reference_logits is None else reference_logits
                    exact = torch.equal(logits, reference_logits) and all(
                        torch.equal(v, expected[k]) for k, v in reloaded.model.state_dict().items())
                    sizes[fmt] = ((out / description["weights"]).stat().st_size, pruned_weight_bytes(out, description),
                                  exact)
                auto = sf.save_model(handle, Path(tmp) / "auto", format="auto", dtype=dtype)["format"]
            dense_file, dense_pruned, _ = sizes["dense"]
            for fmt, (file_bytes, pruned_bytes, exact) in sizes.items():
                rows.append([pattern, dtype, fmt + (" (auto)" if fmt == auto else ""), f"{file_bytes / 2**20:.1f}",
                             f"{file_bytes / dense_file:.3f}", f"{pruned_bytes / dense_pruned:.3f}",
                             "yes" if exact else "NO"])
    print(markdown_table(["pattern", "dtype", "format", "weights MiB", "file / dense", "pruned linears / dense",
                          "bit-exact reload"], rows))


if __name__ == "__main__":
    main()
