"""Hugging Face folders in the compressed-tensors "pack-quantized" format, from slimkit's own codes.

``export_compressed_tensors(model, out_dir)`` writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` (with the ``compressed-tensors``
package installed) and vLLM load: ``config.json`` with a ``quantization_config``, one
``model.safetensors``, the tokenizer and generation config when the model has them. Every
weight-only QuantLinear becomes, under its module name:

| tensor | dtype, shape | content |
|---|---|---|
| ``weight_packed`` | int32 (out, ceil(in·bits/32)) | codes + 2^(bits−1), a little-endian bit stream along ``in``: code i at bits [i·b, (i+1)·b) of the row, so 4 bit puts eight codes in an int32, the first in the low nibble (compressed-tensors 0.20 ``pack_to_int32``) |
| ``weight_scale`` | float32 (out, n_groups) | slimkit's scales (strategy "group"; "channel": (out, 1)) |
| ``weight_shape`` | int64 (2,) | (out, in) |
| ``weight_zero_point`` | int32 (ceil(out·bits/32), n_groups) | asymmetric only: zero − 2^(bits−1), packed the same way along ``out`` |

compressed-tensors stores *signed* codes (asymmetric ones too, with a signed zero point),
offset by 2^(bits−1) before packing. slimkit's symmetric codes are stored with the same
offset and its asymmetric codes unsigned, so in both cases the packed bits are slimkit's
``qweight`` bytes read as little-endian int32 words: nothing is re-quantized, and the folder
decompresses to exactly ``QuantLinear.dense_weight()``. Supported: 2, 4 and 8-bit
weight-only layers, per channel or group-wise. Refused with UnsupportedError naming the
layer: quantized inputs (W8A8: another format), 1-bit (binary ±1 is not an integer grid
with a zero point), 16-bit, smoothing multipliers, act-order ``g_idx`` (compressed-tensors
0.20 removed activation-ordered groups). A QuantEmbedding is written as its dequantized
float table (the format has no packed embeddings), with a note. Everything else (norms,
float Linears, biases) is written as is; float Linears that are not quantized are listed
in ``ignore``. An lm_head tied to a quantized embedding (``TiedQuantLinear``) is written as
its own packed layer (the format has no tie between a packed layer and a table). A layer
that replaced something other than a plain nn.Linear in the architecture (GPT-2's ``Conv1D``,
weight stored (in, out); Falcon's ``FalconLinear``, whose forward reads ``.weight``) is refused:
the format's loaders quantize plain nn.Linear modules only.

The folder is written to a temporary folder beside ``out_dir`` and renamed into place. An
existing ``out_dir`` is replaced only when it is empty or an earlier such export holding
nothing but the files this writes (``OUTPUT_KIND``); anything else is refused, naming the
first foreign file, before any work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.core.atomic import (
    TOKENIZER_FILES,
    OutputKind,
    atomic_dir,
    check_output_dir,
)
from slimkit.core.errors import UnsupportedError
from slimkit.core.linear_like import linear_kind
from slimkit.quantization.modules import (
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    TiedQuantLinear,
)
from slimkit.quantization.primitives import pack

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
CT_BITS = (2, 4, 8)
WEIGHTS_FILE = "model.safetensors"


def _is_export_config(content: object) -> bool:
    quant = content.get("quantization_config") if isinstance(content, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


OUTPUT_KIND = OutputKind("compressed-tensors export", "config.json",
                         (WEIGHTS_FILE, "config.json", "generation_config.json", *TOKENIZER_FILES), _is_export_config)
"""What ``export_compressed_tensors`` writes: an existing folder is replaced only when it holds nothing else."""


@dataclass(frozen=True)
class CompressedTensorsExport:
    """What ``export_compressed_tensors`` wrote: the folder, packed and dense Linear names, notes."""

    path: Path
    quantized: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of every file in the folder."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


# -- pure packing --------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dim into int32 words, code i at bits [i·b, (i+1)·b).

    The same dense little-endian bit stream as compressed-tensors' ``pack_to_int32`` (which
    adds the 2^(bits−1) offset itself; pass codes already offset). Words are built from
    ``primitives.pack`` bytes read little-endian, whatever the host's byte order.
    """
    rows, cols = codes.shape
    data = pack(codes.to(torch.int16), bits, symmetric=False) if bits < 8 else codes.to(torch.uint8)
    n_words = -(-cols * bits // 32)
    data = torch.nn.functional.pad(data, (0, n_words * 4 - data.shape[1]))  # whole words; padding bits are 0
    words = np.ascontiguousarray(data.numpy()).view("<i4").reshape(rows, n_words)
    return torch.from_numpy(words.astype(np.int32))


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: (rows, cols) unsigned codes as int32."""
    data = np.ascontiguousarray(words.numpy().astype("<i4")).view(np.uint8).reshape(words.shape[0], -1)
    values = torch.from_numpy(data.astype(np.int64))
    shifts = torch.arange(8 // bits) * bits
    codes = ((values.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)  # first code: low bits
    return codes[:, :cols].to(torch.int32)


def _offset_codes(mod: QuantLinear) -> torch.Tensor:
    """The layer's codes as compressed-tensors stores them before packing: signed code + 2^(bits−1)."""
    codes = mod.codes().to(torch.int32)
    return codes + 2 ** (mod.bits - 1) if mod.symmetric else codes  # unsigned u = (u − 2^(b−1)) + 2^(b−1)


def layer_tensors(mod: QuantLinear) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one weight-only QuantLinear (names relative to the module)."""
    bits = mod.bits
    out = {
        "weight_packed": pack_int32(_offset_codes(mod), bits),
        "weight_scale": mod.scale.detach().float().clone().contiguous(),
        "weight_shape": torch.tensor([mod.out_features, mod.in_features], dtype=torch.int64),
    }
    if mod.zero is not None:
        signed_zero = mod.zero.to(torch.int32)  # unsigned zero z is the signed zero z − 2^(b−1), offset back by 2^(b−1)
        out["weight_zero_point"] = pack_int32(signed_zero.t().contiguous(), bits).t().contiguous()  # packed along out
    if mod.bias is not None:
        out["bias"] = mod.bias.detach().clone()
    return out


def weight_scheme(mod: QuantLinear) -> dict:
    """The ``weights`` quantization args of a layer (compressed-tensors QuantizationArgs as JSON)."""
    return {
        "num_bits": mod.bits,
        "type": "int",
        "symmetric": bool(mod.symmetric),
        "strategy": "group" if mod.group_size else "channel",
        "group_size": mod.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _problem(name: str, mod: QuantLinear) -> str | None:
    if mod.act_mode is not None:
        return f"layer {name!r} also quantizes its input ({mod.act_mode}); pack-quantized holds weight-only layers"
    if mod.bits not in CT_BITS:
        return f"layer {name!r} has {mod.bits}-bit weights; pack-quantized export takes {', '.join(map(str, CT_BITS))} bits"
    if mod.input_multiplier is not None:
        return f"layer {name!r} has a smoothing input multiplier, which the format cannot hold; fold it first"
    if mod.zero is not None and mod.zero.is_floating_point():
        return (f"layer {name!r} has fractional zero points (a GGUF q4_1/q4_k grid), which pack-quantized cannot "
                "hold; quantize it without grid for this format, or export it with `slimkit export gguf`")
    if getattr(mod, "g_idx", None) is not None:
        return (f"layer {name!r} has act-order groups (g_idx), which compressed-tensors 0.20 no longer supports; "
                "quantize it without act-order for this format")
    return None


# -- export --------------------------------------------------------------------------------
def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike) -> CompressedTensorsExport:
    """Write ``model`` (a transformers model with slimkit QuantLinear layers) as a compressed-tensors folder.

    See the module docstring for the tensors and what is refused. Returns the folder, the
    packed and the dense Linear layer names, and notes.
    """
    from safetensors.torch import save_file

    check_output_dir(out_dir, OUTPUT_KIND)  # before the packing work: a folder of the user's is never replaced
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise UnsupportedError(f"compressed-tensors export needs a transformers model with a config, got "
                               f"{type(model).__name__}")
    quantized = {n: m.as_quant_linear() if isinstance(m, TiedQuantLinear) else m
                 for n, m in model.named_modules() if isinstance(m, (QuantLinear, TiedQuantLinear))}
    if not quantized:
        raise UnsupportedError("the model has no slimkit QuantLinear layer: quantize it first (e.g. RTN or GPTQ, "
                               "bits 4)")
    for name, mod in quantized.items():
        problem = _problem(name, mod)
        if problem:
            raise UnsupportedError(problem)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantConv2d):
            raise UnsupportedError(f"layer {name!r} is a QuantConv2d; compressed-tensors export covers Linear layers")
    _check_linear_origins(model, quantized)

    notes: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}  # (data_ptr, shape, dtype) -> first key: tied tensors are written once
    owned = set()
    for name, mod in quantized.items():
        for key, value in layer_tensors(mod).items():
            tensors[f"{name}.{key}"] = value
        owned.add(name)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            tensors[f"{name}.weight"] = mod.dense_weight().to(mod.dtype)
            owned.add(name)
            notes.append(f"{name}: QuantEmbedding written as its dequantized {str(mod.dtype).removeprefix('torch.')} "
                         "table (pack-quantized has no packed embeddings)")
    state = model.state_dict(keep_vars=False)
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if module in owned or any(module.startswith(o + ".") for o in owned):
            continue
        ident = (value.data_ptr(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            continue  # a tied duplicate (e.g. lm_head.weight = embed_tokens.weight): transformers re-ties it
        seen[ident] = key
        tensors[key] = value.detach().contiguous()

    dense = tuple(n for n, m in model.named_modules() if linear_kind(m) == "linear")
    schemes: dict[str, list[str]] = {}
    for name, mod in quantized.items():
        schemes.setdefault(json.dumps(weight_scheme(mod), sort_keys=True), []).append(name)
    groups = {}
    for i, (scheme, names) in enumerate(schemes.items()):
        # One scheme: the usual ["Linear"] + ignore; several (per-layer bits): exact module names per group.
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": json.loads(scheme), "input_activations": None,
                                "output_activations": None, "format": FORMAT}
    quant_config = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
                    "config_groups": groups, "ignore": list(dense) if len(schemes) == 1 else [],
                    "kv_cache_scheme": None, "global_compression_ratio": None}

    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict["quantization_config"] = quant_config
    if _tie_broken(model) and config_dict.get("tie_word_embeddings"):
        config_dict["tie_word_embeddings"] = False  # else transformers would re-tie lm_head to the float table
        notes.append("tie_word_embeddings set to false: the output layer is quantized apart from the embedding table")

    from slimkit.core.io import tokenizer_of

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind=OUTPUT_KIND) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(tmp)
        tokenizer = tokenizer_of(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return CompressedTensorsExport(out_dir, tuple(quantized), dense, tuple(notes))


def _check_linear_origins(model: nn.Module, quantized: dict[str, QuantLinear]) -> None:
    """UnsupportedError when a quantized layer stands where the architecture builds something other than an nn.Linear.

    compressed-tensors' loaders (transformers, vLLM) swap the weight of the freshly built
    architecture's nn.Linear modules for packed tensors and run nn.Linear's forward on them;
    a GPT-2 ``Conv1D`` (x·W with W stored (in, out)) or a subclass with its own forward
    (FalconLinear reads ``self.weight``) cannot run on them. The architecture is built on the meta device
    (no memory, no weights) to see what each quantized name is there.
    """
    try:
        with torch.device("meta"):
            skeleton = type(model)(model.config)
    except Exception:  # noqa: BLE001 - an architecture its config cannot rebuild: nothing to compare against
        return
    modules = dict(skeleton.named_modules())
    for name in quantized:
        built = modules.get(name)
        if built is None:
            continue
        if linear_kind(built) != "linear":
            why = f"a {type(built).__name__} (weight stored (in, out)), not an nn.Linear"
        elif type(built).forward is not nn.Linear.forward:
            why = f"a {type(built).__name__}, whose own forward reads .weight (which the format replaces)"
        else:
            continue
        raise UnsupportedError(
            f"compressed-tensors export: {type(model).__name__} builds {name!r} as {why}, and the format's "
            "loaders (transformers, vLLM) handle plain nn.Linear modules only; export this model with "
            "slimkit.save or to ONNX instead")


def _tie_broken(model: nn.Module) -> bool:
    """Whether the output layer no longer shares the input embedding's tensor (one of them quantized)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    if emb is None or head is None:
        return False
    w_in, w_out = getattr(emb, "weight", None), getattr(head, "weight", None)
    return w_in is None or w_out is None or w_in is not w_out
