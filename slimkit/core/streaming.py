"""Layer-by-layer compression of a checkpoint too big for memory: one decoder block loaded at a time.

``compress_checkpoint(src, out, config, data)`` builds the model on the meta device (no
weight memory), loads only what the first block's inputs need (embeddings, rotary
tables), then hands the blockwise handler (GPTQ, AWQ, SmoothQuant, ...) one block at a
time through ``BlockStream``: a block's tensors are read from the source safetensors just
before it is worked on, and right after its outputs for the next block are computed it
is written to the output file and put back on the meta device. Peak memory stays near
one block, the calibration activations and the method's own statistics (a Hessian).

``SafetensorsWriter`` writes a valid safetensors file incrementally (tensor data to a
side file, then header + data), so the compressed model is never held whole either.

The source folder is untrusted like any model folder (``core.io``): its config runs no code
and names only a transformers model class, its files stay inside it, the meta model must fit
the bytes its safetensors hold, and each tensor read must have the shape and dtype kind the
meta model expects and finite values.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.atomic import MODEL_FOLDER, atomic_dir
from slimkit.core.calibration import CalibrationData, find_blocks
from slimkit.core.errors import ModelLoadError, UnsupportedError
from slimkit.core.io import (
    INDEX_LIMIT,
    _load_tokenizer,
    attach_info,
    auto_config,
    build_transformers,
    check_capacity,
    check_finite,
    check_folder,
    check_layer_counts,
    check_safetensors,
    dtypes_conflict,
    model_class,
    read_config,
    read_json_file,
    stored_tensors,
)
from slimkit.core.linear_like import LinearLike, in_features
from slimkit.core.sparse_storage import safetensors_header

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsWriter:
    """Write tensors one by one into a safetensors file at ``path``, holding none of them after ``add``.

    Data goes to ``path + ".data"`` as it comes; ``close`` writes the header and copies the
    data behind it. Names must be unique; tensors are stored contiguous, in the order added.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name``."""
        if name in self._entries:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._data.write(raw)
        self._entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def close(self) -> Path:
        """Write the final file (header, then the data) and remove the side file; returns the path."""
        self._data.close()
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(safetensors_header(self._entries))
            shutil.copyfileobj(data, out, length=16 << 20)
        self._data_path.unlink()
        return self.path


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so peak RSS tracks one block.

    A block's weights are tens of MB; once glibc's adaptive mmap threshold has risen, such
    buffers come from the heap, and freed heap pages stay in the process (RSS grows block
    after block) unless trimmed. A no-op where there is no glibc.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CheckpointIndex:
    """Which safetensors file of a checkpoint folder holds each tensor (single file or sharded index).

    ``stored`` gives each tensor's dtype and shape from the headers, ``data_bytes`` the tensor
    data of all files, so the model can be checked against them before anything is read.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        check_folder(self.folder)
        index = self.folder / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        self.stored: dict[str, Any] = {}
        self.data_bytes = 0
        if os.path.lexists(index):
            data = read_json_file(index, self.folder, INDEX_LIMIT)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise ModelLoadError(f"{index} is not a valid safetensors index (its 'weight_map' must map tensor "
                                     "names to file names)")
            for name, file in weight_map.items():
                if Path(file).is_absolute() or len(Path(file).parts) != 1 or not file.endswith(".safetensors"):
                    raise ModelLoadError(f"{index}: {name!r} is mapped to {file!r}, not a .safetensors file of "
                                         f"{self.folder}")
            self.where = {k: self.folder / v for k, v in weight_map.items()}
            files = sorted(set(self.where.values()))
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{self.folder} has no .safetensors weights")
        for f in files:
            try:
                check_safetensors(f, self.folder)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{f.name} is not a readable safetensors file: {exc}") from None
            tensors, _aliases, nbytes = stored_tensors(f)
            self.data_bytes += nbytes
            self.stored.update(tensors)
            if not os.path.lexists(index):
                self.where.update({k: f for k in tensors})
        lost = [k for k, f in self.where.items() if k not in self.stored]
        if lost:
            raise ModelLoadError(f"{index} maps {len(lost)} tensor(s) to files that do not hold them "
                                 f"(e.g. {lost[0]!r} in {self.where[lost[0]].name})")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened only for the read (so its pages are not kept mapped)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, keys in by_file.items():
            with safe_open(f, "pt") as handle:
                for k in keys:
                    out[k] = handle.get_tensor(k)
        check_finite(out.items(), self.folder)
        return out

    def check(self, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Refuse stored tensors ``prefix + name`` whose shape or dtype kind differs from ``expected[name]`` (meta tensors)."""
        for name, t in expected.items():
            stored = self.stored.get(prefix + name)
            if stored is None:
                continue
            if tuple(stored.shape) != tuple(t.shape) or dtypes_conflict(stored.dtype, t.dtype):
                raise ModelLoadError(f"{self.where[prefix + name]}: tensor {prefix + name!r} is {stored.dtype} "
                                     f"{tuple(stored.shape)} in the file but the model expects {t.dtype} "
                                     f"{tuple(t.shape)}")

    def under(self, prefix: str) -> list[str]:
        """Every tensor name starting with ``prefix``."""
        return [k for k in self.where if k.startswith(prefix)]


def lazy_model(folder: str | os.PathLike, index: CheckpointIndex | None = None) -> nn.Module:
    """The Hugging Face model in ``folder`` built on the meta device: its structure, no weight memory.

    The config must run no code (``io.read_config``: no ``auto_map``) and name a transformers
    model class, and the model it describes must fit the bytes of the folder's safetensors
    (``index``, read from the folder when not given).
    """
    folder = Path(folder)
    index = index or CheckpointIndex(folder)
    config_file = folder / "config.json"
    raw = read_config(folder)
    check_layer_counts(raw, len(index.stored), config_file, f"the .safetensors files in {folder}")
    config = auto_config(folder)
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedError(f"{config_file} names no transformers model class (architectures: {archs})")
    cls = model_class(archs[0], config_file)
    with torch.device("meta"):
        model = build_transformers(cls, config, config_file)
    smallest = min((t.dtype.itemsize for t in index.stored.values()), default=4)
    check_capacity(model, index.data_bytes, str(config_file), f"the .safetensors files in {folder}",
                   float_bits=8 * smallest, slack=2.0)
    model.eval()
    return attach_info(model, source=str(folder), tokenizer=_load_tokenizer(folder))


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MemoryEstimate:
    """What a streamed run should hold at its peak, in bytes, before it starts."""

    block: int
    activations: int
    statistics: int
    outside_blocks: int

    @property
    def peak(self) -> int:
        """Two copies of a block, the activations and the statistics (the outside-block part is freed first)."""
        # A block's float weights and, until the block is finished, its quantized stand-ins: twice.
        return max(2 * self.block + self.activations + self.statistics, self.outside_blocks + self.activations // 2)

    def describe(self) -> str:
        """One line for the user."""
        mb = 1 / 2**20
        return (f"memory estimate: one block {self.block * mb:.1f} MB (x2 while its layers are replaced) + calibration activations "
                f"{self.activations * mb:.1f} MB + statistics {self.statistics * mb:.1f} MB "
                f"= {self.peak * mb:.1f} MB at the peak (embeddings and head {self.outside_blocks * mb:.1f} MB, "
                f"loaded only to capture the first block's inputs)")


def memory_estimate(model: nn.Module, data: CalibrationData) -> MemoryEstimate:
    """Estimate a blockwise run's peak from the (meta) model's shapes and the calibration size.

    Activations: the block inputs and outputs of every calibration token (float32).
    Statistics: the largest Hessian (in × in, float32) of a Linear in a block, times four
    (the Hessian, its damped copy, its Cholesky factor and the inverse's factor, as GPTQ
    holds them). Attention scores of one batch are included with the activations. The
    Python process itself (torch, transformers: about 0.4 GB here) comes on top.
    """
    blocks_name, blocks = find_blocks(model)
    block_bytes = max(_bytes(b.parameters()) + _bytes(b.buffers()) for b in blocks)
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or
                 max((in_features(m) for m in blocks[0].modules() if isinstance(m, LinearLike)), default=0))
    tokens = 0
    rows_per_batch, seq = 1, 1
    for batch in data.batches:
        t = batch["input_ids"] if isinstance(batch, dict) and "input_ids" in batch else (
            next(iter(batch.values())) if isinstance(batch, dict) else batch)
        tokens += t.numel()
        rows_per_batch, seq = int(t.shape[0]), int(t.shape[-1])
    heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1)
    activations = 2 * tokens * hidden * 4 + rows_per_batch * heads * seq * seq * 4
    widest = max((in_features(m) for m in blocks[0].modules() if isinstance(m, LinearLike)), default=0)
    statistics = 4 * widest * widest * 4
    outside = _bytes(p for n, p in model.named_parameters() if not n.startswith(blocks_name + "."))
    return MemoryEstimate(block_bytes, activations, statistics, outside)


class BlockStream:
    """Feeds ``run_blockwise`` one block at a time from ``index`` and writes each finished block to ``writer``."""

    def __init__(self, index: CheckpointIndex, writer: SafetensorsWriter) -> None:
        self.index = index
        self.writer = writer
        self._outside: list[tuple[nn.Module, str, bool]] = []  # (owner, attribute, is_parameter) loaded for capture
        self.blocks_name = ""

    def prepare(self, model: nn.Module, blocks_name: str) -> None:
        """Load every tensor outside the blocks (embedding, rotary tables, ...) so the first block's inputs can be captured."""
        self.blocks_name = blocks_name
        prefix = blocks_name + "."
        groups: dict[int, list[tuple[nn.Module, str, str, bool]]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            if mname.startswith(prefix) or mname == blocks_name:
                continue
            for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is None:
                    continue
                full = f"{mname}.{attr}" if mname else attr
                groups.setdefault(id(t), []).append((module, attr, full, attr in module._parameters))
        rebuilt: dict[int, nn.Module] = {}
        for owners in groups.values():
            stored = [full for _, _, full, _ in owners if full in self.index.where]
            if stored:
                owner, attr = owners[0][0], owners[0][1]
                self.index.check({stored[0]: getattr(owner, attr)})
                value = self.index.read([stored[0]])[stored[0]]
            else:
                value = self._recompute(model, owners[0][0], owners[0][1], rebuilt)
            for module, attr, _full, is_param in owners:
                if is_param:
                    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[attr] = value
                self._outside.append((module, attr, is_param))

    @staticmethod
    def _recompute(model: nn.Module, module: nn.Module, attr: str, rebuilt: dict[int, nn.Module]) -> torch.Tensor:
        """A buffer the checkpoint does not hold (e.g. rotary ``inv_freq``): rebuild its module on the CPU."""
        if id(module) not in rebuilt:
            try:
                rebuilt[id(module)] = type(module)(config=model.config)
            except Exception as exc:
                raise UnsupportedError(f"{type(module).__name__}.{attr} is not in the checkpoint and cannot be "
                                       f"recomputed ({exc}); streaming supports Hugging Face decoders") from None
        return getattr(rebuilt[id(module)], attr)

    def load_block(self, name: str, block: nn.Module) -> None:
        """Read block ``name``'s tensors from the checkpoint into it (before it is worked on)."""
        if self._outside:  # the first block's inputs are captured: the embedding and head can go
            for module, attr, is_param in self._outside:
                store = module._parameters if is_param else module._buffers
                t = store[attr]
                store[attr] = (nn.Parameter(t.to("meta"), requires_grad=False) if is_param else t.to("meta"))
            self._outside = []
        prefix = name + "."
        expected = block.state_dict()
        self.index.check(expected, prefix)  # shapes and dtypes from the header, before reading
        unexpected = [k for k in self.index.under(prefix) if k[len(prefix):] not in expected]
        if unexpected:
            raise ModelLoadError(f"{self.index.folder}: {unexpected[0]!r} is not a tensor of the model's block {name}")
        state = {k[len(prefix):]: v for k, v in self.index.read(self.index.under(prefix)).items()}
        block.load_state_dict(state, strict=False, assign=True)
        still_meta = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if still_meta:
            raise UnsupportedError(f"{name}.{still_meta[0]} is not in the checkpoint; cannot stream this block")

    def release_block(self, name: str, block: nn.Module) -> None:
        """Write the finished block to the output file and free its memory."""
        for k, t in block.state_dict().items():
            self.writer.add(f"{name}.{k}", t)
        block.to("meta")
        return_freed_memory()

    def finish(self, model: nn.Module) -> None:
        """Copy every tensor outside the blocks from the source to the output (unchanged by blockwise methods)."""
        prefix = self.blocks_name + "."
        for key in self.index.where:
            if not key.startswith(prefix) and key not in self.writer:
                self.writer.add(key, self.index.read([key])[key])


def compress_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, config: Any,
                        data: CalibrationData, ctx: Any = None, *,
                        apply: Callable[[nn.Module, Any, CalibrationData, Any], Any]) -> Path:
    """Apply one blockwise ``config`` (GPTQ, AWQ, SmoothQuant, ...) to the checkpoint in ``source``, block by block.

    ``apply(model, config, data, ctx)`` runs the technique (``slimkit.api.apply``; passed in
    so core needs no upward import: use ``slimkit.compress_checkpoint``, which supplies it).
    Writes a slimkit checkpoint to ``out_dir`` (atomically) that ``slimkit.load`` reads.
    The memory estimate is added to ``ctx.notes`` (and returned in them) before the run.
    """
    from slimkit.core.io import META_FILE, WEIGHTS_FILE, checkpoint_meta, tokenizer_of
    from slimkit.core.registry import Context

    if not getattr(config, "needs_data", False):
        raise UnsupportedError(f"{type(config).__name__} does not calibrate block by block; "
                               "streaming is for GPTQ, AWQ, SmoothQuant and other blockwise methods")
    ctx = ctx or Context()
    source, out_dir = Path(source), Path(out_dir)
    index = CheckpointIndex(source)
    model = lazy_model(source, index)
    ctx.note(memory_estimate(model, data).describe())
    with atomic_dir(out_dir, kind=MODEL_FOLDER) as tmp:  # never replaces a folder slimkit did not write
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE)
        stream = BlockStream(index, writer)
        ctx.stream = stream
        try:
            apply(model, config, data, ctx)
        finally:
            ctx.stream = None
        if not stream.blocks_name:
            raise UnsupportedError(f"{type(config).__name__} did not walk the model's blocks; it cannot be streamed")
        stream.finish(model)
        writer.close()
        model.config.save_pretrained(tmp)
        tokenizer = tokenizer_of(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(checkpoint_meta(model), indent=2))
    return out_dir
