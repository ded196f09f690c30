"""Prefill and decode throughput of a dense model and its pruned versions, measured alternately in one process.

    .venv/bin/python bench/speed.py [--model default] [--repeats 5]

Pruned weights are stored as dense tensors with zeros here, so on a CPU with dense kernels no speed-up is expected:
this benchmark exists to say so with numbers, and to be the baseline that sparse kernels (2:4 on GPU) and
structural shrinking must beat. A second copy of the dense model is measured as a control, so the table shows how
far two identical models drift apart on this machine.
"""

from __future__ import annotations

import argparse
import copy

import torch

import sparseforge as sf
from _common import markdown_table, print_setup
from sparseforge.evaluation.speed import compare_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = sf.load_model(args.model)
    # a second copy of the dense model is the control: its ratio to "dense" is this machine's noise floor
    models = {"dense": base.model, "dense (control copy)": copy.deepcopy(base.model)}
    for name, pattern, sparsity in (("magnitude 50%", "unstructured", 0.5), ("magnitude 2:4", "2:4", None)):
        handle = sf.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source)
        sf.prune(handle, sparsity=sparsity, pattern=pattern, progress=False)
        models[name] = handle.model
    result = compare_speed(models, batch_size=args.batch_size, prompt_len=args.prompt, new_tokens=args.new_tokens,
                           repeats=args.repeats)
    print_setup(model=args.model, **result["setup"], device_name=torch.device("cpu").type)
    dense = result["results"]["dense"]
    rows = [[name, f"{r['prefill_tokens_per_s']:.1f}", f"{r['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x",
             f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x"]
            for name, r in result["results"].items()]
    print(markdown_table(["model", "prefill tok/s", "vs dense", "decode tok/s", "vs dense"], rows))


if __name__ == "__main__":
    main()
