"""Prefill and decode throughput, measured the way the evaluation protocol pins it.

Stated: batch size, prompt length, new tokens, threads, dtype, device and the machine. Each measurement is repeated
and the median reported; a warm-up run comes first. Decoding is greedy with the KV cache, prompt time excluded. To
compare a dense and a compressed model, measure both in the same process with :func:`compare_speed`, which
alternates them so that drift (thermal, other load) hits both alike. Every later claim of a speed-up uses it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time

import torch

from ..models.cache import cache_argument, cache_of


def machine_description() -> dict:
    """What the numbers were measured on: CPU model and cores, memory, GPU (if any), torch build."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    memory_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "memory_gb": memory_gb, "gpu": gpu,
            "os": platform.platform(), "torch": torch.__version__}


@contextlib.contextmanager
def _threads(count: int | None):
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    past = cache_of(out)
    token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, **cache_argument(model, past), use_cache=True)
        past = cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - start


def _setup(model, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    param = next(model.parameters())
    return {"batch_size": batch_size, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device), "statistic": "median", "warmup": 1, "decoding": "greedy, KV cache",
            "order": "models alternated within each repeat", "machine": machine_description()}


def _prompt(model, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(3, vocab, (batch_size, prompt_len), generator=generator).to(param.device)


def compare_speed(models: dict[str, torch.nn.Module], batch_size: int = 1, prompt_len: int = 128,
                  new_tokens: int = 32, repeats: int = 5, seed: int = 0, threads: int | None = None,
                  prompt_ids: torch.Tensor | None = None) -> dict:
    """Measure several models alternately in one process; returns setup plus tokens/s per model.

    ``threads`` sets torch's intra-op threads for the measurement (default: leave as is). Ratios between models
    measured in one call are the numbers to quote; absolute tokens/s from different calls are not comparable.
    ``prompt_ids`` [batch, prompt] replaces the random prompt (input-adaptive models behave differently on text).
    """
    with _threads(threads):
        return _compare(models, batch_size, prompt_len, new_tokens, repeats, seed, prompt_ids)


def _compare(models, batch_size, prompt_len, new_tokens, repeats, seed, prompt_ids=None) -> dict:
    first = next(iter(models.values()))
    if prompt_ids is not None:
        ids = prompt_ids.to(next(first.parameters()).device)
        batch_size, prompt_len = ids.shape
    else:
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
                         "prefill_s": prefill, "decode_s": decode,
                         "weight_bytes_per_token": weight_bytes_per_token(models[name])}
    first_bytes = results[next(iter(results))]["weight_bytes_per_token"]
    for result in results.values():  # what the bytes alone would allow, against the first model
        result["bytes_bound_speedup_vs_first"] = first_bytes / result["weight_bytes_per_token"]
    return {"setup": _setup(first, batch_size, prompt_len, new_tokens, repeats), "results": results}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: what bounds batch-1 decoding. Modules that hold their weight in a
    layout of their own say so (``read_bytes``); embeddings read one row per token; everything else reads all of
    its parameters. Tied tensors count once."""
    total, seen = 0, set()
    for module in model.modules():
        if hasattr(module, "read_bytes"):
            total += module.read_bytes
            continue
        for param in module.parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding):  # one row; a tied LM head still reads all of it
                total += param[0].numel() * param.element_size()
            elif param.data_ptr() not in seen:
                seen.add(param.data_ptr())
                total += param.numel() * param.element_size()
    return total


def compare_with_settings(models: dict[str, torch.nn.Module], settings, skip=None) -> dict:
    """:func:`compare_speed` with the ``speed_*`` fields of a recipe's ``evaluate:`` or an eval session's settings;
    returns ``{name: {"setup": ..., "prefill_tokens_per_s": ..., ...}}``. ``skip``: the skip controller installed on
    the last model, whose realised skip ratio during the measurement is added to that model's entry."""
    if skip is not None:
        skip.accounting.reset()
    measured = compare_speed(models, batch_size=settings.speed_batch_size, prompt_len=settings.speed_prompt_tokens,
                             new_tokens=settings.speed_new_tokens, repeats=settings.speed_repeats,
                             threads=settings.speed_threads)
    results = {name: {"setup": measured["setup"], **result} for name, result in measured["results"].items()}
    if skip is not None:
        results[list(models)[-1]]["skip"] = skip.accounting.summary(skip.policy)
    return results


def measure_speed(model: torch.nn.Module, **kwargs) -> dict:
    """Speed of one model: ``{"setup": ..., "prefill_tokens_per_s": ..., "decode_tokens_per_s": ...}``."""
    measured = compare_speed({"model": model}, **kwargs)
    return {"setup": measured["setup"], **measured["results"]["model"]}
