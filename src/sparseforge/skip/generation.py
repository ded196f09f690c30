"""Text generation with whatever skip policy is installed, and the accounting of what it skipped."""

from __future__ import annotations

import math

import torch

from ..errors import SkipError
from ..models.handle import LoadedModel


def check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, seed: int) -> None:
    """Refuse settings that transformers would crash on or silently misread."""
    if max_new_tokens < 1:
        raise SkipError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= seed < 2**63:
        raise SkipError(f"seed must be in [0, 2**63), got {seed}")
    if do_sample:
        if not (math.isfinite(temperature) and temperature > 0):
            raise SkipError(f"temperature must be a positive number, got {temperature}")
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise SkipError(f"top-p must be in (0, 1], got {top_p}")


def generate(handle: LoadedModel, prompts: str | list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Generate from one prompt or a batch (left-padded) through ``transformers`` ``generate`` with the KV cache.

    Returns ``{"texts": [...], "skip": accounting summary or None}``; the accounting covers this call only.
    """
    tokenizer = handle.require_tokenizer("generation")
    controller = handle.attachment("skip")
    check_sampling(max_new_tokens, do_sample, temperature, top_p, seed)
    if controller is not None and controller.policy.warmup >= max_new_tokens:
        raise SkipError(f"warm-up of {controller.policy.warmup} tokens is not shorter than the {max_new_tokens} "
                        "tokens to generate: the policy would never act")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or any(not t for t in texts):
        raise SkipError("empty prompt: give the text to continue")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
    finally:
        tokenizer.padding_side = previous_side
    limit = handle.position_limit
    if limit and batch["input_ids"].shape[1] + max_new_tokens > limit:
        raise SkipError(f"the prompt ({batch['input_ids'].shape[1]} tokens) plus {max_new_tokens} new tokens exceeds "
                        f"the {limit} positions this {handle.model_type} model can encode")
    device = next(handle.model.parameters()).device
    if controller is not None:
        controller.accounting.reset()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    with torch.no_grad():
        out = handle.model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad, **sampling)
    new = out[:, batch["input_ids"].shape[1]:].cpu()
    return {"texts": tokenizer.batch_decode(new, skip_special_tokens=True), "tokens": new,
            "skip": controller.accounting.summary(controller.policy) if controller is not None else None}
