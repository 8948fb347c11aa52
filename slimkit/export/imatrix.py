"""Importance matrices in llama.cpp's GGUF format, from slimkit's calibration data.

llama.cpp's quantizer (``llama-quantize --imatrix FILE``) weighs each input column of a
weight by the mean square of the activations that column multiplies, collected by its own
``llama-imatrix`` tool. ``collect_imatrix`` gathers the same statistic in PyTorch from a
``CalibrationData`` (forward pre-hooks on every Linear-like layer, slimkit's quantized
layers included), and ``write_imatrix`` writes it as ``tools/imatrix/imatrix.cpp`` does, so
the file is read by ``common/imatrix-loader.cpp``:

- per weight, ``<gguf name>.in_sum2``: F32, the sum over tokens of x² per input column
  (ggml shape ``[n_in]``: imatrix.cpp makes a 2-D ``[n_in, 1]`` tensor for a dense weight,
  which ggml stores with its one non-trivial dimension);
- ``<gguf name>.counts``: F32 ``[1]``, the number of tokens summed (the quantizer divides
  the sums by it);
- KV ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32): chunks of ``chunk_size``
  tokens (one calibration row; imatrix.cpp's ``n_ctx``), and the tokens of the
  most-fed tensor divided by it (imatrix.cpp's ``m_last_chunk``);
- tensors in sorted name order, no ``general.architecture`` (imatrix.cpp writes none).

Which weights get an entry is ``name_of``'s choice; ``gguf_names_for(model)`` maps every
``blk.*`` weight as llama-imatrix does (``output.weight`` only with ``include_output``, its
``--process-output``). Sums are accumulated in float64 and written as float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.calibration import (
    CalibrationData,
    _model_device,
    _to,
    run_model,
    trim_padding,
)
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.linear_like import linear_kind
from slimkit.core.modules import SlimkitModule
from slimkit.export.gguf_blocks import write_gguf_file


@dataclass
class ImatrixStats:
    """Per layer (module name): float64 sums of x² per input column, and the tokens summed."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = 0  # tokens per calibration row (llama.cpp's chunk), 0 if unknown

    @property
    def chunk_count(self) -> int:
        """Chunks of ``chunk_size`` tokens seen by the most-fed layer (imatrix.cpp's ``m_last_chunk``)."""
        if not self.chunk_size or not self.counts:
            return 0
        return max(self.counts.values()) // self.chunk_size

    def mean(self, name: str) -> np.ndarray:
        """The mean of x² per input column of layer ``name`` (what llama-quantize weighs with)."""
        return self.sums[name] / max(self.counts[name], 1)


def imatrix_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose inputs an importance matrix covers: Linear-like layers (nn.Linear and subclasses,
    transformers' Conv1D) and slimkit's replacement layers computing x·Wᵀ (QuantLinear, TiedQuantLinear,
    LLMInt8Linear, FactorizedLinear: any ``SlimkitModule`` with integer ``in_features`` and ``out_features``)."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if linear_kind(module) is not None:
            out[name] = module
        elif isinstance(module, SlimkitModule) and isinstance(getattr(module, "in_features", None), int) \
                and isinstance(getattr(module, "out_features", None), int):
            out[name] = module
    return out


@torch.no_grad()
def collect_imatrix(model: nn.Module, data: CalibrationData) -> ImatrixStats:
    """Sum over every calibration token of x² per input column of each Linear-like layer, and the token counts.

    The model runs each batch once in eval mode without gradients. Padding positions (where a
    dict batch carries an ``attention_mask`` matching the layer input's batch and token axes)
    are left out, as llama.cpp never sees them. ``chunk_size`` is the calibration rows' length.
    """
    layers = imatrix_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Linear-like layer to collect an importance matrix for")
    stats = ImatrixStats()
    sums: dict[str, torch.Tensor] = {}
    padding: list[torch.Tensor | None] = [None]

    def hook_for(name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return
            mask = padding[0]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            sq = rows.square().sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq
            stats.counts[name] = stats.counts.get(name, 0) + rows.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in layers.items()]
    device = _model_device(model)
    was_training = model.training
    model.eval()
    lengths: set[int] = set()
    try:
        for batch in data:
            batch = trim_padding(_to(batch, device))
            padding[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            ids = batch.get("input_ids", next(iter(batch.values()))) if isinstance(batch, dict) else batch
            if ids.dim() >= 2:
                lengths.add(int(ids.shape[1]))
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise DataError("no Linear-like layer received a calibration input: nothing to write")
    stats.sums = {n: s.cpu().numpy() for n, s in sums.items()}
    stats.chunk_size = lengths.pop() if len(lengths) == 1 else 0
    return stats


def gguf_names_for(model: nn.Module, include_output: bool = False) -> Callable[[str], str | None]:
    """``name_of``: a module name of ``model`` -> its weight's GGUF tensor name, or None.

    Names come from the ``gguf`` package's map for the model's llama.cpp architecture
    (``slimkit.export.gguf.ARCHS``), as ``export_gguf`` names the tensors it writes. Only
    ``blk.*`` weights are mapped (llama-imatrix collects those); ``include_output`` adds
    ``output.weight`` (its ``--process-output``).
    """
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ConfigError("imatrix files need the gguf package: pip install 'slimkit[gguf]'") from exc
    from slimkit.export.gguf import ARCHS

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(f"no GGUF tensor names for model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == ARCHS[model_type])
    tensor_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))

    def name_of(module_name: str) -> str | None:
        name = tensor_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if name is None:
            return None
        if name.startswith("blk.") or (include_output and name == "output.weight"):
            return name
        return None

    return name_of


def write_imatrix(stats: ImatrixStats, path: str | os.PathLike, name_of: Callable[[str], str | None],
                  dataset: str | Sequence[str] = "slimkit calibration") -> Path:
    """Write ``stats`` as llama.cpp's GGUF imatrix file ``path`` (see the module docstring); returns the path.

    ``name_of`` maps a module name to its GGUF weight name (None: left out). Two layers mapped
    to one name, or no layer mapped at all, is a ConfigError. The file is written to a
    temporary name beside ``path`` and renamed into place.
    """
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("imatrix files need the gguf package: pip install 'slimkit[gguf]'") from exc
    entries: dict[str, str] = {}
    for module_name in stats.sums:
        name = name_of(module_name)
        if name is None:
            continue
        if name in entries:
            raise ConfigError(f"layers {entries[name]} and {module_name} both map to GGUF tensor {name}")
        entries[name] = module_name
    if not entries:
        raise ConfigError("no layer of the importance matrix maps to a GGUF tensor name")
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)

    path = Path(path)

    def fill(writer: Any) -> None:
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # imatrix.cpp writes no architecture
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, stats.chunk_count)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, stats.chunk_size)
        for name in sorted(entries):
            module_name = entries[name]
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(stats.sums[module_name], dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.array([stats.counts[module_name]], dtype=np.float32))

    write_gguf_file(path, "", fill)
    return path


def read_imatrix(path: str | os.PathLike) -> dict[str, Any]:
    """The file ``path`` as ``{"kv": {key: value}, "sums": {name: array}, "counts": {name: int}}`` (for checks)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    kv: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kv[key] = f.contents()
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = int(round(float(np.asarray(t.data).reshape(-1)[0])))
    return {"kv": kv, "sums": sums, "counts": counts}


__all__ = ["ImatrixStats", "collect_imatrix", "gguf_names_for", "imatrix_layers", "read_imatrix", "write_imatrix"]
