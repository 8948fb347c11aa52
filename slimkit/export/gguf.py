"""GGUF files that llama.cpp (and Ollama, LM Studio, ...) load, from a slimkit or Hugging Face causal LM.

``export_gguf(model, "out.gguf", qtype="q4_0")`` writes one file holding the architecture's
hyper-parameters, the tokenizer and every weight in llama.cpp's names and layouts:

- Architectures: Llama and Mistral (both written as llama.cpp's ``llama``, as its converter
  does), Qwen2, Qwen3, Gemma and Phi-3 (without longrope). Anything else is a ConfigError
  naming the model type and the supported list.
- Tensor names: the ``gguf`` package's map from transformers names
  (``gguf.get_tensor_name_map(arch, n_layers)``); a parameter it cannot place is an error,
  never silently dropped.
- Weights: every 2-D weight (token embedding included) is encoded as ``qtype`` by
  ``slimkit.export.gguf_blocks`` (a slimkit QuantLinear/QuantEmbedding through
  ``encode_module``, which copies its codes where they lie on the block type's grid; a float
  weight through ``encode_dense``); the encoder may pick another type for a tensor (a
  fallback, with a note). 1-D tensors (norms, biases) are always f32.
- Layout fixes llama.cpp expects: Llama/Mistral q_proj/k_proj rows are permuted from
  transformers' rotate-half RoPE layout to llama.cpp's interleaved one (``permute_rows``,
  applied to the encoded rows, which are independent); Gemma's RMSNorm weights are
  stored as ``1 + w`` (transformers computes ``x · (1 + w)``, llama.cpp ``x · w``); Phi-3's
  fused qkv and gate_up projections are written as they are (``attn_qkv``, ``ffn_up``).
- A tied lm_head (``tie_word_embeddings``, a shared weight, or a ``TiedQuantLinear``) writes
  no ``output.weight``: llama.cpp reads the token embedding for the output.
- Tokenizer: a byte-level BPE ``tokenizer.json`` becomes ``tokenizer.ggml.model = "gpt2"``
  (tokens, types, merges, the pre-tokenizer named as llama.cpp knows it); a
  SentencePiece-style one (BPE with byte fallback: Llama-2, Mistral, Gemma) becomes
  ``"llama"`` with scores (from the merge ranks) and types. A model without a tokenizer
  takes every ``tokenizer.*`` key of another GGUF file (``vocab_from``), whose vocabulary
  must have as many tokens as the model's embedding has rows.

The file is written to ``path + ".part"`` and renamed into place, so a failure never leaves a
half-written file at ``path`` (the ``.part`` is removed).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.io import model_info, tokenizer_of
from slimkit.export.gguf_blocks import (
    GGUF_TYPES,
    EncodedTensor,
    encode_dense,
    encode_module,
    write_gguf_file,
)
from slimkit.quantization.modules import QuantEmbedding, QuantLinear, TiedQuantLinear

# transformers model_type -> llama.cpp architecture name.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "phi3": "phi3"}
# Architectures whose RoPE llama.cpp applies to interleaved pairs (2i, 2i+1): their q/k rows are permuted.
_PERMUTED_ROPE = ("llama",)
# RoPE types this writer can express in llama.cpp's keys.
ROPE_TYPES = ("default", "linear", "llama3")

# general.file_type (llama.cpp's LLAMA_FTYPE_*) for each requested type ("mostly": 1-D tensors stay f32).
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q4_k": 14, "q6_k": 18}

# The Split regexes of the Llama-3 and Qwen2 tokenizer.json pre-tokenizers (llama.cpp: "llama-bpe", "qwen2").
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# llama.cpp token types (gguf.TokenType), spelled out so this module's top imports nothing optional.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFExportResult:
    """What ``export_gguf`` wrote."""

    path: Path
    size_bytes: int
    arch: str  # llama.cpp's architecture name
    tensor_types: dict[str, int]  # tensors written per GGUF type
    copied: int  # quantized layers whose codes were copied as they are
    requantized: int  # quantized layers re-encoded from their dequantized weight
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ConfigError("GGUF export needs the gguf package: pip install 'slimkit[gguf]'") from exc
    return gguf


# -- the model -----------------------------------------------------------------------------
def _check_model(model: nn.Module) -> tuple[Any, str]:
    """The model's config and llama.cpp architecture name; ConfigError for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(ARCHS))
    if not isinstance(model_type, str):
        raise ConfigError(f"GGUF export needs a transformers causal LM ({supported}); got a {type(model).__name__} "
                          "with no config.model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"GGUF export does not support model_type {model_type!r} ({type(model).__name__}); "
                          f"supported: {supported}")
    if not type(model).__name__.endswith("ForCausalLM") or model.get_output_embeddings() is None:
        raise ConfigError(f"GGUF export needs a causal LM (a *ForCausalLM with an lm_head); {type(model).__name__} "
                          "is not one")
    return config, ARCHS[model_type]


def _rope(config: Any) -> dict[str, Any]:
    """The model's RoPE parameters (transformers >= 5 ``rope_parameters``, else ``rope_theta``/``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type") or "default")
    if params["rope_type"] not in ROPE_TYPES:
        raise ConfigError(f"GGUF export cannot express rope type {params['rope_type']!r} of this "
                          f"{config.model_type} model in llama.cpp's keys; supported: {', '.join(ROPE_TYPES)}")
    return params


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order taking a q/k projection from transformers' RoPE layout to llama.cpp's (``llama`` arch).

    transformers rotates the pairs (i, i + d/2) of each head of size d (rotate-half); llama.cpp's
    "normal" RoPE rotates (2i, 2i + 1). New row h·d + 2i + j is old row h·d + j·d/2 + i.
    """
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def _llama3_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama-3 RoPE scaling: the factor dividing each frequency."""
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _weight_entries(model: nn.Module, notes: list[str]) -> list[tuple[str, Any]]:
    """(transformers name, tensor or quantized module) for every weight, in module order.

    A slimkit quantized layer is one entry holding the module (its codes go to the encoder);
    another slimkit layer standing in for a float one (LowPrecision, FactorizedLinear) is its
    ``.weight``; a parametrized tensor (a pruning mask kept as ``WeightMask``) is the value it
    computes; every other module contributes its own parameters.
    """
    from torch.nn.utils import parametrize

    entries: list[tuple[str, Any]] = []
    covered: list[str] = []
    act_quant = 0
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in covered):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, (QuantLinear, QuantEmbedding, TiedQuantLinear)):
            entries.append((f"{prefix}weight", module))
            act_quant += getattr(module, "act_mode", None) is not None
        elif hasattr(module, "slimkit_spec") and isinstance(getattr(module, "weight", None), torch.Tensor):
            entries.append((f"{prefix}weight", module.weight))
        elif parametrize.is_parametrized(module):
            entries += [(f"{prefix}{t}", getattr(module, t)) for t in module.parametrizations]
            entries += [(f"{prefix}{p}", v) for p, v in module.named_parameters(recurse=False)]
            covered.append(name)
            continue
        else:
            entries += [(f"{prefix}{p}", v) for p, v in module.named_parameters(recurse=False)]
            continue
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            entries.append((f"{prefix}bias", bias))
        covered.append(name)
    if act_quant:
        notes.append(f"{act_quant} layer(s) quantize their inputs in slimkit; GGUF keeps their weights only "
                     "(llama.cpp chooses its own activation precision)")
    if any(getattr(m, "attached", False) for m in model.modules()):
        notes.append("attention-input quantization (QuantAttentionInputs) is not carried into GGUF")
    return entries


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def _tied(model: nn.Module, config: Any, notes: list[str]) -> bool:
    """Whether the output layer is the token embedding (then no ``output.weight`` is written)."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(out, TiedQuantLinear):
        return True
    out_w, emb_w = getattr(out, "weight", None), getattr(emb, "weight", None)
    if isinstance(out_w, nn.Parameter) and isinstance(emb_w, nn.Parameter) and out_w.data_ptr() == emb_w.data_ptr():
        return True
    if getattr(config, "tie_word_embeddings", False):
        if isinstance(out, (QuantLinear, QuantEmbedding)) or type(out) is not type(emb):
            notes.append("the lm_head was compressed apart from the token embedding it is tied to; GGUF keeps the "
                         "tie, so llama.cpp computes the output with token_embd")
        return True
    return False


# -- the tokenizer -------------------------------------------------------------------------
def _kv(value: Any, vtype: Any, sub: Any = None) -> tuple[Any, Any, Any]:
    return (value, vtype, sub)


def _flatten_pre(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for q in pre.get("pretokenizers", []) for p in _flatten_pre(q)]
    return [pre]


def _bpe_pre(spec: dict, notes: list[str]) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer."""
    parts = _flatten_pre(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        if parts[0].get("add_prefix_space"):
            notes.append("the tokenizer adds a prefix space before the text; llama.cpp's gpt-2 pre-tokenizer does not")
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    notes.append(f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds)) or 'none'}) is not one llama.cpp "
                 "knows by name; written as 'default', so llama.cpp may split text differently from transformers")
    return "default"


def _space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (llama.cpp's add_space_prefix)."""
    for p in _flatten_pre(spec.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    norm = spec.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    return any(n.get("type") == "Prepend" for n in norms)


def _special_ids(tok: Any, config: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tok, f"{key}_token_id", None)
        if value is None and key in ("bos", "eos"):
            value = getattr(config, f"{key}_token_id", None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int):
            ids[key] = value
    return ids


def _adds_special(tok: Any, ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding adds a BOS first / an EOS last (what the tokenizer's post-processor does)."""
    try:
        plain = list(tok("a", add_special_tokens=False)["input_ids"])
        full = list(tok("a", add_special_tokens=True)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "a" adds nothing we can see
        return False, False
    extra = len(full) > len(plain)
    bos = extra and "bos" in ids and full[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]]
    eos = extra and "eos" in ids and full[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]]
    return bool(bos), bool(eos)


def _tokenizer_kv(tok: Any, n_vocab: int, config: Any, notes: list[str]) -> dict[str, tuple]:
    """The ``tokenizer.*`` keys for a transformers fast tokenizer (byte-level BPE or SentencePiece-style BPE)."""
    gguf = _gguf()
    T = gguf.GGUFValueType
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"the model's tokenizer ({type(tok).__name__}) has no tokenizer.json (not a fast "
                          "tokenizer); pass --vocab-from FILE.gguf with the same vocabulary")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        raise ConfigError(f"GGUF export writes BPE tokenizers; this one is {bpe.get('type')!r}: pass --vocab-from "
                          "FILE.gguf with the same vocabulary")
    byte_level = any(p.get("type") == "ByteLevel" for p in _flatten_pre(spec.get("pre_tokenizer"))) or \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"
    sentencepiece = bool(bpe.get("byte_fallback"))
    if not byte_level and not sentencepiece:
        raise ConfigError("GGUF export writes byte-level BPE or SentencePiece-style (byte-fallback) tokenizers; this "
                          "BPE tokenizer is neither: pass --vocab-from FILE.gguf with the same vocabulary")

    vocab: dict[str, int] = dict(bpe.get("vocab") or {})
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    highest = max([*vocab.values(), *added, -1])
    if highest >= n_vocab:
        raise ConfigError(f"the tokenizer has token id {highest} but the model's embedding has {n_vocab} rows")
    ids = _special_ids(tok, config)
    tokens: list[str] = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = BYTE if sentencepiece and _BYTE_TOKEN.fullmatch(text) else NORMAL
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    if sentencepiece and "unk" in ids:
        types[ids["unk"]] = UNKNOWN
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]

    kv: dict[str, tuple] = {}
    K = gguf.Keys.Tokenizer
    if sentencepiece:
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose concatenation scores highest; the
        # BPE merge ranks give that order (rank 0 first). Tokens no merge produces never win a merge.
        scores = [0.0 if t in (CONTROL, UNKNOWN, BYTE, USER_DEFINED) else -1e9 for t in types]
        for rank, merge in enumerate(merges):
            left, _, right = merge.partition(" ")
            i = vocab.get(left + right)
            if i is not None and scores[i] == -1e9:
                scores[i] = -float(rank)
        kv[K.MODEL] = _kv("llama", T.STRING)
        kv[K.PRE] = _kv("default", T.STRING)
        kv[K.SCORES] = _kv(scores, T.ARRAY, T.FLOAT32)
        kv[K.ADD_PREFIX] = _kv(_space_prefix(spec), T.BOOL)
    else:
        kv[K.MODEL] = _kv("gpt2", T.STRING)
        kv[K.PRE] = _kv(_bpe_pre(spec, notes), T.STRING)
        if merges:
            kv[K.MERGES] = _kv(merges, T.ARRAY, T.STRING)
    kv[K.LIST] = _kv(tokens, T.ARRAY, T.STRING)
    kv[K.TOKEN_TYPE] = _kv(types, T.ARRAY, T.INT32)
    for key, gkey in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("unk", K.UNK_ID), ("pad", K.PAD_ID)):
        if key in ids and 0 <= ids[key] < n_vocab:
            kv[gkey] = _kv(ids[key], T.UINT32)
    add_bos, add_eos = _adds_special(tok, ids)
    kv[K.ADD_BOS] = _kv(add_bos, T.BOOL)
    kv[K.ADD_EOS] = _kv(add_eos, T.BOOL)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        kv[K.CHAT_TEMPLATE] = _kv(template, T.STRING)
    return kv


def _vocab_from(path: str | os.PathLike, n_vocab: int) -> dict[str, tuple]:
    """Every ``tokenizer.*`` key of the GGUF file at ``path`` (strings as raw bytes, so copied exactly)."""
    gguf = _gguf()
    T = gguf.GGUFValueType
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--vocab-from {p}: no such file")
    try:
        reader = gguf.GGUFReader(p, "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise ConfigError(f"--vocab-from {p} is not a readable GGUF file ({exc})") from None
    kv: dict[str, tuple] = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main, sub = f.types[0], f.types[-1]
        if main == T.ARRAY:
            if sub == T.STRING:
                value: Any = [bytes(f.parts[i]) for i in f.data]
            else:
                value = [f.parts[i][0].item() for i in f.data] if len(f.types) == 2 else None
                if value is None:
                    continue  # nested arrays: none of llama.cpp's tokenizer keys
            kv[key] = _kv(value, T.ARRAY, sub)
        elif main == T.STRING:
            kv[key] = _kv(bytes(f.parts[f.data[0]]), T.STRING)
        else:
            kv[key] = _kv(f.parts[f.data[0]][0].item(), main)
    tokens = kv.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise ConfigError(f"--vocab-from {p} has no tokenizer (no {gguf.Keys.Tokenizer.LIST} key)")
    if len(tokens[0]) != n_vocab:
        raise ConfigError(f"--vocab-from {p} has {len(tokens[0])} tokens but the model's embedding has {n_vocab} rows; "
                          "the vocabulary must be the model's own")
    return kv


# -- the file ------------------------------------------------------------------------------
# llama.cpp gives Phi-3's special tokens extra attributes when general.name contains "phi3" or "phi-3", and fails
# to load when any of these tokens is missing from the vocabulary.
_PHI3_NAMED_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _model_name(model: nn.Module, config: Any, tokens: list, notes: list[str]) -> str:
    """general.name: the model's source name (zoo name, folder name), else its config's name or model type."""
    source = model_info(model).get("source")
    name = (Path(source).name or source) if isinstance(source, str) and source else \
        str(getattr(config, "name_or_path", "") or "") or config.model_type
    if re.search(r"phi-?3", name.lower()):
        texts = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}
        missing = [t for t in _PHI3_NAMED_TOKENS if t not in texts]
        if missing:
            notes.append(f"general.name is 'model', not {name!r}: llama.cpp treats a model named Phi-3 as having "
                         f"Phi-3's special tokens, and this vocabulary lacks {', '.join(missing)}")
            return "model"
    return Path(name).name or name


def _embedding_rows(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    return int(rows if rows is not None else emb.weight.shape[0])


def _write_hparams(writer: Any, config: Any, arch: str, n_vocab: int, qtype: str, rope: dict, name: str,
                   notes: list[str]) -> None:
    gguf = _gguf()
    n_head = int(config.num_attention_heads)
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    if arch == "phi3":  # llama.cpp's converter: int(factor · hidden) // heads
        rope_dims = int(partial * config.hidden_size) // n_head
    else:
        rope_dims = int(partial * head_dim)
    writer.add_rope_dimension_count(rope_dims)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    orig = rope.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
    if arch == "phi3" and orig:
        writer.add_rope_scaling_orig_ctx_len(int(orig))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    window = getattr(config, "sliding_window", None)
    if window and (getattr(config, "use_sliding_window", True)) and window < config.max_position_embeddings:
        notes.append(f"the model attends within a sliding window of {window} tokens; llama.cpp's {arch} graph attends "
                     "to the whole context (outputs differ past that length)")


def _encode_2d(value: Any, qtype: str, requantize: bool = False) -> tuple[EncodedTensor, bool]:
    """(encoding, whether ``value`` is a slimkit quantized layer)."""
    if isinstance(value, (QuantLinear, QuantEmbedding)):
        return encode_module(value, qtype, requantize=requantize), True
    if isinstance(value, TiedQuantLinear):
        return encode_dense(value.dense_weight(torch.float32), qtype), False
    return encode_dense(value, qtype), False


def export_gguf(model: nn.Module, path: str | os.PathLike, *, qtype: str = "q8_0",
                vocab_from: str | os.PathLike | None = None, requantize: bool = False,
                output_type: str | None = None, embedding_type: str | None = None) -> GGUFExportResult:
    """Write ``model`` (a transformers causal LM, possibly with slimkit quantized layers) as the GGUF file ``path``.

    ``qtype``: the GGUF type of 2-D weights (one of ``GGUF_TYPES``); ``vocab_from``: a GGUF file whose
    ``tokenizer.*`` keys are copied (for a model without a tokenizer, or to override it).
    ``requantize``: a quantized layer whose groups the type's blocks cannot hold (e.g. group 16
    into q4_0) is quantized again onto the type instead of raising ConfigError.
    ``output_type`` / ``embedding_type``: another type for ``output.weight`` / ``token_embd.weight``
    (as llama-quantize's ``--output-tensor-type`` / ``--token-embedding-type``; llama.cpp's own
    q4 mixes write the output as q6_k).
    A quantized layer's codes are copied when they lie on the type's grid (quantize with
    ``grid=`` to make them so); other quantized layers and float weights are rounded onto
    the type at export (RTN), each said in a note.
    """
    start = time.perf_counter()
    for label, value in (("type", qtype), ("output_type", output_type), ("embedding_type", embedding_type)):
        if value is not None and value not in GGUF_TYPES:
            raise ConfigError(f"unknown GGUF {label} {value!r}; known: {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    config, arch = _check_model(model)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the .gguf file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"folder {path.parent} does not exist (for {path.name})")
    notes: list[str] = []
    rope = _rope(config)
    n_vocab = _embedding_rows(model)

    # Everything that can fail on the user's input is checked before the file is opened.
    tok = tokenizer_of(model)
    if vocab_from is not None:
        tokenizer_kv = _vocab_from(vocab_from, n_vocab)
    elif tok is None:
        raise ConfigError("the model has no tokenizer; pass --vocab-from FILE.gguf (vocab_from=) naming a GGUF file "
                          "with the model's vocabulary (e.g. the original model's)")
    else:
        tokenizer_kv = _tokenizer_kv(tok, n_vocab, config, notes)

    n_layers = int(config.num_hidden_layers)
    tensor_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    tied = _tied(model, config, notes)
    out_name = _module_name(model, model.get_output_embeddings())
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)

    tensors: list[tuple[str, np.ndarray, Any]] = []  # (gguf name, data, raw dtype for block data)
    counts: dict[str, int] = {}
    copied = requantized = dequantized = 0
    rounded: list[str] = []  # float weights quantized by RTN at export
    encoder_notes: dict[str, int] = {}
    for hf_name, value in _weight_entries(model, notes):
        if tied and out_name is not None and hf_name.startswith(out_name + "."):
            continue
        name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"tensor {hf_name} of this {config.model_type} model has no place in llama.cpp's "
                              f"{arch} architecture")
        perm = None
        if arch in _PERMUTED_ROPE and re.search(r"\.(q|k)_proj\.(weight|bias)$", hf_name):
            heads = n_head if ".q_proj." in hf_name else n_kv
            perm = permute_rows(int(value.weight.shape[0] if isinstance(value, nn.Module) else value.shape[0]), heads)
        is_2d = isinstance(value, nn.Module) or value.dim() == 2
        if not is_2d:
            data = value.detach().float().cpu().numpy().reshape(-1)
            if arch == "gemma" and hf_name.endswith("norm.weight"):
                data = data + 1.0  # transformers' Gemma RMSNorm computes x * (1 + w)
            if perm is not None:
                data = data[perm]
            tensors.append((name, np.ascontiguousarray(data, dtype=np.float32), None))
            counts["f32"] = counts.get("f32", 0) + 1
            continue
        want = output_type if name == "output.weight" and output_type else \
            embedding_type if name == "token_embd.weight" and embedding_type else qtype
        enc, quantized = _encode_2d(value, want, requantize)
        if not quantized and enc.qtype not in ("f32", "f16"):
            rounded.append(name)
        data = enc.data if perm is None else enc.data[perm]
        tensors.append((name, np.ascontiguousarray(data), enc.ggml_type if data.dtype == np.uint8 else None))
        counts[enc.qtype] = counts.get(enc.qtype, 0) + 1
        if enc.note:
            encoder_notes[enc.note] = encoder_notes.get(enc.note, 0) + 1
        if quantized:
            if enc.copied_codes:
                copied += 1
            elif enc.qtype in ("f32", "f16"):
                dequantized += 1
            else:
                requantized += 1
    if arch == "llama" and rope["rope_type"] == "llama3":
        tensors.append(("rope_freqs.weight", _llama3_factors(rope, _head_dim(config)), None))
        counts["f32"] = counts.get("f32", 0) + 1
    for note, n in encoder_notes.items():
        notes.append(note if n == 1 else f"{note} ({n} tensors)")
    if dequantized:
        notes.append(f"{dequantized} quantized layer(s) written dequantized as {qtype}")
    if rounded:
        shown = ", ".join(rounded[:4]) + (f" and {len(rounded) - 4} more" if len(rounded) > 4 else "")
        notes.append(f"{len(rounded)} float weight(s) rounded onto their type at export (RTN, no calibration): {shown}; "
                     "quantize them in slimkit first (e.g. RTN/GPTQ with grid=) to choose how")

    model_name = _model_name(model, config, tokenizer_kv[gguf.Keys.Tokenizer.LIST][0], notes)
    def fill(writer: Any) -> None:
        _write_hparams(writer, config, arch, n_vocab, qtype, rope, model_name, notes)
        for key, (value, vtype, sub) in tokenizer_kv.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)

    write_gguf_file(path, arch, fill)
    return GGUFExportResult(path=path, size_bytes=path.stat().st_size, arch=arch, tensor_types=counts,
                            copied=copied, requantized=requantized, notes=notes,
                            seconds=time.perf_counter() - start)


__all__ = ["ARCHS", "GGUFExportResult", "export_gguf", "permute_rows"]
