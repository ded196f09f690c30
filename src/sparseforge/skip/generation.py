"""Text generation with whatever skip policy is installed, and the accounting of what it skipped."""

from __future__ import annotations

import torch

from ..errors import SkipError
from ..models.handle import LoadedModel


def generate(handle: LoadedModel, prompts: str | list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Generate from one prompt or a batch (left-padded) through ``transformers`` ``generate`` with the KV cache.

    Returns ``{"texts": [...], "skip": accounting summary or None}``; the accounting covers this call only.
    """
    tokenizer = handle.require_tokenizer("generation")
    controller = handle.skip
    if max_new_tokens < 1:
        raise SkipError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
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
