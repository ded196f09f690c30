"""GGUF files for llama.cpp: dense and physically smaller (shrunk) models, in f32/f16/bf16 or Q8_0.

llama.cpp runs no weight sparsity, so a pruned model in GGUF is exactly as fast as the dense one; a *shrunk* model
(fewer FFN neurons or heads, the same in every block) is smaller and faster there with no special kernel. The file
is written with the ``gguf`` library, llama.cpp's own Python package: its ``GGUFWriter`` for the container, its
tensor name map (``get_tensor_name_map``) for tensor names, its vocabularies for the tokenizer and its quantizers
for Q8_0. What llama.cpp's ``convert_hf_to_gguf.py`` adds on top, and is done the same way here: the metadata
keys of each architecture, and, for the ``llama`` architecture, the query/key rows reordered from Hugging Face's
half-split rotary layout to llama.cpp's interleaved one (transformers' GGUF reader undoes exactly that).

Supported: the Llama, Mistral (written as ``llama``, as llama.cpp does) and Qwen2 families with the default rotary
embedding. Anything GGUF's metadata cannot describe is refused with the reason: per-block widths or head counts,
removed sub-layers, a bias added by shrinking, rotary scaling, attachments (skip policies, experts).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SparseforgeError

TENSOR_TYPES = ("f16", "bf16", "f32", "q8_0")
_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
_STRUCTURE_KEY = "sparseforge_structure"
# llama.cpp tells pre-tokenizers apart by name; the ones we can recognise from tokenizer.json. Anything else is
# written as "default" with a warning (llama.cpp then splits text with its default regex).
_PRE_TOKENIZERS = {json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                               "use_regex": True}, sort_keys=True): "gpt-2"}


class GGUFExportError(SparseforgeError):
    """A model GGUF (or llama.cpp) cannot represent."""


def gguf_problem(handle) -> str | None:
    """Why ``handle`` cannot be written as GGUF, or None."""
    config = handle.model.config
    if config.model_type not in _ARCHITECTURES:
        return (f"GGUF export supports the {', '.join(sorted(_ARCHITECTURES))} families; {config.model_type} is not "
                "one of them yet")
    if handle.attachments:
        return (f"the model carries a {', '.join(sorted(handle.attachments))} attachment that GGUF cannot hold "
                "(export it in a sparseforge format instead)")
    structure = getattr(config, _STRUCTURE_KEY, None)
    if isinstance(structure, dict) and not structure.get("transformers_loadable", False):
        return ("this shrunk model has per-block FFN widths or head counts, removed sub-layers or an added output "
                "bias, and GGUF's llama/qwen2 metadata holds one width and one head count for every block with no "
                "such bias")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rotary scaling '{rope.get('rope_type')}' is not written to GGUF by sparseforge yet"
    return None


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face keeps each head's rotary pairs as (first half, second half); llama.cpp's llama graph expects
    them interleaved. Rows of each head go from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...]."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _vocabulary(tokenizer, writer, gguf_module) -> list[str]:
    """Write the tokenizer (tokens, types, merges, special ids, chat template); returns warnings."""
    warnings: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        vocab = None
        for kind in (gguf_module.vocab.BpeVocab, gguf_module.vocab.LlamaHfVocab):
            try:
                vocab = kind(path)
                break
            except (FileNotFoundError, ValueError, TypeError):
                continue
        if vocab is None:
            raise GGUFExportError("GGUF export needs a byte-level BPE or a Llama-style tokenizer.json; this "
                                  "tokenizer is neither")
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        described = json.loads((path / "tokenizer.json").read_text())
        if vocab.tokenizer_model == "gpt2":
            pre = described.get("pre_tokenizer")
            name = _PRE_TOKENIZERS.get(json.dumps(pre, sort_keys=True))
            if name is None:
                warnings.append("pre-tokenizer not recognised; written as 'default' (llama.cpp may split text "
                                "differently from this tokenizer)")
            writer.add_tokenizer_pre(name or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        merges = vocab.tokenizer_model == "gpt2" and bool(described.get("model", {}).get("merges"))
        special = gguf_module.SpecialVocab(path, load_merges=merges, n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)
    return warnings


def _metadata(writer, config, geometry, blocks: int, name: str) -> None:
    """The architecture's keys; head counts and size come from the adapter (what the tensors hold)."""
    heads, kv_heads, head_dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_block_count(blocks)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if head_dim * heads != config.hidden_size:  # heads removed by shrinking: llama.cpp then reads the head size
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _tensor_type(array: np.ndarray, tensor_type: str, gguf_module):
    """(data, ggml type) as llama.cpp's converter stores it: 1-D tensors in f32; Q8_0 only for rows of whole
    32-blocks (others fall back to f16)."""
    Q = gguf_module.GGMLQuantizationType
    if array.ndim == 1 or tensor_type == "f32":
        return array.astype(np.float32), Q.F32
    if tensor_type == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf_module.quants.quantize(array.astype(np.float32), Q.Q8_0), Q.Q8_0
    if tensor_type == "bf16":
        return gguf_module.quants.quantize(array.astype(np.float32), Q.BF16), Q.BF16
    return array.astype(np.float16), Q.F16


def write_gguf(handle, path: str | Path, tensor_type: str = "f16", name: str | None = None) -> dict:
    """Write ``handle`` as a GGUF file at ``path`` (written to a temporary name, then renamed); returns a summary:
    architecture, tensor type, file bytes, tensor count and warnings."""
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise GGUFExportError(f"unknown GGUF tensor type '{tensor_type}'; use one of {', '.join(TENSOR_TYPES)}")
    problem = gguf_problem(handle)
    if problem is not None:
        raise GGUFExportError(f"cannot write GGUF: {problem}")
    if handle.tokenizer is None:
        raise GGUFExportError("cannot write GGUF: the model has no tokenizer, and a GGUF file must carry one")
    config, adapter = handle.model.config, handle.adapter
    geometry = adapter.head_geometry()
    arch = getattr(gguf.MODEL_ARCH, _ARCHITECTURES[config.model_type])
    names = gguf.get_tensor_name_map(arch, adapter.num_blocks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _metadata(writer, config, geometry, adapter.num_blocks, name or path.stem)
        file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
        writer.add_file_type(getattr(gguf.LlamaFileType, file_types[tensor_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        warnings = _vocabulary(handle.tokenizer, writer, gguf)
        state = handle.model.state_dict()
        tied = adapter.tied_embeddings()
        count = 0
        for key, tensor in state.items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue  # recomputed by llama.cpp / the output reuses token_embd when absent
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GGUFExportError(f"cannot write GGUF: no llama.cpp tensor name for '{key}'")
            array = tensor.detach().float().cpu().numpy()
            if arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("q_proj.weight", "q_proj.bias")):
                array = _interleave_rotary(array, geometry.num_heads)
            elif arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("k_proj.weight", "k_proj.bias")):
                array = _interleave_rotary(array, geometry.num_kv_heads)
            data, ggml_type = _tensor_type(array, tensor_type, gguf)
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "architecture": gguf.MODEL_ARCH_NAMES[arch], "tensor_type": tensor_type,
            "bytes": path.stat().st_size, "tensors": count, "warnings": warnings}
