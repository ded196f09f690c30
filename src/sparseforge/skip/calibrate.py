"""Calibrating a skip policy: cold regions, threshold and ``k`` for a requested skip ratio, and baselines that skip
the same amount in the non-adaptive ways.

1. The dense model continues ``nsamples`` calibration prompts greedily (``new_tokens`` each); the prompt plus that
   continuation is the calibration text.
2. One teacher-forced pass with a never-skipping policy measures every layer's mean similarity over the positions
   the policy would govern (and keeps the dense next-token distributions there).
3. Cold regions (unless given): the leading and trailing layers whose mean similarity is below the
   ``cold_quantile`` of all layers' means, at least one at each end; and, as a second candidate, a quarter of
   the layers at each end.
4. For each candidate ``k`` and cold region, the threshold is bisected until the skip ratio on the calibration
   text is within ``tolerance`` of the target (teacher-forced, which is exactly what decoding these tokens would
   do). Among the candidates that reach it, the one whose next-token distributions stay closest to the dense
   model's wins (mean KL divergence; top-1 agreement breaks ties). KL rather than agreement: on the default model at
   10% skipping, top-1 agreement differed by 0.015 between k values (noise on 768 positions) while KL differed by
   1.5x, and the agreement-chosen policy (k=4) was far worse on held-out perplexity.
5. The chosen policy then generates from the calibration prompts for real, and the ratio realised there is
   recorded next to the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import SkipError
from ..models.fingerprint import model_fingerprint
from ..models.handle import LoadedModel
from ..calibration.data import calibration_data
from .policy import SkipPolicy, max_adaptive_ratio
from .runtime import SkipController, install_policy, uninstall_policy

K_CANDIDATES = (1, 2, 4)
BISECTION_STEPS = 10


@dataclass
class CalibrationText:
    """Calibration prompts and their dense continuations, with what the dense model predicts on them."""

    sequences: torch.Tensor  # [n, prompt + new] token ids
    prompt_tokens: int
    dense_prefix: int  # positions before this run densely (prompt + warm-up)
    dense_log_probs: torch.Tensor  # [n, governed positions, vocab]
    similarity: list[float] = field(default_factory=list)  # per layer, mean over governed positions
    similarity_low: list[float] = field(default_factory=list)  # per layer, over single tokens
    similarity_high: list[float] = field(default_factory=list)


def _generate_greedy(handle: LoadedModel, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokenizer = handle.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    device = next(handle.model.parameters()).device
    return handle.model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad).cpu()


@torch.no_grad()
def _score(controller: SkipController, text: CalibrationText, batch_size: int = 8) -> tuple[torch.Tensor, float]:
    """Log-probabilities at the governed positions under ``controller``'s policy, and the skip ratio there."""
    model = controller.adapter.model
    device = next(model.parameters()).device
    controller.accounting.reset()
    outputs = []
    with controller.scoring(text.dense_prefix):
        for start in range(0, len(text.sequences), batch_size):
            logits = model(input_ids=text.sequences[start:start + batch_size].to(device), use_cache=False).logits
            outputs.append(torch.log_softmax(logits[:, text.dense_prefix - 1:-1].float(), dim=-1).cpu())
    return torch.cat(outputs), controller.accounting.ratio


def prepare_text(handle: LoadedModel, warmup: int, calibration="default", nsamples: int = 8,
                 prompt_tokens: int = 48, new_tokens: int = 32, seed: int = 0) -> CalibrationText:
    """Steps 1-2: calibration text, per-layer similarity, and the dense predictions to compare with."""
    if new_tokens <= warmup:
        raise SkipError(f"warm-up {warmup} leaves nothing to calibrate in {new_tokens} new tokens: "
                        "generate more tokens or shorten the warm-up")
    prompts = calibration_data(handle, calibration, nsamples, prompt_tokens, seed)
    sequences = _generate_greedy(handle, prompts, new_tokens)
    text = CalibrationText(sequences, prompts.shape[1], prompts.shape[1] + warmup, torch.empty(0))
    recorder = SkipController(handle, SkipPolicy(threshold=2.0, cold_start=0, cold_end=0, warmup=warmup))
    recorder.record_similarity = True
    try:
        text.dense_log_probs, _ = _score(recorder, text)
        text.similarity = [float(s) for s in recorder.accounting.mean_similarity()]
        text.similarity_low = list(recorder.accounting.similarity_low)
        text.similarity_high = list(recorder.accounting.similarity_high)
    finally:
        recorder.remove()
    return text


def choose_cold_regions(similarity: list[float], quantile: float = 0.25) -> tuple[int, int]:
    """Leading and trailing layers below the ``quantile`` of the per-layer mean similarities (at least one each)."""
    level = float(torch.tensor(similarity).quantile(quantile))
    start = next((i for i, s in enumerate(similarity) if s > level), len(similarity))
    end = next((i for i, s in enumerate(reversed(similarity)) if s > level), len(similarity))
    return max(start, 1), max(end, 1)


def _agreement(log_probs: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with the dense model and mean KL(dense || policy) per position."""
    agree = float((log_probs.argmax(-1) == dense.argmax(-1)).float().mean())
    kl = float((dense.exp() * (dense - log_probs)).sum(-1).mean())
    return agree, kl


def _bisect_threshold(controller: SkipController, text: CalibrationText, target: float, tolerance: float,
                      low: float, high: float) -> dict:
    """Threshold whose ratio is closest to ``target`` (ratio falls as the threshold rises)."""
    best = None
    for _ in range(BISECTION_STEPS):
        threshold = (low + high) / 2
        controller.policy.threshold = threshold
        log_probs, ratio = _score(controller, text)
        if best is None or abs(ratio - target) < abs(best["ratio"] - target):
            best = {"threshold": threshold, "ratio": ratio, "log_probs": log_probs}
        if abs(ratio - target) <= tolerance:
            break
        if ratio > target:
            low = threshold
        else:
            high = threshold
    return best


def check_skip_request(num_layers: int, target: float, cold_start: int | None, cold_end: int | None) -> None:
    """Refuse a target no policy can reach, before any work (automatic cold regions count as their minimum, one
    layer at each end)."""
    if not 0 < target < 1:
        raise SkipError(f"target skip ratio {target:g} is outside (0, 1)")
    start = 1 if cold_start is None else cold_start
    end = 1 if cold_end is None else cold_end
    if start + end >= num_layers:
        raise SkipError(f"cold regions {start} + {end} cover all {num_layers} layers: no FFN is left to skip")
    reachable = max_adaptive_ratio(num_layers, start, end)
    if target > reachable:
        raise SkipError(f"target {target:g} cannot be reached with cold regions {start} + {end} on {num_layers} "
                        f"layers: at most {reachable:.3f}")


def cold_region_candidates(similarity: list[float], quantile: float, cold_start: int | None,
                           cold_end: int | None) -> list[tuple[int, int]]:
    """Cold regions to try: the similarity-based choice, and a quarter of the layers at each end (which keeps
    skipping in the middle layers, where saturation is expected); a region the user gave is kept as given."""
    auto = choose_cold_regions(similarity, quantile)
    quarter = max(len(similarity) // 4, 1)
    options = [(auto[0], auto[1]), (max(auto[0], quarter), max(auto[1], quarter))]
    chosen = [(auto_start if cold_start is None else cold_start, auto_end if cold_end is None else cold_end)
              for auto_start, auto_end in options]
    return list(dict.fromkeys(chosen))


def calibrate_skip(handle: LoadedModel, target: float, k: int | None = None, similarity: str = "residual",
                   cold_start: int | None = None, cold_end: int | None = None, warmup: int = 0,
                   calibration="default", nsamples: int = 8, prompt_tokens: int = 48, new_tokens: int = 32,
                   seed: int = 0, tolerance: float = 0.005, cold_quantile: float = 0.25,
                   progress: bool = True) -> SkipPolicy:
    """Find an adaptive policy that skips ``target`` of all FFN blocks on calibration text, and install it.

    Candidates: ``k`` in 1, 2, 4 (unless given) x the cold regions of :func:`cold_region_candidates` (unless
    given). Each gets the threshold that hits the target; the one whose next-token distributions stay closest to
    the dense model's (KL divergence, then top-1 agreement) wins.
    """
    num_layers = handle.adapter.num_blocks
    check_skip_request(num_layers, target, cold_start, cold_end)
    started = time.perf_counter()
    uninstall_policy(handle)
    text = prepare_text(handle, warmup, calibration, nsamples, prompt_tokens, new_tokens, seed)
    regions = [(start, end) for start, end in cold_region_candidates(text.similarity, cold_quantile, cold_start,
                                                                      cold_end)
               if start + end < num_layers and target <= max_adaptive_ratio(num_layers, start, end)]
    if not regions:  # the automatic cold regions leave too little: say so with the numbers of the first choice
        start, end = cold_region_candidates(text.similarity, cold_quantile, cold_start, cold_end)[0]
        check_skip_request(num_layers, target, start, end)
    grid = [(k_value, start, end) for start, end in regions for k_value in ([k] if k else K_CANDIDATES)]
    candidates = []
    for k_value, start, end in tqdm(grid, desc="calibrating skip policy", disable=not progress):
        policy = SkipPolicy(threshold=1.0, k=k_value, similarity=similarity, cold_start=start, cold_end=end,
                            warmup=warmup)
        # the threshold lies between the lowest and highest similarity of any token in the eligible layers (below:
        # skip as much as k allows; above: nothing), so the bisection spends its steps where the ratio changes
        low = min(text.similarity_low[start:num_layers - end]) - 1e-6
        high = max(text.similarity_high[start:num_layers - end]) + 1e-6
        controller = SkipController(handle, policy)
        try:
            best = _bisect_threshold(controller, text, target, tolerance, low, high)
        finally:
            controller.remove()
        agree, kl = _agreement(best.pop("log_probs"), text.dense_log_probs)
        candidates.append({"k": k_value, "cold_start": start, "cold_end": end, **best, "agreement": agree,
                           "kl": kl, "reached": abs(best["ratio"] - target) <= tolerance})
    reached = [c for c in candidates if c["reached"]] or sorted(candidates, key=lambda c: abs(c["ratio"] - target))[:1]
    chosen = min(reached, key=lambda c: (c["kl"], -c["agreement"]))
    policy = SkipPolicy(threshold=chosen["threshold"], k=chosen["k"], similarity=similarity,
                        cold_start=chosen["cold_start"], cold_end=chosen["cold_end"], warmup=warmup,
                        model=model_fingerprint(handle.adapter))
    policy.calibration = {
        "target": target, "ratio_teacher_forced": chosen["ratio"], "agreement": chosen["agreement"],
        "kl": chosen["kl"], "candidates": candidates, "similarity": text.similarity,
        "cold": {"auto": list(choose_cold_regions(text.similarity, cold_quantile)), "quantile": cold_quantile},
        "text": {"data": calibration if isinstance(calibration, str) else "tensor", "nsamples": len(text.sequences),
                 "prompt_tokens": text.prompt_tokens, "new_tokens": new_tokens, "seed": seed}}
    controller = install_policy(handle, policy)
    controller.accounting.reset()
    _generate_greedy(handle, text.sequences[:, :text.prompt_tokens], new_tokens)  # the policy is active now
    policy.calibration["ratio_in_generation"] = controller.accounting.ratio
    controller.accounting.reset()
    handle.history.append({"stage": "skip", "method": policy.mode, "policy": policy.model_dump(mode="json"),
                           "seconds": round(time.perf_counter() - started, 1)})
    return policy


def matched_baseline(policy: SkipPolicy, mode: str, ratio: float | None = None, seed: int = 0) -> SkipPolicy:
    """A non-adaptive policy skipping the same share of FFN blocks as ``policy`` (``ratio``: default its target).

    ``static``: the FFNs with the highest calibration similarity; ``random``: each FFN outside the cold regions with
    the probability giving that ratio; ``early_exit``: everything after the layer that leaves as many FFNs.
    """
    similarity = policy.calibration.get("similarity")
    if not similarity:
        raise SkipError("a matched baseline needs a calibrated policy (its per-layer similarities)")
    num_layers = len(similarity)
    ratio = policy.calibration["target"] if ratio is None else ratio
    count = max(1, round(ratio * num_layers))
    common = {"warmup": policy.warmup, "model": policy.model, "calibration": {"matched_to": ratio, "mode": mode}}
    if mode == "static":
        ranked = sorted(range(num_layers), key=lambda layer: -similarity[layer])
        return SkipPolicy(mode="static", layers=sorted(ranked[:count]), **common)
    if mode == "random":
        eligible = num_layers - policy.cold_start - policy.cold_end
        return SkipPolicy(mode="random", probability=min(1.0, ratio * num_layers / eligible), seed=seed,
                          cold_start=policy.cold_start, cold_end=policy.cold_end, **common)
    if mode == "early_exit":
        return SkipPolicy(mode="early_exit", exit_layer=num_layers - 1 - count, **common)
    raise SkipError(f"unknown baseline '{mode}'; available: static, random, early_exit")
