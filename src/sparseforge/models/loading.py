"""``load_model(spec)``: one entry point for every kind of model a user can name.

Accepted specs: ``default`` (the embedded SmolLM2-135M-Instruct), ``tiny-<family>`` (random test models), a
``.gguf`` file, a sparseforge run or export directory, a compressed-tensors checkpoint (legacy sparse layouts),
a local Hugging Face directory (with llm-compressor's ``recipe.yaml``, its masks), or a Hub id. The architecture
is checked from the config before any weights are read, and every loaded model is checked for NaN/Inf weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import CorruptCheckpointError, InvalidWeightsError, ModelNotFoundError, SparseforgeError
from ..export.integrity import check_safetensors_dir
from ..dtypes import resolve_dtype
from ..export.saving import load_exported_state, read_format, verify_weights
from ..interop import compressed_tensors, llmcompressor
from .adapters import adapter_for, check_supported
from .attachments import restore_attachments
from .default import default_model_dir
from .gguf import converted_gguf_directory
from .handle import LoadedModel
from .rebuild import model_from_state
from .structure import STRUCTURE_KEY, apply_structure
from .tiny import build_tiny

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_config(name_or_dir: str, trust_remote_code: bool):
    try:
        config = AutoConfig.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model '{name_or_dir}' not found as a local directory or on the Hugging Face Hub: {_first_line(exc)}"
        ) from None
    check_supported(config.model_type)
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(name_or_dir: str, trust_remote_code: bool):
    """A local directory without tokenizer files loads with ``tokenizer=None`` (weights-only checkpoints exist);
    whatever needs text then says so. Hub ids always carry a tokenizer."""
    if Path(name_or_dir).is_dir() and not any((Path(name_or_dir) / f).exists() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)


def _load_hf(name_or_dir: str, dtype: torch.dtype, trust_remote_code: bool):
    _read_config(name_or_dir, trust_remote_code)
    if Path(name_or_dir).is_dir():
        check_safetensors_dir(Path(name_or_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = _load_tokenizer(name_or_dir, trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"cannot load model from '{name_or_dir}': {_first_line(exc)}") from None
    model.eval()
    return model, tokenizer


def _load_exported(directory: Path, description: dict, dtype: torch.dtype | None):
    """Rebuild a sparseforge export: config -> empty model -> decoded state dict (strict) -> masks."""
    stored_dtype = resolve_dtype(description["dtype"])
    config = _read_config(str(directory), trust_remote_code=False)
    structure = getattr(config, STRUCTURE_KEY, None)
    if description["format"] == "dense" and structure is None:
        verify_weights(directory, description)
        model, tokenizer = _load_hf(str(directory), stored_dtype, trust_remote_code=False)
        encoded_masks: dict[str, torch.Tensor] = {}
    else:
        state, encoded_masks = load_exported_state(directory, description)
        model = AutoModelForCausalLM.from_config(config, dtype=stored_dtype)
        if structure is not None:  # a shrunk model: give the freshly built modules the recorded shapes first
            apply_structure(adapter_for(model), structure)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CorruptCheckpointError(f"{directory} does not match its config and recorded structure: "
                                         f"{_first_line(exc)}") from None
        model.eval()
        tokenizer = _load_tokenizer(str(directory), trust_remote_code=False)
    if dtype is not None and dtype != stored_dtype:
        model.to(dtype)
    handle = LoadedModel(model, tokenizer, source=str(directory))
    masked = set(description["masked"])
    for view in handle.adapter.linears():
        key = f"{view.name}.weight"
        if key in encoded_masks:
            handle.masks[view.name] = encoded_masks[key]
        elif key in masked:
            handle.masks[view.name] = (view.weight.detach() != 0).cpu()
    return handle


def _masks_from_zeros(handle: LoadedModel) -> None:
    """Read the exact zeros of linears without a recorded mask as their masks (a model pruned elsewhere and saved
    dense); only linears that have zeros get one. Asked for explicitly, never done by default: a de-quantised
    model's zeros are not a pruning mask."""
    found = False
    for view in handle.adapter.linears():
        if view.name not in handle.masks:
            kept = view.weight.detach() != 0
            if not bool(kept.all()):
                handle.masks[view.name] = kept.cpu()
                found = True
    if not found and not handle.masks:
        raise SparseforgeError(f"--masks-from-zeros: {handle.source} has no exact zeros in any linear layer, so there "
                               "is no mask to read (was it pruned?)")


def _load_compressed_tensors(directory: Path, block: dict, dtype: torch.dtype) -> LoadedModel:
    """A compressed-tensors checkpoint: sparse modules decoded with their bitmasks as masks; quantized ones refused."""
    fmt = compressed_tensors.sparsity_format(block, str(directory))
    config = _read_config(str(directory), trust_remote_code=False)
    check_safetensors_dir(directory)
    state, masks = compressed_tensors.read_state(directory, fmt)
    model = model_from_state(config, {k: v.to(dtype) for k, v in state.items()}, dtype, str(directory))
    handle = LoadedModel(model, _load_tokenizer(str(directory), trust_remote_code=False), source=str(directory))
    for view in handle.adapter.linears():
        if f"{view.name}.weight" in masks:
            handle.masks[view.name] = masks[f"{view.name}.weight"].t() if view.transposed else \
                masks[f"{view.name}.weight"]
    return handle


def _recipe_masks(handle: LoadedModel, directory: Path) -> None:
    """llm-compressor's dense output: the masks of exactly the modules its recipe's sparsity modifiers targeted."""
    modifiers = llmcompressor.read_recipe(directory)
    if modifiers is None:
        return
    linears = {v.name: (llmcompressor.module_lineage(handle.model, v.name), v.weight)
               for v in handle.adapter.linears()}
    handle.masks.update(llmcompressor.recipe_masks(linears, modifiers, str(directory)))


def _config_json(directory: Path) -> dict:
    """The raw ``config.json`` (before transformers reads it: a compressed-tensors block changes how to load)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # missing or unreadable: the ordinary path reports it
    return config if isinstance(config, dict) else {}


def resolve_model_directory(path: Path) -> Path:
    """A run directory holds its model in ``model/``; accept either."""
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"
    return path


def check_finite(handle: LoadedModel) -> None:
    for name, param in handle.model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise InvalidWeightsError(f"weights of '{name}' contain NaN or Inf values; refusing to use this model")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present); asking for an absent GPU is an error, not a fallback."""
    name = str(device or "cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise SparseforgeError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SparseforgeError(f"device '{name}' requested but CUDA is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise SparseforgeError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved


def load_model(spec: str, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
               device: str | torch.device | None = "cpu", masks_from_zeros: bool = False) -> LoadedModel:
    """Load a causal LM with its tokenizer and adapter.

    ``dtype`` defaults to float32 (or an export's own dtype); ``device`` is where the model computes. Masks come
    from what an export's manifest recorded; ``masks_from_zeros`` reads the exact zeros of a model pruned
    elsewhere (saved dense) as masks, which is never done unasked.
    """
    spec = str(spec)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype) if dtype not in (None, "auto") else None
    load_dtype = torch_dtype or torch.float32
    if spec == "default":
        model, tokenizer = _load_hf(str(default_model_dir()), load_dtype, trust_remote_code=False)
        handle = LoadedModel(model, tokenizer, source="default")
    elif spec.startswith("tiny-"):
        model, tokenizer = build_tiny(spec, load_dtype)
        handle = LoadedModel(model, tokenizer, source=spec)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelNotFoundError(f"no such GGUF file: {spec}")
            model, tokenizer = _load_hf(str(converted_gguf_directory(path)), load_dtype, trust_remote_code=False)
            handle = LoadedModel(model, tokenizer, source=str(path))
        elif path.is_dir():
            directory = resolve_model_directory(path)
            description = read_format(directory)
            block = compressed_tensors.compression_config(_config_json(directory))
            if description is not None:
                handle = _load_exported(directory, description, torch_dtype)
            elif block is not None:
                handle = _load_compressed_tensors(directory, block, load_dtype)
            else:
                model, tokenizer = _load_hf(str(directory), load_dtype, trust_remote_code)
                handle = LoadedModel(model, tokenizer, source=str(directory))
            if description is None:
                _recipe_masks(handle, directory)
        elif path.exists() or not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
            raise ModelNotFoundError(f"no such model directory or file: {spec}")
        else:
            model, tokenizer = _load_hf(spec, load_dtype, trust_remote_code)
            handle = LoadedModel(model, tokenizer, source=spec)
    check_finite(handle)
    if masks_from_zeros:
        _masks_from_zeros(handle)
    handle.model.to(target_device)
    if spec != "default" and not spec.startswith("tiny-") and Path(spec).expanduser().is_dir():
        restore_attachments(handle, resolve_model_directory(Path(spec).expanduser()))
    return handle
