"""Out-of-core pruning: ``sf.prune_streamed`` and ``sparseforge prune --streamed``.

A model whose weights do not fit in memory is pruned straight from its checkpoint into an export: the model is
built empty (parameters on the ``meta`` device, buffers real), the embeddings are read to capture the calibration
windows' block inputs, and then the layer-sequential pipeline runs with a store that reads each block from the
checkpoint when it is reached, checkpoints it encoded as the export stores it, and lets it go
(:mod:`.blocks`). The export is assembled at the end by copying bytes (:mod:`sparseforge.export.concatenate`):
the same file, byte for byte, as pruning the loaded model and saving it. Resident memory is one block (plus the
embeddings, read once) and the calibration activations, whatever the depth.

Everything that can be refused is refused before the first block is touched: an incomplete checkpoint, an
output that exists, a disk without room for the checkpoint pieces and the export, a resume against another source.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from ..atomic import atomic_directory, check_output_directory
from ..calibration.checkpoint import Checkpoint
from ..calibration.data import calibration_data
from ..data.windows import CALIBRATION_WINDOWS
from ..dtypes import resolve_dtype
from ..errors import CorruptCheckpointError, ModelNotFoundError, SparseforgeError
from ..export.concatenate import concatenate_safetensors, write_tensor_file
from ..export.integrity import digest
from ..export.formats import ENCODINGS
from ..export.saving import WEIGHTS_METADATA, weights_file, write_export_files
from ..kernels.recycling import recycled_large_allocations
from ..memory import PeakMemory
from ..models.default import default_model_dir
from ..models.handle import LoadedModel
from ..models.loading import _HUB_ID, _load_tokenizer, _read_config, resolve_device, resolve_model_directory
from ..prune.pruner import check_calibration_memory, check_prune_request
from ..prune.sequential import SequentialPlan, prune_data_free, prune_sequential
from ..sparsity.patterns import NM
from ..version import __version__
from .blocks import StreamedBlocks
from .source import WeightSource

CHECKPOINT_SUFFIX = "prune-streamed"


def source_directory(spec: str) -> Path:
    """The local directory of ``spec``: ``default``, a model or run directory, or a Hub id (downloaded once, its
    safetensors and config files only: the weights are then read from disk block by block)."""
    if spec == "default":
        return default_model_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        return resolve_model_directory(path)
    if path.exists() or spec.startswith(("tiny-", ".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelNotFoundError(f"no such model directory: {spec} (streamed pruning reads a local safetensors "
                                 "checkpoint or a Hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure is one readable line
        raise ModelNotFoundError(f"model '{spec}' could not be downloaded from the Hugging Face Hub: "
                                 f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None


def empty_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model with every parameter on ``meta`` (no storage) and real buffers (rotary frequencies), tied as
    transformers ties it."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def stored_names(model: torch.nn.Module) -> tuple[list[str], dict[str, str]]:
    """State-dict names stored in an export (tied tensors once) and the aliases, as the in-memory saver finds them."""
    names, aliases, seen = [], {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            names.append(name)
    return names, aliases


def streamed_format(fmt: str, plan: SequentialPlan) -> str:
    """The export format, fixed before pruning (each block is encoded the moment it is finished). ``auto`` picks
    what the in-memory saver picks for these masks: ``nm`` for an N:M pattern, else ``bitmask`` (smaller than
    dense above 6.25% sparsity in fp16, 3.1% in fp32), else ``dense``."""
    if fmt not in ENCODINGS and fmt != "auto":
        raise SparseforgeError(f"unknown export format '{fmt}'; use one of auto, {', '.join(ENCODINGS)}")
    if fmt == "nm" and not isinstance(plan.pattern, NM):
        raise SparseforgeError("format nm needs an N:M pattern; use --pattern N:M or another format")
    if fmt != "auto":
        return fmt
    if isinstance(plan.pattern, NM):
        return "nm"
    sparsities = plan.block_sparsity or [plan.sparsity]
    return "bitmask" if min(sparsities) > 1 / 32 else "dense"


def expected_export_bytes(handle: LoadedModel, names: list[str], plan: SequentialPlan, fmt: str,
                          dtype: torch.dtype) -> int:
    """Bytes of the export's weight file, from the shapes and the planned sparsities (before any weight is read)."""
    esize = torch.empty((), dtype=dtype).element_size()
    linears = {f"{v.name}.weight": v for v in handle.adapter.linears()}
    state = handle.model.state_dict(keep_vars=True)
    total = 0
    for name in names:
        numel, view = state[name].numel(), linears.get(name)
        if view is None or fmt == "dense":
            total += numel * esize
            continue
        kept = 1 - (plan.block_sparsity[view.block] if plan.block_sparsity else plan.sparsity)
        total += int(numel * kept) * esize + (numel // 8 if fmt == "bitmask" else numel // 4)
    return total


def check_disk(out_dir: Path, checkpoint_dir: Path, export_bytes: int, hidden_bytes: int) -> None:
    """Refuse up front a run whose checkpoint pieces and export cannot fit on their disks."""
    needs: dict[int, tuple[Path, int]] = {}  # per filesystem
    for where, amount in ((checkpoint_dir, export_bytes + 2 * hidden_bytes), (out_dir, export_bytes)):
        existing = next(p for p in [where, *where.parents] if p.exists())
        device = os.stat(existing).st_dev
        previous = needs.get(device, (existing, 0))
        needs[device] = (previous[0], previous[1] + amount)
    for existing, amount in needs.values():
        free = shutil.disk_usage(existing).free
        if amount > free:
            raise SparseforgeError(f"streamed pruning needs about {amount / 2**30:.1f} GiB free on {existing} "
                                   f"(checkpointed blocks and the export), but only {free / 2**30:.1f} GiB is free")


def _non_block_parameters(handle: LoadedModel) -> list[str]:
    """Parameters outside the decoder blocks that capturing block 0's inputs needs: all but an untied LM head."""
    prefix = f"{handle.adapter.spec.blocks}."
    head = {id(p) for p in handle.adapter.lm_head().parameters()} - \
        {id(p) for p in handle.adapter.embed_tokens().parameters()}
    return [n for n, p in handle.model.named_parameters() if not n.startswith(prefix) and id(p) not in head]


def prune_streamed(model: str, out_dir: str | os.PathLike, method: str = "wanda", sparsity: float | None = None,
                   pattern: str = "unstructured", per_row: bool | None = None, allocation: str = "uniform",
                   refine: str | None = None, calibration: str | torch.Tensor = "default",
                   nsamples: int = CALIBRATION_WINDOWS, seqlen: int = 512, seed: int = 0, batch_size: int = 8,
                   order: str = "sublayer", device: str | None = None, format: str = "auto",
                   dtype: str | None = None, owl=None, dsnot=None, sparsegpt=None, admm=None,
                   block_sparsity=None, reconstruct=None, bos: str = "auto", checkpoint_dir: str | os.PathLike | None = None,
                   overwrite: bool = False, restart: bool = False, progress: bool = True,
                   after_block=None) -> dict:
    """Prune ``model`` block by block from its checkpoint into the export ``out_dir/model`` without ever holding
    it whole; returns the report (also written to ``out_dir/report.json``).

    The pruning arguments are :func:`sparseforge.prune`'s; ``format``/``dtype`` are the export's (``dtype``
    default float32, the dtype the blocks are computed in, as the in-memory path exports). Blocks are checkpointed
    in ``checkpoint_dir`` (default: a hidden sibling of ``out_dir``); rerunning after an interruption resumes
    (``restart`` discards them), and they are removed once the export is complete.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    directory = source_directory(str(model))
    source = WeightSource(directory)  # every shard whole, or refused here
    check_output_directory(out_dir, overwrite=overwrite)
    config = _read_config(str(directory), trust_remote_code=False)
    compute_dtype = torch.float32
    export_dtype = resolve_dtype(dtype, compute_dtype)
    handle = LoadedModel(empty_model(config, compute_dtype), _load_tokenizer(str(directory), False), source=str(model),
                         bos=bos)
    names, aliases = stored_names(handle.model)
    missing = [n for n in names if n not in source]
    if missing:
        raise CorruptCheckpointError(f"{directory} lacks {len(missing)} tensor(s) the model's config implies (first: "
                                     f"{missing[0]}); streamed pruning reads checkpoints whose names are the model's")
    if reconstruct is not None:
        import sparseforge.retrain.reconstruct  # noqa: F401 - registers the reconstruction repair hook
    plan, needs_calibration = check_prune_request(handle, method, sparsity, pattern, per_row, allocation, refine,
                                                  owl, dsnot, sparsegpt, batch_size, order, reconstruct, admm,
                                                  block_sparsity)
    fmt = streamed_format(format, plan)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else \
        out_dir.parent / f".{out_dir.name}.checkpoints" / CHECKPOINT_SUFFIX
    if restart:
        shutil.rmtree(checkpoints, ignore_errors=True)
    hidden_bytes = nsamples * seqlen * config.hidden_size * 4 if needs_calibration else 0
    check_disk(out_dir, checkpoints, expected_export_bytes(handle, names, plan, fmt, export_dtype), hidden_bytes)
    if needs_calibration and not torch.is_tensor(calibration):
        check_calibration_memory(handle, nsamples, seqlen)

    settings = {"model": str(directory), "model_type": handle.model_type, "dtype": str(compute_dtype),
                "model_digest": source.fingerprint, "export_format": fmt, "export_dtype": str(export_dtype),
                **plan.settings()}
    windows = None
    if needs_calibration:
        windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
        settings.update(calibration_shape=list(windows.shape), calibration_digest=digest([windows]))
    checkpoint = Checkpoint(checkpoints, settings)
    store = StreamedBlocks(handle, source, compute_dtype, fmt, export_dtype, checkpoint.resume().get("encoded"),
                           capture_only=_non_block_parameters(handle) if needs_calibration else [])
    with recycled_large_allocations() as recycling, PeakMemory() as peak:
        if needs_calibration:
            report = prune_sequential(handle, windows, plan, checkpoint,
                                      resolve_device(device) if device is not None else None, progress,
                                      after_block, store)
        else:
            prune_data_free(handle, plan, progress, store, checkpoint)
            report = {"method": plan.method.name, "pattern": plan.pattern.name, "target_sparsity": plan.sparsity,
                      "allocation": plan.allocation, "block_sparsity": plan.block_sparsity}
    report.setdefault("memory", {}).update(peak_rss_mib=round(peak.peak_mb, 1), start_rss_mib=round(peak.start_mb, 1),
                                           recycled_allocations=recycling)
    report = {"stage": "prune", "streamed": True, "source": str(model), "source_directory": str(directory),
              "source_fingerprint": source.fingerprint, **report, "versions": {"sparseforge": __version__}}
    parts = _outside_block_parts(handle, source, checkpoint.directory / "outside-blocks", names, export_dtype)
    parts += [checkpoint.directory / f"block_{i:04d}.safetensors" for i in range(handle.adapter.num_blocks)]
    masked = sorted(f"{v.name}.weight" for v in handle.adapter.linears())
    with atomic_directory(out_dir, overwrite=overwrite, kind="run") as tmp:
        model_dir = tmp / "model"
        model_dir.mkdir()
        concatenate_safetensors(parts, model_dir / weights_file(fmt), WEIGHTS_METADATA)
        description = write_export_files(model_dir, handle.model, handle.tokenizer, export_dtype, fmt, aliases,
                                         masked, store.encoded)
        report["export"] = {"format": fmt, "dtype": description["dtype"], "path": str(out_dir / "model"),
                            "weight_bytes": (model_dir / description["weights"]).stat().st_size,
                            "dense_bytes_same_dtype": source_bytes_as(source, names, export_dtype)}
        report["seconds_total"] = round(time.perf_counter() - started, 3)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(report_markdown(report))
    checkpoint.remove()
    if checkpoint_dir is None and checkpoints.parent.is_dir() and not any(checkpoints.parent.iterdir()):
        checkpoints.parent.rmdir()  # the hidden sibling was only ours
    return report


def _outside_block_parts(handle: LoadedModel, source: WeightSource, directory: Path, names: list[str],
                         dtype: torch.dtype) -> list[Path]:
    """The stored tensors outside the blocks (embeddings, final norm, LM head), one file each: read, converted
    and written one at a time, so the largest (an 8B model's 1 GB embedding) is the only one in memory."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{handle.adapter.spec.blocks}."
    parts = []
    for i, name in enumerate(n for n in names if not n.startswith(prefix)):
        tensor = source.tensor(name)
        part = directory / f"{i:04d}.safetensors"
        write_tensor_file(part, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        parts.append(part)
    return parts


def source_bytes_as(source: WeightSource, names: list[str], dtype: torch.dtype) -> int:
    """Bytes of the dense model's stored tensors in ``dtype`` (the size the export is compared with)."""
    esize = torch.empty((), dtype=dtype).element_size()
    return sum(source.numel(name) * esize for name in names)


def report_markdown(report: dict) -> str:
    memory, export = report["memory"], report["export"]
    lines = [f"# streamed prune of {report['source']}", "",
             f"- {report['method']} {report['pattern']}, target sparsity {report['target_sparsity']:g}",
             f"- peak resident memory {memory['peak_rss_mib']:.0f} MiB (at start {memory['start_rss_mib']:.0f} MiB)"]
    if "weights_resident_peak_mib" in memory:
        lines.append(f"- weights resident at peak {memory['weights_resident_peak_mib']:.0f} MiB, calibration "
                     f"activations {memory['activations_peak_mib']:.0f} MiB")
    lines.append(f"- export: {export['format']} ({export['dtype']}), {export['weight_bytes'] / 2**20:.1f} MiB of "
                 f"weights (dense in {export['dtype']}: {export['dense_bytes_same_dtype'] / 2**20:.1f} MiB), "
                 f"in {export['path']}")
    return "\n".join(lines) + "\n"
