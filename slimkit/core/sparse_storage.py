"""Compact storage of sparse weights in a safetensors file, and tied tensors stored once.

A pruned float tensor ``<name>`` is written as two tensors when that is smaller than the
dense form:

- ``<name>.__bitmask``: uint8, 1-D, ``ceil(numel / 8)`` bytes. Bit ``i`` of the row-major
  flattened tensor is bit ``i % 8`` of byte ``i // 8``, least significant bit first
  ("little" bit order, as ``numpy.packbits(..., bitorder="little")``); 1 = non-zero. The
  padding bits of the last byte are 0.
- ``<name>.__values``: the non-zero entries in row-major order, 1-D, in the tensor's dtype.

The original shape and dtype are recorded in the file's metadata under ``slimkit.sparse``
(JSON: ``{name: {"shape": [...], "dtype": "float32"}}``). At 50% sparsity a float32 tensor
then takes 0.5 + 1/32 of its dense bytes (a float16 one 0.5 + 1/16).

Which tensors: floating point (float16, bfloat16, float32, float64) with >= 2 dims, or
1-D with >= 1024 elements, whose compact form (with its extra header entries) is smaller
than the dense one. Integer tensors (quantized codes) and small vectors stay dense.

Zeros are zeros: an entry is stored when it is ``!= 0``, so ``-0.0`` is reloaded as
``+0.0`` (``torch.equal`` holds; the sign bit of a zero is not kept). NaN and inf are
non-zero and kept bit for bit.

Tied tensors (several names viewing the same memory, e.g. tied embeddings) are written once
under the first name; the others are listed under ``slimkit.aliases`` (JSON:
``{alias: stored_name}``). Files from ``safetensors.torch.save_model`` (which records an
alias as a plain metadata entry ``alias -> stored_name``) are read the same way.

Sparse integer codes (a pruned, then quantized layer): a code tensor whose layer gives its
``CodeLayout`` (bits per code, and the stored code of a zero weight, e.g. 8 for symmetric
4-bit) is written, when smaller, as ``<name>.__bitmask`` (1 bit per *code*, 1 = not the zero
code) and ``<name>.__codes`` (the other codes, packed ``bits`` at a time, lowest bits first),
recorded under ``slimkit.sparse_codes`` (``{name: {shape, dtype, bits, fill}}``). A 50%-sparse
int4 weight then takes 1 + 2 bits per weight instead of 4, before its scales.

A code tensor whose non-zero codes follow the 2:4 pattern (at most 2 of every 4 consecutive
codes differ from the zero code: a 2:4-pruned, then quantized layer) is written, when that is
smaller, as ``<name>.__nm_index`` (for every 4 codes, which 2 positions are kept: one of the 6
pairs, 3 bits each, packed lowest bits first) and ``<name>.__codes`` (exactly 2 codes per 4,
packed); its record says ``"pattern": "2:4"``. A 2:4 int4 weight then takes 0.75 + 2 bits per weight.

A float32 tensor whose every value is exactly a float16 value (scales chosen in float16, a
model stored in half precision, norms of 1.0) is written as float16 and listed under
``slimkit.fp16_exact``; it loads as the same float32 values, bit for bit.

``stored_layout(path)`` gives, from the header alone (no tensor data read), the dtype and
shape of every tensor ``load_state_dict`` would return, compact pairs resolved and checked
against each other, so a loader can compare them with the model it expects before it
allocates anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

BITMASK_SUFFIX = ".__bitmask"
VALUES_SUFFIX = ".__values"
CODES_SUFFIX = ".__codes"
NM_INDEX_SUFFIX = ".__nm_index"
SPARSE_KEY = "slimkit.sparse"
SPARSE_CODES_KEY = "slimkit.sparse_codes"
FP16_KEY = "slimkit.fp16_exact"
MIN_FP16_ELEMENTS = 64  # smaller tensors save less than their name costs in the metadata
# The 6 ways to keep 2 of 4 positions; a 2:4 group's index into this table is stored in 3 bits.
PAIRS_2_4 = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
CODE_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
ALIASES_KEY = "slimkit.aliases"
COMPACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_1D_ELEMENTS = 1024
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in COMPACT_DTYPES}
# safetensors' dtype names (the header's "dtype") -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
# Metadata keys that are slimkit's records, never save_model's alias entries.
_RESERVED_KEYS = (SPARSE_KEY, SPARSE_CODES_KEY, ALIASES_KEY, FP16_KEY, "format")
# Header bytes a compact pair costs beyond the dense entry: two JSON entries of about
# len(name) + 80 characters, plus the shape/dtype record in the metadata.
_PAIR_HEADER_BYTES = 240


# -- pure functions -----------------------------------------------------------------------
def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into uint8, bit ``i`` -> bit ``i % 8`` of byte ``i // 8`` (LSB first)."""
    flags = flags.reshape(-1).to(torch.uint8)
    n = flags.numel()
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[:n] = flags
    groups = padded.view(-1, 8)  # (bytes, 8): column b is bit b of each byte
    out = torch.zeros(groups.shape[0], dtype=torch.uint8, device=flags.device)
    for b in range(8):  # uint8 throughout: no int64 temporary the size of the tensor
        out |= groups[:, b] << b
    return out


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``pack_bits`` output as a 1-D bool tensor; ValueError for a wrong length or padding."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"a bitmask must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != math.ceil(n / 8):
        raise ValueError(f"a bitmask of {n} bits needs {math.ceil(n / 8)} bytes, got {packed.numel()}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.bool)  # (bytes * 8,)
    if bool(bits[n:].any()):
        raise ValueError("the bitmask's padding bits are not zero (corrupt data)")
    return bits[:n]


def pack_sparse(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bitmask, values)`` of ``t``: the packed non-zero flags and the non-zeros in row-major order."""
    flat = t.detach().reshape(-1)
    nonzero = flat != 0
    return pack_bits(nonzero), flat[nonzero].clone()


def unpack_sparse(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The dense tensor of ``shape`` that ``pack_sparse`` packed; ValueError when the parts do not fit together."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    nonzero = unpack_bits(bitmask, n)
    count = int(nonzero.sum())
    if values.dim() != 1 or values.numel() != count:
        raise ValueError(f"the bitmask marks {count} non-zeros but {values.numel()} values are stored")
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    out[nonzero] = values
    return out.reshape(shape)


@dataclass(frozen=True)
class CodeLayout:
    """How a tensor holds integer codes: ``bits`` per code (2, 4 or 8; below 8 several per byte, lowest
    bits first) and ``fill``, the stored code of a zero weight."""

    bits: int
    fill: int

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8) or not 0 <= self.fill < 2**self.bits:
            raise ValueError(f"a code layout needs bits 2, 4 or 8 and a fill code below 2^bits, got {self}")


def code_stream(t: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes a 1-byte integer tensor holds, as a 1-D uint8 stream (each byte's lowest bits first)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if bits == 8:
        return raw
    mask = 2**bits - 1
    return torch.stack([(raw >> (bits * i)) & mask for i in range(8 // bits)], dim=1).reshape(-1)


def pack_code_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``code_stream``: uint8 bytes holding ``codes`` (zero-padded to whole bytes)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    per = 8 // bits
    padded = torch.zeros(math.ceil(codes.numel() / per) * per, dtype=torch.uint8)
    padded[:codes.numel()] = codes
    grouped = padded.view(-1, per)
    out = torch.zeros(grouped.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= grouped[:, i] << (bits * i)
    return out


def pack_uint_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``values`` (each < 2^bits, 1 <= bits <= 8) as a little-endian bit stream in uint8, value i at bits
    [i·bits, (i+1)·bits), the first value in the lowest bits; the last byte zero-padded."""
    v = values.reshape(-1).to(torch.int64)
    n = v.numel()
    positions = torch.arange(n, dtype=torch.int64) * bits
    out = torch.zeros(math.ceil(n * bits / 8) + 1, dtype=torch.int64)
    byte, shift = positions // 8, positions % 8
    word = v << shift  # at most 15 bits: spills into the next byte at most
    out.index_add_(0, byte, word & 0xFF)
    out.index_add_(0, byte + 1, word >> 8)
    return out[:math.ceil(n * bits / 8)].to(torch.uint8)


def unpack_uint_stream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_uint_stream``: the first ``n`` values, int64."""
    b = torch.cat([packed.reshape(-1).to(torch.int64), torch.zeros(1, dtype=torch.int64)])
    positions = torch.arange(n, dtype=torch.int64) * bits
    byte, shift = positions // 8, positions % 8
    word = b[byte] | (b[byte + 1] << 8)
    return (word >> shift) & (2**bits - 1)


def pack_2of4_codes(t: torch.Tensor, layout: CodeLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(pair indices, kept codes)`` when every 4 consecutive codes hold at most 2 that are not ``layout.fill``;
    else None. A group with fewer than 2 kept codes stores the fill code in the spare kept slot."""
    stream = code_stream(t, layout.bits)
    if stream.numel() % 4:
        return None
    groups = stream.reshape(-1, 4)
    kept = groups != layout.fill
    if bool((kept.sum(dim=1) > 2).any()):
        return None
    # Mark the spare positions of groups with 0 or 1 kept codes: fill from the left (position 0, then 1, ...).
    chosen = kept.clone()
    for pos in range(4):
        need = chosen.sum(dim=1) < 2
        chosen[:, pos] |= need & ~chosen[:, pos]
    table = torch.zeros(16, dtype=torch.int64)  # bitmask of the 2 kept positions -> pair index
    for i, (a, b) in enumerate(PAIRS_2_4):
        table[(1 << a) | (1 << b)] = i
    masks = (chosen.to(torch.int64) << torch.arange(4)).sum(dim=1)
    index = table[masks]
    codes = groups[chosen].reshape(-1, 2)  # row-major: the 2 kept codes of each group in position order
    return pack_uint_stream(index, 3), pack_code_stream(codes.reshape(-1), layout.bits)


def unpack_2of4_codes(index: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...] | list[int],
                      dtype: torch.dtype, layout: CodeLayout) -> torch.Tensor:
    """The code tensor ``pack_2of4_codes`` packed; ValueError when the parts do not fit together."""
    shape = tuple(int(s) for s in shape)
    n_codes = math.prod(shape) * (8 // layout.bits)
    if n_codes % 4:
        raise ValueError(f"{n_codes} codes do not split into groups of 4")
    n_groups = n_codes // 4
    if index.dtype != torch.uint8 or index.dim() != 1 or index.numel() != math.ceil(n_groups * 3 / 8):
        raise ValueError(f"{n_groups} groups of 4 need {math.ceil(n_groups * 3 / 8)} index bytes, "
                         f"{index.numel()} are stored")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(2 * n_groups * layout.bits / 8):
        raise ValueError(f"{n_groups} groups keep {2 * n_groups} codes, which take "
                         f"{math.ceil(2 * n_groups * layout.bits / 8)} bytes, but {packed.numel()} are stored")
    idx = unpack_uint_stream(index, 3, n_groups)
    if bool((idx >= len(PAIRS_2_4)).any()):
        raise ValueError("a 2:4 pair index is above 5")
    pairs = torch.tensor(PAIRS_2_4, dtype=torch.int64)[idx]  # (groups, 2) positions
    kept_codes = code_stream(packed, layout.bits)[:2 * n_groups].reshape(-1, 2)
    stream = torch.full((n_groups, 4), layout.fill, dtype=torch.uint8)
    stream.scatter_(1, pairs, kept_codes)
    return pack_code_stream(stream.reshape(-1), layout.bits).view(dtype).reshape(shape)


def fp16_exact(t: torch.Tensor) -> bool:
    """Whether float32 ``t`` (of at least ``MIN_FP16_ELEMENTS`` entries) holds only float16 values, so float16 storage is lossless."""
    if t.dtype != torch.float32 or t.numel() < MIN_FP16_ELEMENTS or t.device.type == "meta":
        return False
    h = t.to(torch.float16)
    return bool(torch.equal(h.to(torch.float32), t)) and bool(torch.isfinite(h).all() == torch.isfinite(t).all())


def pack_sparse_codes(t: torch.Tensor, layout: CodeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bitmask, packed codes)``: one bit per code (1 = not ``layout.fill``) and the other codes packed."""
    stream = code_stream(t, layout.bits)
    kept = stream != layout.fill
    return pack_bits(kept), pack_code_stream(stream[kept], layout.bits)


def unpack_sparse_codes(bitmask: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...] | list[int],
                        dtype: torch.dtype, layout: CodeLayout) -> torch.Tensor:
    """The code tensor ``pack_sparse_codes`` packed; ValueError when the parts do not fit together."""
    shape = tuple(int(s) for s in shape)
    n_codes = math.prod(shape) * (8 // layout.bits)
    kept = unpack_bits(bitmask, n_codes)
    count = int(kept.sum())
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(count * layout.bits / 8):
        raise ValueError(f"the bitmask marks {count} codes, which take {math.ceil(count * layout.bits / 8)} bytes, "
                         f"but {packed.numel()} are stored")
    stream = torch.full((n_codes,), layout.fill, dtype=torch.uint8)
    stream[kept] = code_stream(packed, layout.bits)[:count]
    return pack_code_stream(stream, layout.bits).view(dtype).reshape(shape)


def should_compact_codes(t: torch.Tensor, layout: CodeLayout) -> bool:
    """Whether the code tensor ``t`` is smaller as bitmask + packed codes (it needs enough zero codes)."""
    if t.dtype not in CODE_DTYPES.values() or t.numel() == 0 or t.device.type == "meta":
        return False
    stream = code_stream(t, layout.bits)
    kept = int((stream != layout.fill).sum())
    compact = math.ceil(stream.numel() / 8) + math.ceil(kept * layout.bits / 8)
    return compact + _PAIR_HEADER_BYTES < t.numel()


def _bitmask_nbytes(t: torch.Tensor, layout: CodeLayout) -> int:
    """Payload bytes of ``t``'s codes stored as bitmask + kept codes."""
    stream = code_stream(t, layout.bits)
    kept = int((stream != layout.fill).sum())
    return math.ceil(stream.numel() / 8) + math.ceil(kept * layout.bits / 8)


def compact_nbytes(numel: int, nonzeros: int, itemsize: int) -> int:
    """Payload bytes of the compact form: the bitmask plus the non-zero values."""
    return math.ceil(numel / 8) + nonzeros * itemsize


def should_compact(t: torch.Tensor) -> bool:
    """Whether ``t`` is written compactly: a float tensor of >= 2 dims (or >= 1024 elements) that shrinks."""
    if t.dtype not in COMPACT_DTYPES or t.numel() == 0 or t.device.type == "meta":
        return False
    if t.dim() < 2 and t.numel() < MIN_1D_ELEMENTS:
        return False
    nonzeros = int(torch.count_nonzero(t))
    dense = t.numel() * t.element_size()
    return compact_nbytes(t.numel(), nonzeros, t.element_size()) + _PAIR_HEADER_BYTES < dense


def dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (each shared memory once) and ``{alias: stored_name}`` for the names dropped.

    Names are aliases when they view the same memory the same way (same storage, offset,
    shape, strides, dtype): tied weights. Other tensors that overlap one storage
    differently are copied, so each is written whole.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue  # empty tensors all report data_ptr 0: never aliases
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(key, []).append(name)
    aliases = {alias: names[0] for names in groups.values() for alias in names[1:]}
    unique = {k: v for k, v in state.items() if k not in aliases}
    per_storage = Counter(v.untyped_storage().data_ptr() for v in unique.values() if v.numel())
    for name, t in unique.items():
        if t.numel() and per_storage[t.untyped_storage().data_ptr()] > 1:
            unique[name] = t.clone()
    return unique, aliases


def encode_state_dict(state: dict[str, torch.Tensor], code_layouts: dict[str, CodeLayout] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata to write for ``state``: tied tensors once, sparse ones compact
    (float tensors by value, code tensors named in ``code_layouts`` by code)."""
    unique, aliases = dedupe_shared(state)
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    sparse_codes: dict[str, dict[str, Any]] = {}
    half: list[str] = []  # float32 tensors stored as float16 (every value exact)
    code_layouts = code_layouts or {}
    for name, t in unique.items():
        t = t.detach()
        layout = code_layouts.get(name)
        nm = pack_2of4_codes(t.cpu(), layout) if layout is not None and t.numel() and t.device.type != "meta" \
            and t.dtype in CODE_DTYPES.values() else None
        if nm is not None and sum(x.numel() for x in nm) + _PAIR_HEADER_BYTES < min(t.numel(), _bitmask_nbytes(t, layout)):
            for suffix in (NM_INDEX_SUFFIX, CODES_SUFFIX):
                if name + suffix in unique:
                    raise ValueError(f"cannot store {name!r} compactly: the state dict already has {name + suffix!r}")
            tensors[name + NM_INDEX_SUFFIX], tensors[name + CODES_SUFFIX] = nm
            sparse_codes[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                  "bits": layout.bits, "fill": layout.fill, "pattern": "2:4"}
        elif layout is not None and should_compact_codes(t, layout):
            for suffix in (BITMASK_SUFFIX, CODES_SUFFIX):
                if name + suffix in unique:
                    raise ValueError(f"cannot store {name!r} compactly: the state dict already has {name + suffix!r}")
            bitmask, codes = pack_sparse_codes(t.cpu(), layout)
            tensors[name + BITMASK_SUFFIX], tensors[name + CODES_SUFFIX] = bitmask, codes
            sparse_codes[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                  "bits": layout.bits, "fill": layout.fill}
        elif should_compact(t):
            for suffix in (BITMASK_SUFFIX, VALUES_SUFFIX):
                if name + suffix in unique:
                    raise ValueError(f"cannot store {name!r} compactly: the state dict already has {name + suffix!r}")
            bitmask, values = pack_sparse(t)
            tensors[name + BITMASK_SUFFIX] = bitmask.cpu()
            tensors[name + VALUES_SUFFIX] = values.cpu()
            sparse[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        elif fp16_exact(t):
            tensors[name] = t.cpu().to(torch.float16).contiguous()
            half.append(name)
        else:
            tensors[name] = t.cpu().contiguous()  # safetensors writes only contiguous memory
    metadata = {}
    if half:
        metadata[FP16_KEY] = json.dumps(half, separators=(",", ":"))
    if sparse:
        metadata[SPARSE_KEY] = json.dumps(sparse, separators=(",", ":"))
    if sparse_codes:
        metadata[SPARSE_CODES_KEY] = json.dumps(sparse_codes, separators=(",", ":"))
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    return tensors, metadata


def _parse_code_metadata(metadata: dict[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype, CodeLayout, str]]:
    """The sparse-code records of a file's metadata: ``{name: (shape, dtype, layout, pattern)}``; ValueError when malformed."""
    try:
        records = json.loads(metadata.get(SPARSE_CODES_KEY, "{}"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the {SPARSE_CODES_KEY} metadata is not valid JSON ({exc})") from None
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        raise ValueError(f"the {SPARSE_CODES_KEY} metadata must map tensor names to {{shape, dtype, bits, fill}}")
    parsed = {}
    for name, info in records.items():
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ValueError(f"sparse codes {name!r}: its shape {shape!r} is not a list of non-negative integers")
        dtype = CODE_DTYPES.get(str(info.get("dtype")))
        if dtype is None:
            raise ValueError(f"sparse codes {name!r}: dtype {info.get('dtype')!r} is not int8 or uint8")
        try:
            layout = CodeLayout(int(info.get("bits")), int(info.get("fill")))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sparse codes {name!r}: {exc}") from None
        pattern = info.get("pattern", "bitmask")
        if pattern not in ("bitmask", "2:4"):
            raise ValueError(f"sparse codes {name!r}: pattern {pattern!r} is not 'bitmask' or '2:4'")
        parsed[name] = (tuple(shape), dtype, layout, pattern)
    return parsed


def _parse_fp16(metadata: dict[str, str]) -> list[str]:
    """The names of float32 tensors stored as float16 (``FP16_KEY``); ValueError when malformed."""
    try:
        names = json.loads(metadata.get(FP16_KEY, "[]"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the {FP16_KEY} metadata is not valid JSON ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"the {FP16_KEY} metadata must be a list of tensor names")
    return names


def _parse_metadata(metadata: dict[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The compact-tensor records and aliases of a file's metadata, type-checked; ValueError when malformed."""
    try:
        sparse = json.loads(metadata.get(SPARSE_KEY, "{}"))
        aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the {SPARSE_KEY}/{ALIASES_KEY} metadata is not valid JSON ({exc})") from None
    if not isinstance(sparse, dict) or not all(isinstance(v, dict) for v in sparse.values()):
        raise ValueError(f"the {SPARSE_KEY} metadata must map tensor names to {{shape, dtype}} records")
    for name, info in sparse.items():
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ValueError(f"compact tensor {name!r}: its shape {shape!r} is not a list of non-negative integers")
        if str(info.get("dtype")) not in _DTYPE_NAMES:
            raise ValueError(f"compact tensor {name!r}: dtype {info.get('dtype')!r} is not a float dtype "
                             f"({', '.join(_DTYPE_NAMES)})")
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(f"the {ALIASES_KEY} metadata must map tensor names to stored names")
    return sparse, aliases


@dataclass(frozen=True)
class StoredTensor:
    """The dtype and shape a tensor of a safetensors file loads as (a compact pair: the dense tensor)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def _pop_two(stored: dict[str, StoredTensor], name: str, first: str, second: str, what: str
             ) -> tuple[StoredTensor, StoredTensor]:
    """Remove the entries ``name + first`` and ``name + second`` of a compact form from ``stored``, checking both
    exist and that ``name`` is not also stored densely."""
    a, b = stored.pop(name + first, None), stored.pop(name + second, None)
    if a is None or b is None:
        missing = name + (first if a is None else second)
        raise ValueError(f"{what} {name!r}: {missing!r} is missing from the file")
    if name in stored:
        raise ValueError(f"tensor {name!r} is stored both densely and compactly")
    return a, b


def _pop_pair(stored: dict[str, StoredTensor], name: str, suffix: str, what: str, n_bits: int) -> StoredTensor:
    """Remove ``name``'s bitmask and ``name + suffix`` entries from ``stored`` (``_pop_two``), check that the
    bitmask holds ``n_bits`` bits; return the ``suffix`` entry."""
    bitmask, other = _pop_two(stored, name, BITMASK_SUFFIX, suffix, what)
    if bitmask.dtype != torch.uint8 or bitmask.shape != (math.ceil(n_bits / 8),):
        raise ValueError(f"{what} {name!r}: a bitmask of {n_bits} bits must be uint8 of shape "
                         f"({math.ceil(n_bits / 8)},), the file has {bitmask.dtype} of shape {bitmask.shape}")
    return other


def _pop_nm(stored: dict[str, StoredTensor], name: str, n_codes: int, layout: CodeLayout) -> StoredTensor:
    """Remove ``name``'s 2:4 index and codes entries from ``stored``, checking both exist with the sizes
    ``n_codes`` codes need; return the codes entry."""
    index, codes = _pop_two(stored, name, NM_INDEX_SUFFIX, CODES_SUFFIX, "sparse codes")
    groups = n_codes // 4
    if n_codes % 4 or index.dtype != torch.uint8 or index.shape != (math.ceil(groups * 3 / 8),):
        raise ValueError(f"sparse codes {name!r}: {n_codes} codes in 2:4 groups need a uint8 index of shape "
                         f"({math.ceil(groups * 3 / 8)},), the file has {index.dtype} of shape {index.shape}")
    if codes.shape != (math.ceil(2 * groups * layout.bits / 8),):
        raise ValueError(f"sparse codes {name!r}: 2:4 groups keep {2 * groups} codes of {layout.bits} bits, "
                         f"the file has {codes.shape}")
    return codes


def resolve_layout(entries: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None
                   ) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """What ``decode_tensors`` returns for a file whose header lists ``entries`` (name -> (dtype name, shape)).

    Returns ``({name: StoredTensor}, {alias: stored_name})`` without any tensor data: compact
    pairs become the dense tensor they expand to, after checking the pair fits (uint8 1-D
    bitmask of ``ceil(n / 8)`` bytes, 1-D values of the recorded dtype and at most ``n``
    entries). Raises ValueError naming the tensor for anything inconsistent or a dtype
    torch cannot hold.
    """
    metadata = dict(metadata or {})
    sparse, aliases = _parse_metadata(metadata)
    stored: dict[str, StoredTensor] = {}
    for name, (dtype_name, shape) in entries.items():
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {dtype_name}, which slimkit does not load")
        stored[name] = StoredTensor(dtype, tuple(int(d) for d in shape))
    for name, info in sparse.items():
        shape = tuple(info["shape"])
        n = math.prod(shape)
        values = _pop_pair(stored, name, VALUES_SUFFIX, "compact tensor", n)
        dtype = _DTYPE_NAMES[info["dtype"]]
        if values.dtype != dtype or len(values.shape) != 1 or values.shape[0] > n:
            raise ValueError(f"compact tensor {name!r}: values must be 1-D {dtype} with at most {n} entries, "
                             f"the file has {values.dtype} of shape {values.shape}")
        stored[name] = StoredTensor(dtype, shape)
    for name, (shape, dtype, layout, pattern) in _parse_code_metadata(metadata).items():
        n_codes = math.prod(shape) * (8 // layout.bits)
        if pattern == "2:4":
            codes = _pop_nm(stored, name, n_codes, layout)
        else:
            codes = _pop_pair(stored, name, CODES_SUFFIX, "sparse codes", n_codes)
        if codes.dtype != torch.uint8 or len(codes.shape) != 1 or codes.shape[0] > math.prod(shape):
            raise ValueError(f"sparse codes {name!r}: codes must be 1-D uint8 of at most {math.prod(shape)} bytes")
        stored[name] = StoredTensor(dtype, shape)
    for name in _parse_fp16(metadata):
        entry = stored.get(name)
        if entry is None or entry.dtype != torch.float16:
            raise ValueError(f"tensor {name!r} is listed as float16-stored float32 but the file has "
                             f"{'no such tensor' if entry is None else entry.dtype}")
        stored[name] = StoredTensor(torch.float32, entry.shape)
    for key, value in metadata.items():  # save_model's plain alias entries (see decode_tensors)
        if key not in _RESERVED_KEYS and value in stored and key not in stored:
            aliases.setdefault(key, value)
    return stored, aliases


def stored_layout(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str], int]:
    """``resolve_layout`` of the safetensors file ``path`` read from its header, plus its tensor data bytes.

    Reads no tensor data. Raises ValueError for metadata that does not describe a
    consistent state dict; safetensors' own errors for a corrupt header.
    """
    from safetensors import safe_open

    entries: dict[str, tuple[str, list[int]]] = {}
    nbytes = 0
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            view = f.get_slice(key)
            entries[key] = (view.get_dtype(), list(view.get_shape()))
            dtype = SAFETENSORS_DTYPES.get(entries[key][0])
            nbytes += math.prod(entries[key][1]) * (dtype.itemsize if dtype is not None else 1)
    stored, aliases = resolve_layout(entries, metadata)
    return stored, aliases, nbytes


def decode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Invert ``encode_state_dict``: the dense state dict (aliases not expanded) and ``{alias: stored_name}``.

    Raises ValueError naming the tensor when a compact pair is missing or inconsistent.
    """
    metadata = dict(metadata or {})
    tensors = dict(tensors)
    sparse, aliases = _parse_metadata(metadata)
    for name, info in sparse.items():
        try:
            bitmask = tensors.pop(name + BITMASK_SUFFIX)
            values = tensors.pop(name + VALUES_SUFFIX)
        except KeyError as exc:
            raise ValueError(f"compact tensor {name!r}: {exc.args[0]!r} is missing from the file") from None
        dtype = _DTYPE_NAMES.get(str(info.get("dtype")))
        if dtype is None or values.dtype != dtype:
            raise ValueError(f"compact tensor {name!r}: values are {values.dtype}, the metadata says {info.get('dtype')!r}")
        try:
            tensors[name] = unpack_sparse(bitmask, values, info["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"compact tensor {name!r}: {exc}") from None
    for name, (shape, dtype, layout, pattern) in _parse_code_metadata(metadata).items():
        first = NM_INDEX_SUFFIX if pattern == "2:4" else BITMASK_SUFFIX
        try:
            head = tensors.pop(name + first)
            codes = tensors.pop(name + CODES_SUFFIX)
        except KeyError as exc:
            raise ValueError(f"sparse codes {name!r}: {exc.args[0]!r} is missing from the file") from None
        unpack = unpack_2of4_codes if pattern == "2:4" else unpack_sparse_codes
        try:
            tensors[name] = unpack(head, codes, shape, dtype, layout)
        except ValueError as exc:
            raise ValueError(f"sparse codes {name!r}: {exc}") from None
    for name in _parse_fp16(metadata):
        t = tensors.get(name)
        if t is None or t.dtype != torch.float16:
            raise ValueError(f"tensor {name!r} is listed as float16-stored float32 but the file has "
                             f"{'no such tensor' if t is None else t.dtype}")
        tensors[name] = t.to(torch.float32)
    # safetensors.torch.save_model records each dropped tied name as metadata[alias] = kept.
    for key, value in metadata.items():
        if key not in _RESERVED_KEYS and value in tensors and key not in tensors:
            aliases.setdefault(key, value)
    return tensors, aliases


# -- files -------------------------------------------------------------------------------
_WRITE_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_header(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a safetensors file: metadata keys sorted (``format: pt`` among
    them), so equal inputs give equal bytes (safetensors' own writer orders metadata at random), padded
    with spaces to 8-byte alignment of the data as safetensors writes it."""
    meta = dict(sorted({"format": "pt", **(metadata or {})}.items()))
    header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in name order) and string ``metadata`` as the safetensors file ``path``, byte-deterministic."""
    entries: dict[str, dict[str, Any]] = {}
    raws = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _WRITE_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries[name] = {"dtype": _WRITE_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        raws.append(raw)
    with open(path, "wb") as out:
        out.write(safetensors_header(entries, metadata))
        for raw in raws:
            out.write(raw)


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None, code_layouts: dict[str, CodeLayout] | None = None) -> None:
    """Write ``state`` to the safetensors file ``path``: tied tensors once, sparse float tensors compact,
    sparse code tensors (named in ``code_layouts``) as bitmask + packed codes."""
    tensors, extra = encode_state_dict(state, code_layouts)
    write_safetensors(tensors, path, metadata={**(metadata or {}), **extra})


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by ``save_state_dict`` (or any safetensors file): dense tensors and ``{alias: stored}``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return decode_tensors(load_file(str(path)), metadata)
