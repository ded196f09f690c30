"""Put a loaded model in the sparse runtime: every pruned linear becomes a :class:`~.linear.SparseLinear`.

``mode``:

* ``sparse``: every block linear with a recorded mask is held compressed: N:M layout when its mask is exactly N of
  every M (M in 4, 8, 16), the bitmask layout otherwise. Refused when the model has no masks.
* ``dense``: every block linear is held in the same runtime's dense fp16/bf16 layout: the baseline that isolates
  what sparsity gains from what the precision change gains.
* with activation thresholds on the model (``activation_sparsity``, TEAL): every block linear in a column layout
  (dense, or a bitmask of the kept weights under ``sparse``/``auto``) whose product zeroes the inputs below its
  threshold and reads only the weights of the inputs left (:mod:`sparseforge.kernels.columns`).
* ``auto``: per layer, whichever of the two is faster at batch 1 on this machine, timed once per (shape, layout,
  density, threads) with the cache flushed before every call, since decoding streams weights from memory. A model
  without masks falls back to dense, saying so.

The LM head runs in the runtime's dense kernel too, and plain embeddings are held in half precision (sharing a
tied head's matrix). Whatever the loaded dtype, the model then computes its activations in float32: the weights
keep their half-precision layouts, and CPU half-precision elementwise ops are the slower ones.
The runtime is an attachment of kind ``runtime``; it is for inference and refuses to be saved (export the model
before putting it in the runtime).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..dtypes import resolve_dtype
from ..errors import SparseforgeError
from ..evaluation.speed import weight_bytes_per_token
from ..kernels import ColumnWeight, PackedWeight, PreparedMatmul, pack_bitmask, pack_columns, pack_dense, pack_nm
from ..kernels.layouts import NM_GROUP_SIZES
from ..kernels.pages import on_huge_pages
from ..models.adapters.base import set_path
from ..models.handle import LoadedModel
from .decode import install_lean_decode, remove_lean_decode
from .linear import FusedLinear, HalfEmbedding, SliceLinear, SparseLinear
from .native_decode import install_native_decode

RUNTIMES = ("sparse", "dense", "auto")


class RuntimeRequestError(SparseforgeError):
    """A runtime request that cannot be honoured (unknown name, no masks for ``sparse``, an incompatible
    attachment)."""


@dataclass
class LayerChoice:
    name: str
    shape: tuple[int, int]
    density: float
    layout: str
    sparse_us: float | None = None  # batch-1 timings behind an ``auto`` choice
    dense_us: float | None = None


def nm_of(mask: torch.Tensor) -> tuple[int, int] | None:
    """(n, m) when every group of m consecutive inputs of every row keeps exactly n (n < m), else None."""
    out, in_features = mask.shape
    for m in sorted(NM_GROUP_SIZES):
        if in_features % m:
            continue
        kept = mask.reshape(out, in_features // m, m).sum(-1)
        n = int(kept[0, 0])
        if n < m and bool((kept == n).all()):
            return n, m
    return None


def pack_sparse(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> tuple[PackedWeight, str]:
    nm = nm_of(mask)
    if nm is not None:
        return pack_nm(weight, mask, nm[0], nm[1], dtype), "nm"
    return pack_bitmask(weight, mask, dtype), "bitmask"


class _Timer:
    """Batch-1 time of a packed weight with the last-level cache flushed first: how decoding sees it."""

    def __init__(self, repeats: int = 9, flush_mib: int = 64):
        self.repeats = repeats
        self.scratch = torch.ones(flush_mib * 2**20 // 4)
        self.memo: dict[tuple, tuple[float, float]] = {}

    def _once(self, x: torch.Tensor, product: PreparedMatmul) -> float:
        self.scratch.add_(1.0)  # evicts the weight from the caches
        start = time.perf_counter()
        product(x)
        return time.perf_counter() - start

    def compare(self, key: tuple, sparse: PackedWeight, dense: PackedWeight) -> tuple[float, float]:
        """Median microseconds of (sparse, dense), through the same prepared call a runtime layer makes."""
        if key not in self.memo:
            x = torch.randn(1, sparse.shape[1])
            products = PreparedMatmul(sparse), PreparedMatmul(dense)
            for product in products:  # warm-up (and the native build)
                product(x)
            pairs = [[self._once(x, product) for product in products] for _ in range(self.repeats)]
            self.memo[key] = tuple(statistics.median(p[i] for p in pairs) * 1e6 for i in range(2))
        return self.memo[key]


def _value_dtype(handle: LoadedModel, requested: str | torch.dtype | None) -> torch.dtype:
    """The 16-bit type the runtime holds weights in: the one requested, else the loaded one if it is 16-bit, else
    fp16 (a model loaded in float32, the default). bf16 values decode in fewer instructions on AVX-512 (shifted or
    masked into float32, docs/kernels.md); fp16 keeps three more bits of each weight."""
    halves = (torch.float16, torch.bfloat16)
    if requested is None:
        return handle.dtype if handle.dtype in halves else torch.float16
    dtype = resolve_dtype(requested)
    if dtype not in halves:
        raise RuntimeRequestError(f"runtime weights are float16 or bfloat16, not {requested}")
    return dtype


# projections that read the same input tensor, run as one fused product when all of a group are present
SHARED_INPUT_ROLES = (("q", "k", "v"), ("gate", "up"))


def _groups(adapter, index: int, masks: dict) -> list[list]:
    """The block's linears, grouped by shared input where every member is masked alike (all or none)."""
    linears = adapter.block_linears(index)
    groups, taken = [], set()
    for roles in SHARED_INPUT_ROLES:
        members = [linears[r] for r in roles if r in linears]
        if len(members) == len(roles) and len({v.name in masks for v in members}) == 1:
            groups.append(members)
            taken.update(roles)
    return groups + [[view] for role, view in linears.items() if role not in taken]


class SparseRuntime:
    """The attachment: which linears were replaced, and how to give the model its ordinary linears back."""

    kind = "runtime"
    takes_over_ffn = False

    def __init__(self, handle: LoadedModel, mode: str, layers: list[LayerChoice], paths: dict[str, str],
                 lean_layers: list, native_step=None):
        self.handle, self.mode, self.layers, self.paths, self.lean_layers = handle, mode, layers, paths, lean_layers
        self.native_step = native_step  # the whole-model native decode step (native_decode.py), when it applies

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.layout] = counts.get(layer.layout, 0) + 1
        return {"mode": self.mode, "layouts": counts, "lean_decode_layers": len(self.lean_layers),
                "activation_thresholds": any(layer.layout.startswith("column") for layer in self.layers),
                "native_decode": self.native_step is not None,
                "weight_bytes_per_token": weight_bytes_per_token(self.handle.model),
                "layers": [asdict(layer) for layer in self.layers]}

    def describe(self) -> str:
        summary = self.summary()
        layouts = ", ".join(f"{count} {layout}" for layout, count in summary["layouts"].items())
        read = summary["weight_bytes_per_token"] / 2**20
        step = "native decode step" if self.native_step is not None else "Python decode step"
        return f"runtime {self.mode}: {layouts} weight matrices, {read:.1f} MiB of weights read per token, {step}"

    def save(self, directory: Path) -> None:
        raise RuntimeRequestError("a model in the sparse runtime is for inference and is not saved; export it before "
                            "loading it with a runtime")

    def remove(self) -> None:
        if self.native_step is not None:
            self.native_step.remove()
        remove_lean_decode(self.lean_layers)
        model = self.handle.model
        modules = dict(model.named_modules())
        for path in self.paths.values():
            module = modules[path]
            if isinstance(module, HalfEmbedding):
                set_path(model, path, nn.Embedding.from_pretrained(module.values.to(self.handle.dtype), freeze=False))
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=self.handle.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_path(model, path, linear)
        for attachment in list(self.handle.attachments.values()):
            if attachment is not self and hasattr(attachment, "rebind"):
                attachment.rebind()  # an attachment hooked on linears follows the ones just put back


def install_runtime(handle: LoadedModel, mode: str = "auto", log=print, lean_decode: bool = True,
                    native_decode: bool = True, values_dtype: str | torch.dtype | None = None) -> SparseRuntime:
    """Replace the block linears (and the LM head) of ``handle`` by runtime linears; returns the attachment.

    ``values_dtype``: "float16" or "bfloat16" for the weights held (default: the loaded dtype if 16-bit, else fp16).

    ``lean_decode``: Llama-style layers decode one token through :mod:`.decode` (same logits, less overhead).
    ``native_decode``: batch-1 decoding steps of such a model run all layers in one native call
    (:mod:`.native_decode`; same logits to float32 rounding, least overhead)."""
    if mode not in RUNTIMES:
        raise RuntimeRequestError(f"unknown runtime '{mode}'; available: {', '.join(RUNTIMES)}")
    if handle.attachment("experts") is not None:
        raise RuntimeRequestError("the sparse runtime cannot run routed experts (they slice the FFN weights per token); "
                            "load the factorized model without a runtime")
    if next(handle.model.parameters()).device.type != "cpu":
        raise RuntimeRequestError("the sparse runtime runs on the CPU; load the model with --device cpu")
    masks = handle.masks
    if mode == "sparse" and not masks:
        raise RuntimeRequestError("runtime 'sparse' needs a pruned model with recorded masks (this one has none; a dense "
                            "checkpoint pruned elsewhere: add --masks-from-zeros)")
    dtype = _value_dtype(handle, values_dtype)
    if mode == "auto" and not masks:
        log(f"› no pruning masks recorded: the runtime holds every layer dense ({str(dtype).split('.')[-1]})")
    activations = handle.attachment("activation_sparsity")  # thresholds: column layouts that skip zeroed inputs
    timer = _Timer() if mode == "auto" and masks and activations is None else None
    threads = torch.get_num_threads()
    layers, paths, replacements = [], {}, {}

    def packed_for(weight: torch.Tensor, mask: torch.Tensor | None, choice: LayerChoice,
                   threshold: float | None) -> PackedWeight | ColumnWeight:
        if threshold is not None:  # activation sparsity: a column layout, pruned weights left out when masked
            masked = mask is not None and mode != "dense"
            choice.layout = "column bitmask" if masked else "column"
            return pack_columns(weight, mask if masked else None, dtype)
        dense = pack_dense(weight, dtype)
        if mask is None or mode == "dense":
            return dense
        sparse, layout = pack_sparse(weight, mask, dtype)
        if timer is not None:
            key = (choice.shape, layout, round(choice.density, 2), threads)
            choice.sparse_us, choice.dense_us = timer.compare(key, sparse, dense)
            if choice.dense_us <= choice.sparse_us:
                return dense
        choice.layout = layout
        return sparse

    adapter = handle.adapter
    path_of = {id(module): name for name, module in handle.model.named_modules()}  # one walk, not one per layer
    for index in range(adapter.num_blocks):
        for group in _groups(adapter, index, masks):
            weight = torch.cat([view.weight.detach().float() for view in group])
            mask = torch.cat([masks[view.name] for view in group]) if group[0].name in masks else None
            biases = [view.bias for view in group]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach().float() if b is not None else torch.zeros(v.out_features) for b, v in zip(biases, group)])
            choice = LayerChoice("+".join(view.name for view in group), tuple(weight.shape),
                                 1.0 if mask is None else mask.float().mean().item(), "dense")
            threshold = None if activations is None else activations.threshold_for(group[0].name)
            packed = on_huge_pages(packed_for(weight, mask, choice, threshold))
            layers.append(choice)
            if len(group) == 1:
                replacements[group[0].name] = SparseLinear(packed, bias, choice.layout, threshold or 0.0)
            else:
                fused, start = FusedLinear(packed, bias, choice.layout, threshold or 0.0), 0
                for view, member_bias in zip(group, biases):
                    replacements[view.name] = SliceLinear(fused, start, start + view.out_features,
                                                          member_bias is not None)
                    start += view.out_features
            for view in group:
                paths[view.name] = path_of[id(view.module)]
    head, embedding = adapter.lm_head(), adapter.embed_tokens()
    head_path, embedding_path = path_of[id(head)], path_of[id(embedding)]
    head_packed = on_huge_pages(pack_dense(head.weight.detach().float(), dtype))
    # the embeddings in half precision too; a tied head and embedding share one matrix, as before
    tied = adapter.tied_embeddings()
    embedding_values = head_packed.values if tied else embedding.weight.detach().to(dtype).contiguous()
    replacements[head_path] = SparseLinear(head_packed, None if head.bias is None else head.bias.detach(), "dense")
    layers.append(LayerChoice(head_path, tuple(head.weight.shape), 1.0, "dense"))
    paths[head_path] = head_path
    if type(embedding) is nn.Embedding:  # a subclass may scale or offset (Gemma 3): it stays as loaded
        replacements[embedding_path] = HalfEmbedding(embedding_values, torch.float32, tied)
        paths[embedding_path] = embedding_path
    for name, module in replacements.items():
        set_path(handle.model, paths[name], module)
    # activations in float32 whatever the loaded dtype: the weights stay in their half-precision layouts, and CPU
    # half-precision elementwise ops (norms, attention, rotary) are slower than float32 ones
    handle.model.to(torch.float32)
    lean_layers = install_lean_decode(handle) if lean_decode else []
    native_step = install_native_decode(handle, log) if native_decode else None
    runtime = SparseRuntime(handle, mode, layers, paths, lean_layers, native_step)
    handle.attach(runtime)
    return runtime
