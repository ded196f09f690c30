"""Save a (pruned) model as a directory that :func:`sparseforge.load_model` reloads bit-exactly.

Layout of an exported ``model/`` directory:

* ``config.json``, ``generation_config.json`` and the tokenizer files, as transformers writes them;
* the weights: ``model.safetensors`` (format ``dense``: a plain Hugging Face checkpoint with zeros, loadable by
  transformers alone) or ``model.sparseforge.safetensors`` (formats ``bitmask`` and ``nm``);
* ``sparseforge_format.json``: the format, how each pruned tensor is encoded, tied-weight aliases, and the SHA-256 of
  every weight file (a flipped bit or a truncated copy is caught before loading).

The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_directory
from ..dtypes import resolve_dtype
from ..errors import CorruptCheckpointError, SparseforgeError
from ..sparsity.masks import release_masks
from .formats import ENCODINGS
from .integrity import check_safetensors_file, sha256_of
from .reader import ExportReadError, decode_state, manifest_digest


class Exportable(Protocol):
    """What the saver reads from a loaded model (:class:`sparseforge.models.handle.LoadedModel` has it): the
    export depends on this shape, not on the models package, which itself reads exports back."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: Any
    masks: dict[str, torch.Tensor]
    attachments: dict[str, Any]
    dtype: torch.dtype


FORMAT_FILE = "sparseforge_format.json"
FORMAT_VERSION = 1
DENSE_WEIGHTS = "model.safetensors"
PACKED_WEIGHTS = "model.sparseforge.safetensors"
EXPORT_FORMATS = ("auto", "dense", "bitmask", "nm")
WEIGHTS_METADATA = {"format": "pt"}


def _unique_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tied tensors stored once; returns (tensors, alias -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach()
    return tensors, aliases


def _layer_masks(handle: Exportable) -> dict[str, tuple[torch.Tensor, bool]]:
    """state-dict key -> (mask in [out, in], stored transposed?) for every linear with a recorded mask.

    Only masks that a stage recorded (or that an export's manifest restored) count: an unpruned model's exact zeros
    (a shrunk model's, a de-quantised one's) are not a pruning mask and are exported as plain weights."""
    masks = handle.masks
    return {f"{v.name}.weight": (masks[v.name], v.transposed) for v in handle.adapter.linears() if v.name in masks}


def plan_encodings(layer_masks: dict[str, tuple[torch.Tensor, bool]], fmt: str,
                   dtype: torch.dtype) -> tuple[str, dict[str, tuple[str, dict]]]:
    """Choose the encoding of each pruned tensor; ``auto`` picks the format with the fewest bytes.

    Returns (format name, {state-dict key: (encoding name, params)}). ``nm`` is possible only when every pruned
    tensor is exactly N:M; asking for it otherwise is an error, and ``auto`` then skips it.
    """
    if fmt not in EXPORT_FORMATS:
        raise SparseforgeError(f"unknown export format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}")
    esize = torch.empty((), dtype=dtype).element_size()
    candidates = [fmt] if fmt != "auto" else ["dense", "bitmask", "nm"]
    plans = {}
    for name in candidates:
        enc = ENCODINGS[name]
        plan = {}
        for key, (mask, _) in layer_masks.items():
            params = enc.applicable(mask)
            if params is None:
                if fmt == "nm":
                    raise SparseforgeError(f"format nm needs an exact N:M mask, but {key} is not N:M sparse")
                break
            plan[key] = (name, params)
        else:
            size = sum(ENCODINGS[e].nbytes(layer_masks[k][0], esize, p) for k, (e, p) in plan.items())
            plans[name] = (size, plan)
    chosen = min(plans, key=lambda n: (plans[n][0], candidates.index(n)))
    return chosen, plans[chosen][1]


def encode_tensor(key: str, tensor: torch.Tensor, dtype: torch.dtype, layer_mask: tuple[torch.Tensor, bool] | None,
                  encoding: str | None, params: dict | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """One state-dict tensor as stored: (stored tensors by name, its manifest entry or None when stored plain)."""
    tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if encoding is None:
        return {key: tensor.cpu().contiguous()}, None
    mask, transposed = layer_mask
    weight = tensor.t() if transposed else tensor
    parts = {f"{key}.{suffix}": part.cpu().contiguous()
             for suffix, part in ENCODINGS[encoding].encode(weight.cpu(), mask.cpu(), params).items()}
    return parts, {"encoding": encoding, "shape": list(weight.shape), "transposed": transposed, **params}


def save_model(handle: Exportable, out_dir: str | Path, format: str = "auto", dtype: str | None = None,
               overwrite: bool = False) -> dict:
    """Export ``handle`` to ``out_dir``; returns the format description that was written.

    Mask enforcement (parametrizations from training) is baked into plain weights first, so the export holds
    exactly the weights the model computes with.
    """
    target_dtype = resolve_dtype(dtype, handle.dtype)
    layer_masks = _layer_masks(handle)
    fmt, plan = plan_encodings(layer_masks, format, target_dtype)
    release_masks(handle.adapter)
    tensors, aliases = _unique_state(handle.model)
    stored: dict[str, torch.Tensor] = {}
    described: dict[str, dict] = {}
    for key, tensor in tensors.items():
        encoded = plan.get(key) if fmt != "dense" else None
        parts, info = encode_tensor(key, tensor, target_dtype, layer_masks.get(key), *(encoded or (None, None)))
        stored.update(parts)
        if info is not None:
            described[key] = info
    with atomic_directory(out_dir, overwrite=overwrite, kind="export") as tmp:
        save_file(stored, tmp / weights_file(fmt), metadata=WEIGHTS_METADATA)
        description = write_export_files(tmp, handle.model, handle.tokenizer, target_dtype, fmt, aliases,
                                         sorted(layer_masks), described)
        for attachment in handle.attachments.values():  # a skip policy, routers: they travel with their weights
            attachment.save(tmp)
    return description


def weights_file(fmt: str) -> str:
    return DENSE_WEIGHTS if fmt == "dense" else PACKED_WEIGHTS


def write_export_files(directory: Path, model: torch.nn.Module, tokenizer, dtype: torch.dtype, fmt: str,
                       aliases: dict[str, str], masked: list[str], described: dict[str, dict]) -> dict:
    """Everything of an export but its weight file (already in ``directory``): config, generation config,
    tokenizer, and the manifest with the weight file's checksum. Returns the manifest."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    stored = weights_file(fmt)
    description = {
        "format": fmt,
        "version": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": stored,
        "sha256": {stored: sha256_of(directory / stored)},
        "aliases": aliases,
        "masked": masked,
        "tensors": described,
    }
    description["manifest_sha256"] = manifest_digest(description)
    (directory / FORMAT_FILE).write_text(json.dumps(description, indent=1))
    return description


def _schema_problem(description) -> str | None:
    """What is wrong with a manifest's structure, or None (checked before anything is decoded from it)."""
    if not isinstance(description, dict):
        return "it is not a JSON object"
    expected = {"format": str, "version": int, "dtype": str, "weights": str, "sha256": dict, "aliases": dict,
                "masked": list, "tensors": dict}
    for key, kind in expected.items():
        if not isinstance(description.get(key), kind) or isinstance(description.get(key), bool):
            return f"'{key}' is missing or not a {kind.__name__}"
    if description["format"] not in EXPORT_FORMATS or description["format"] == "auto":
        return f"unknown format '{description['format']}'"
    if description["version"] > FORMAT_VERSION or description["version"] < 1:
        return (f"format version {description['version']} is not one this sparseforge reads (up to {FORMAT_VERSION}); "
                "upgrade sparseforge")
    if description["weights"] not in (DENSE_WEIGHTS, PACKED_WEIGHTS):
        return f"unknown weight file '{description['weights']}'"
    if not isinstance(description["sha256"].get(description["weights"]), str):
        return f"no SHA-256 recorded for {description['weights']}"
    for key, info in description["tensors"].items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(info, dict) or info.get("encoding") not in ENCODINGS or not isinstance(shape, list) or \
                len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
            return f"the entry of {key} is malformed"
    return None


def read_format(directory: Path) -> dict | None:
    """The export manifest of ``directory`` (None when it is not a sparseforge export), checked: structure, known
    format and version, and its own checksum."""
    path = Path(directory) / FORMAT_FILE
    if not path.exists():
        return None
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is corrupted: {exc}") from None
    problem = _schema_problem(description)
    if problem is None and "manifest_sha256" in description and \
            description["manifest_sha256"] != manifest_digest(description):
        problem = "its content does not match its recorded SHA-256 (edited or damaged)"
    if problem is not None:
        raise CorruptCheckpointError(f"{path} is not a valid sparseforge export manifest: {problem}")
    return description


def verify_weights(directory: Path, description: dict) -> Path:
    """The export's weight file, checked complete and matching its recorded SHA-256 (every format, dense too)."""
    weights = Path(directory) / description["weights"]
    if not weights.exists():
        raise CorruptCheckpointError(f"{weights} is missing")
    check_safetensors_file(weights)
    if sha256_of(weights) != description["sha256"][description["weights"]]:
        raise CorruptCheckpointError(f"{weights} is corrupted: its SHA-256 does not match {FORMAT_FILE}")
    return weights


def load_exported_state(directory: Path, description: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Verify and decode an exported directory: returns (full state dict, masks of the encoded tensors).

    Masks are keyed by state-dict name in [out, in] orientation; tensors stored dense (format ``dense``) carry no
    mask of their own and the loader recovers theirs from the zeros. Decoding is the standalone reader's.
    """
    weights = verify_weights(directory, description)
    try:
        return decode_state(load_file(weights), description, str(weights))
    except ExportReadError as exc:
        raise CorruptCheckpointError(str(exc)) from None
