"""Write a dense checkpoint with exact zeros in compressed-tensors' legacy sparse layouts, with compressed-tensors
itself (0.14.0.1, the last release that ships the sparse compressors), so sparseforge's reader is tested against the
real writer rather than against our reading of its layout.

Runs with the interpreter of `~/.cache/sparseforge/ct-legacy-venv` (see `interop.py`, which builds it); it must
not import sparseforge. The last line on stdout is one JSON object.

    python compressed_tensors_worker.py --model DENSE_DIR --out OUT_DIR --format sparse-bitmask|sparse-24-bitmask
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a dense Hugging Face directory whose zeros are the mask")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", required=True, choices=["sparse-bitmask", "sparse-24-bitmask"])
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype="auto")
    structure = "2:4" if args.format == "sparse-24-bitmask" else "unstructured"
    config = SparsityCompressionConfig.load_from_registry(args.format, targets=["Linear"], ignore=["lm_head"],
                                                          sparsity_structure=structure)
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=config)
    state = compressor.compress(model)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    compressor.update_config(str(out))
    for name in Path(args.model).iterdir():  # tokenizer files travel unchanged
        if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(name, out / name.name)
    compressed = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".bitmask")})
    print(json.dumps({"compressed_tensors": compressed_tensors.__version__, "format": args.format,
                      "compressed_modules": len(compressed), "dtype": str(model.dtype)}))


if __name__ == "__main__":
    sys.stdout.flush()
    main()
