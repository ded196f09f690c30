"""The native decode step: the Python path's logits to float32 rounding, a cache that stays a transformers cache,
and the original forward for every call it does not cover."""

import pytest
import torch

import sparseforge as sf
from sparseforge.models.cache import cache_argument, cache_of
from sparseforge.models.loading import load_model
from sparseforge.runtime import install_runtime
from sparseforge.runtime import native_decode

# Same weights and kernels; RMSNorm and attention sum in another order than PyTorch's: ~1e-7 of logits ~1.
CLOSE = dict(rtol=1e-5, atol=1e-5)


def _model(family="tiny-llama", pattern="unstructured", mode="sparse", native=True):
    handle = load_model(family)
    sf.prune(handle, method="magnitude", sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
             progress=False)
    runtime = install_runtime(handle, mode, log=lambda *_: None, native_decode=native)
    return handle, runtime


def _decode(handle, ids, steps=6, cache=None):
    """Greedy steps through the model's forward; returns the stacked logits of the steps and the cache."""
    logits = []
    with torch.no_grad():
        out = handle.model(input_ids=ids, use_cache=True, **({} if cache is None else
                                                              cache_argument(handle.model, cache)))
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = handle.model(input_ids=token, **cache_argument(handle.model, cache_of(out)), use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1), cache_of(out)


IDS = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family,pattern,mode", [("tiny-llama", "unstructured", "sparse"),
                                                 ("tiny-llama", "2:4", "sparse"),
                                                 ("tiny-llama", "unstructured", "dense"),
                                                 ("tiny-qwen2", "unstructured", "sparse")])  # qwen2: q/k/v biases
def test_native_steps_give_the_python_steps_logits(family, pattern, mode):
    python, _ = _decode(_model(family, pattern, mode, native=False)[0], IDS)
    handle, runtime = _model(family, pattern, mode)
    assert runtime.native_step is not None and runtime.summary()["native_decode"]
    native, _ = _decode(handle, IDS)
    assert runtime.native_step.steps == 6
    torch.testing.assert_close(native, python, **CLOSE)
    assert torch.equal(native.argmax(-1), python.argmax(-1))


def test_the_cache_stays_a_transformers_cache_after_native_steps():
    """A multi-token call (the original forward) continues from the cache the native steps filled: its logits
    are those of the whole sequence computed without a cache."""
    handle, runtime = _model()
    tail = torch.randint(0, 200, (1, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, tokens = handle.model(input_ids=IDS, use_cache=True), [IDS]
        for _ in range(4):
            tokens.append(out.logits[:, -1:].argmax(-1))
            out = handle.model(input_ids=tokens[-1], **cache_argument(handle.model, cache_of(out)), use_cache=True)
        cache = cache_of(out)
        assert cache.get_seq_length() == 16
        continued = handle.model(input_ids=tail, **cache_argument(handle.model, cache), use_cache=True).logits
        full = handle.model(input_ids=torch.cat(tokens + [tail], 1), use_cache=False).logits[:, -3:]
    assert runtime.native_step.steps == 4
    torch.testing.assert_close(continued, full, rtol=1e-4, atol=1e-4)


def test_interleaved_sequences_keep_their_own_caches():
    handle, runtime = _model()
    other = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(7))
    alone_a, _ = _decode(_model()[0], IDS, steps=3)
    alone_b, _ = _decode(_model()[0], other, steps=3)
    with torch.no_grad():
        out_a = handle.model(input_ids=IDS, use_cache=True)
        out_b = handle.model(input_ids=other, use_cache=True)
        a, b = [], []
        for _ in range(3):  # alternate: each step of one sequence takes the buffers from the other
            out_a = handle.model(input_ids=out_a.logits[:, -1:].argmax(-1),
                                 **cache_argument(handle.model, cache_of(out_a)), use_cache=True)
            out_b = handle.model(input_ids=out_b.logits[:, -1:].argmax(-1),
                                 **cache_argument(handle.model, cache_of(out_b)), use_cache=True)
            a.append(out_a.logits)
            b.append(out_b.logits)
    torch.testing.assert_close(torch.cat(a, 1), alone_a, **CLOSE)
    torch.testing.assert_close(torch.cat(b, 1), alone_b, **CLOSE)
    assert runtime.native_step.steps == 6


def test_generate_with_an_attention_mask_runs_natively_and_greedily_agrees():
    reference, _ = _model(native=False)
    handle, runtime = _model()
    with torch.no_grad():
        ours = handle.model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=10, do_sample=False)
        theirs = reference.model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=10,
                                          do_sample=False)
    assert torch.equal(ours, theirs)
    assert runtime.native_step.steps >= 8


def test_a_hook_or_a_padded_mask_sends_the_call_to_the_original_forward():
    handle, runtime = _model()
    handle.adapter.blocks()[1].mlp.register_forward_hook(lambda *_: None)
    _decode(handle, IDS, steps=2)
    assert runtime.native_step.steps == 0
    handle, runtime = _model()
    with torch.no_grad():
        out = handle.model(input_ids=IDS, use_cache=True)
        mask = torch.ones(1, 13, dtype=torch.long)
        mask[0, 0] = 0
        handle.model(input_ids=IDS[:, :1], attention_mask=mask, **cache_argument(handle.model, cache_of(out)),
                     use_cache=True)
    assert runtime.native_step.steps == 0


def test_removing_the_runtime_restores_the_model_forward():
    handle, runtime = _model()
    _, cache = _decode(handle, IDS, steps=2)
    keys = cache.layers[0].keys.clone()
    handle.detach("runtime")
    assert "forward" not in vars(handle.model)
    assert torch.equal(cache.layers[0].keys, keys)  # the cache that was served keeps its contents


def test_without_native_kernels_the_step_is_not_installed_and_says_why(monkeypatch):
    handle, _ = _model(native=False)
    monkeypatch.setattr(native_decode, "native", lambda: None)
    said = []
    assert native_decode.install_native_decode(handle, said.append) is None
    assert said and "native kernels unavailable" in said[0]
    opt = load_model("tiny-opt")
    install_runtime(opt, "dense", log=lambda *_: None)
    said.clear()
    assert native_decode.install_native_decode(opt, said.append) is None and "family opt" in said[0]
