"""Greedy tokens and decode speed of GGUF files in llama.cpp (through llama-cpp-python), for `interop.py`.

Runs with the interpreter of `~/.cache/sparseforge/llamacpp-venv`; it must not import sparseforge or torch. The
prompts arrive as token ids (so the comparison with sparseforge does not depend on two tokenizers agreeing; their
texts are tokenized here too, to report whether they do). Speed: the models are timed in alternating rounds in this
one process, decode tokens per second after the prompt, median of the rounds. The last stdout line is one JSON
object.

    python llamacpp_worker.py --spec spec.json     # {"models": {label: path}, "prompts": [{"text", "ids"}], ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from llama_cpp import Llama


def _greedy(model: Llama, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """``new_tokens`` greedy tokens after ``ids``; returns them and the decode seconds after the first token."""
    model.reset()
    out: list[int] = []
    start = None
    for token in model.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if start is None:
            start = time.perf_counter()  # the first token comes after the prompt's prefill
        if len(out) == new_tokens:
            break
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    spec = json.loads(open(args.spec).read())
    threads = int(spec.get("threads", os.cpu_count()))
    models = {label: Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
              for label, path in spec["models"].items()}
    result = {"threads": threads, "tokens": {}, "tokenized": {}, "decode_tokens_per_s": {}}
    for label, model in models.items():
        result["tokens"][label] = [_greedy(model, p["ids"], spec["new_tokens"])[0] for p in spec["prompts"]]
        result["tokenized"][label] = [model.tokenize(p["text"].encode(), add_bos=False, special=False)
                                      for p in spec["prompts"]]
    rates: dict[str, list[float]] = {label: [] for label in models}
    prompt = spec["prompts"][0]["ids"]
    for _ in range(spec["repeats"]):
        for label, model in models.items():  # alternating: drift in the machine's speed hits every model alike
            _, seconds = _greedy(model, prompt, spec["speed_tokens"])
            rates[label].append((spec["speed_tokens"] - 1) / seconds)
    result["decode_tokens_per_s"] = {label: statistics.median(r) for label, r in rates.items()}
    result["decode_rounds"] = rates
    import llama_cpp

    result["llama_cpp_python"] = llama_cpp.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    sys.stdout.flush()
    main()
