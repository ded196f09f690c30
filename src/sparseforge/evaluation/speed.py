"""Prefill and decode throughput, measured the way the evaluation protocol pins it.

Stated: batch size, prompt length, new tokens, threads, dtype and device. Each measurement is repeated and the
median reported; a warm-up run comes first. To compare a dense and a compressed model, measure both in the same
process with :func:`compare_speed`, which alternates them so that drift (thermal, other load) hits both alike.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _prefill_seconds(model, ids: torch.Tensor) -> float:
    _sync(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding of ``new_tokens`` after the prompt, with the KV cache; prompt time excluded."""
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - start


def _setup(model, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    param = next(model.parameters())
    return {"batch_size": batch_size, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device), "statistic": "median"}


def _prompt(model, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(3, vocab, (batch_size, prompt_len), generator=generator).to(param.device)


def compare_speed(models: dict[str, torch.nn.Module], batch_size: int = 1, prompt_len: int = 128,
                  new_tokens: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Measure several models alternately in one process; returns setup plus tokens/s per model."""
    first = next(iter(models.values()))
    ids = _prompt(first, batch_size, prompt_len, seed)
    timings = {name: {"prefill": [], "decode": []} for name in models}
    for model in models.values():  # warm-up
        _prefill_seconds(model, ids)
        _decode_seconds(model, ids, min(new_tokens, 4))
    for _ in range(repeats):
        for name, model in models.items():
            timings[name]["prefill"].append(_prefill_seconds(model, ids))
            timings[name]["decode"].append(_decode_seconds(model, ids, new_tokens))
    results = {}
    for name, t in timings.items():
        prefill = statistics.median(t["prefill"])
        decode = statistics.median(t["decode"])
        results[name] = {"prefill_tokens_per_s": batch_size * prompt_len / prefill,
                         "decode_tokens_per_s": batch_size * new_tokens / decode,
                         "prefill_s": prefill, "decode_s": decode}
    return {"setup": _setup(first, batch_size, prompt_len, new_tokens, repeats), "results": results}


def measure_speed(model: torch.nn.Module, **kwargs) -> dict:
    """Speed of one model: ``{"setup": ..., "prefill_tokens_per_s": ..., "decode_tokens_per_s": ...}``."""
    measured = compare_speed({"model": model}, **kwargs)
    return {"setup": measured["setup"], **measured["results"]["model"]}
