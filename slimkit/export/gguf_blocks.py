"""GGUF tensor encodings: slimkit weights as llama.cpp's block formats.

Byte layouts (ggml's ``block_*`` structs; every row of a (rows, cols) weight is cols / span
blocks, so rows are independent and may be permuted after encoding):

- q8_0 (34 B / 32): fp16 d, 32 int8 codes. x = d·q.
- q4_0 (18 B / 32): fp16 d, 16 bytes; byte j holds element j (low nibble) and j + 16 (high),
  stored as q + 8. x = d·q, q in [-8, 7].
- q4_1 (20 B / 32): fp16 d, fp16 b, 16 bytes as q4_0 holding q in [0, 15]. x = d·q + b.
- q5_0 (22 B / 32): fp16 d, 32-bit little-endian word whose bit i is bit 4 of element i, then
  16 bytes of low nibbles as q4_0; stored q + 16. x = d·q, q in [-16, 15].
- q4_k (144 B / 256): fp16 D, fp16 M, 12 bytes of 6-bit (sc_j, m_j) for the 8 groups of 32
  (bytes 0-3: sc_0..3 plus the top 2 bits of sc_4..7; 4-7: m_0..3 plus the top 2 bits of
  m_4..7; 8-11: the low 4 bits of sc_4..7 and m_4..7), 128 bytes of codes: chunk c of 32
  bytes holds elements 64c + l (low nibble) and 64c + 32 + l (high). x = D·sc_j·q − M·m_j.
- q6_k (210 B / 256): 128 bytes of low 4 bits (half h: byte 64h + l holds elements
  128h + l and 128h + 64 + l), 64 bytes of high 2 bits (byte 32h + l, bits 2k..2k+1: element
  128h + 32k + l), 16 int8 sub-scales, fp16 D; stored q + 32. x = D·sc_j·q.

``encode_module`` copies a quantized layer's codes when its grid is the type's (see
``quantization.grids``): for the block types its group size must be a multiple of 32 and its
codes inside the type's range, and the scales are written as fp16 (exact when the layer was
quantized on that grid, else a note says they were rounded); for the K-quants the per-group
scales and offsets must factor exactly into fp16 super-block scales times 6-bit (q6_k: 8-bit)
integers. Otherwise the dequantized weight is quantized again onto the grid (RTN), with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slimkit.core.errors import ConfigError
from slimkit.quantization.grids import GRIDS, QK_K, BlockGrid, fp16_value

GGUF_TYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0", "q4_1", "q4_k", "q6_k")
BLOCK_BYTES = {"q8_0": 34, "q5_0": 22, "q4_0": 18, "q4_1": 20, "q4_k": 144, "q6_k": 210}


@dataclass
class EncodedTensor:
    """One tensor ready for ``GGUFWriter.add_tensor(name, data, raw_dtype=ggml_type)``."""

    data: np.ndarray
    qtype: str  # the GGUF type name actually used (may differ from the asked one: a fallback)
    shape: tuple[int, int]  # logical (rows, cols)
    note: str | None = None  # why this tensor was re-quantized or written in another type
    copied_codes: bool = False  # True when a quantized layer's codes were copied without re-rounding

    @property
    def ggml_type(self) -> Any:
        import gguf

        return getattr(gguf.GGMLQuantizationType, self.qtype.upper())


def check_type(qtype: str) -> None:
    """ConfigError naming the known types when ``qtype`` is not one."""
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}; known: {', '.join(GGUF_TYPES)}")


def row_type(qtype: str, cols: int) -> tuple[str, str | None]:
    """The type a row of ``cols`` values is written as, and a note when it is not ``qtype``.

    llama.cpp's rule: a K-quant row not a multiple of 256 falls back (q4_k -> q5_0, q6_k -> q8_0);
    a row not a multiple of 32 is written as f16.
    """
    check_type(qtype)
    if qtype in ("f32", "f16"):
        return qtype, None
    grid = GRIDS[qtype]
    if grid.fits(cols):
        return qtype, None
    if grid.fallback is not None and GRIDS[grid.fallback].fits(cols):
        return grid.fallback, f"rows of {cols} are not a multiple of {grid.span}: {grid.fallback}, as llama.cpp does"
    return "f16", f"rows of {cols} are not a multiple of 32: f16, as llama.cpp does"


# --- packing -------------------------------------------------------------------------------


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) float values -> (n, 2) uint8, little-endian float16."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | ((hi.astype(np.uint8) & 0x0F) << 4)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks (n, 34) from codes (n, 32) in [-128, 127] and scales (n,)."""
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks (n, 18) from codes (n, 32) in [-8, 7] and scales (n,)."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _nibbles(u[:, :16], u[:, 16:])], axis=1)


def pack_q4_1(u: np.ndarray, d: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Blocks (n, 20) from codes (n, 32) in [0, 15], scales (n,) and offsets b (n,): x = d·q + b."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(b), _nibbles(u[:, :16], u[:, 16:])], axis=1)


def pack_q5_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks (n, 22) from codes (n, 32) in [-16, 15] and scales (n,)."""
    u = (q.astype(np.int16) + 16).astype(np.uint32)
    high = (((u >> 4) & 1) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    qh = np.ascontiguousarray(high.astype("<u4")).view(np.uint8).reshape(-1, 4)
    return np.concatenate([_f16_bytes(d), qh, _nibbles(u[:, :16], u[:, 16:])], axis=1)


def pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes (n, 12) holding q4_k's eight 6-bit sub-scales and sub-mins (n, 8) each."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def pack_q4_k(u: np.ndarray, D: np.ndarray, sc: np.ndarray, M: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Super-blocks (n, 144) from codes (n, 256) in [0, 15], D, M (n,), sub-scales sc and sub-mins m (n, 8) in [0, 63]."""
    chunks = u.astype(np.uint8).reshape(-1, 4, 2, 32)  # (n, chunk, low/high sub-block, 32)
    qs = _nibbles(chunks[:, :, 0], chunks[:, :, 1]).reshape(-1, 128)
    return np.concatenate([_f16_bytes(D), _f16_bytes(M), pack_k_scales(sc, m), qs], axis=1)


def pack_q6_k(q: np.ndarray, D: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """Super-blocks (n, 210) from codes (n, 256) in [-32, 31], D (n,) and int8 sub-scales sc (n, 16)."""
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(-1, 2, 128)  # (n, half, 128)
    low = u & 0x0F
    ql = _nibbles(low[:, :, :64], low[:, :, 64:]).reshape(-1, 128)
    high = (u >> 4).reshape(-1, 2, 4, 32)  # (n, half, k, l): element 128h + 32k + l
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(D)], axis=1)


# --- from slimkit's (codes, scale, zero) to block parameters ------------------------------


def _factor(values: torch.Tensor, max_int: int, signed: bool, rel: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``values`` (n, k) as D (n,) fp16 values times integers I (n, k) with |I| <= max_int; None if impossible.

    Tries D = fp16(max|v| / j) for j = max_int, ..., 1 per row and keeps the first j for which
    D·j gives back max|v| and every v / D is a whole number (non-negative unless ``signed``), all
    within ``rel`` relative (0: exactly; offsets that went through a float32 division z = o / s
    need a little). An all-zero row gets D = 0, I = 0.
    """
    v = values.double()
    top = v.abs().amax(dim=1)
    D = torch.zeros_like(top)
    ints = torch.zeros_like(v)
    todo = top > 0
    for j in range(max_int, 0, -1):
        if not bool(todo.any()):
            break
        cand = fp16_value((top / j).float()).double()
        ratio = v / torch.where(cand > 0, cand, torch.ones_like(cand)).unsqueeze(1)
        r = ratio.round()
        whole = ((ratio - r).abs() <= rel * ratio.abs().clamp(min=1.0)).all(dim=1) & (r.abs() <= max_int).all(dim=1)
        if not signed:
            whole &= (r >= 0).all(dim=1)
        take = todo & whole & (cand > 0) & ((cand * j - top).abs() <= rel * top)
        D = torch.where(take, cand, D)
        ints = torch.where(take.unsqueeze(1), r, ints)
        todo &= ~take
    if bool(todo.any()):
        return None
    return D.float(), ints


@dataclass
class _Layer:
    """A quantized layer's weight in the target grid's terms: unsigned or signed codes and per-sub-group parameters."""

    codes: torch.Tensor  # (rows, cols) int
    scale: torch.Tensor  # (rows, cols // grid.group_size) float32
    offset_codes: torch.Tensor | None  # zero point per sub-group in code units (None: symmetric)


def _layer_on(module: Any, grid: BlockGrid) -> _Layer | str:
    """``module``'s codes and parameters repeated per ``grid`` group, or the reason they cannot be."""
    if getattr(module, "g_idx", None) is not None:
        return "its act-order columns are not consecutive blocks"
    cols = module._cols
    g = module.group_size or cols
    if g % grid.group_size:
        return f"group size {g} is not a multiple of {grid.name}'s {grid.group_size}"
    if module.bits > 8:
        return f"its codes are {module.bits}-bit"
    rep = g // grid.group_size
    scale = module.scale.float().repeat_interleave(rep, dim=1)
    zero = None if module.zero is None else module.zero.float().repeat_interleave(rep, dim=1)
    return _Layer(module.codes().to(torch.int32), scale, zero)


def _fits_codes(codes: torch.Tensor, lo: int, hi: int) -> bool:
    return codes.numel() == 0 or (int(codes.min()) >= lo and int(codes.max()) <= hi)


def _unsigned_4bit(layer: _Layer, name: str) -> tuple[torch.Tensor, torch.Tensor, int] | str:
    """``(codes 0..15, zero points, shift)`` for the offset types: symmetric codes shifted by 8 (zero 0, offset 8·s),
    unsigned ones as they are; or the reason they do not fit 16 levels."""
    shift = 8 if layer.offset_codes is None else 0
    u = layer.codes + shift
    if not _fits_codes(u, 0, 15):
        return f"its codes do not fit {name}'s 16 levels"
    z = torch.zeros_like(layer.scale) if layer.offset_codes is None else layer.offset_codes
    return u, z, shift


def _encode_copy(layer: _Layer, grid: BlockGrid) -> tuple[np.ndarray, bool] | str:
    """Blocks holding ``layer``'s codes unchanged, and whether its scales had to be rounded to fp16; else a reason."""
    rows = layer.codes.shape[0]
    name = grid.name
    if name in ("q8_0", "q4_0", "q5_0"):
        if layer.offset_codes is not None:
            return f"its zero points need an offset, which {name} does not store"
        if not _fits_codes(layer.codes, grid.qmin if name != "q8_0" else -128, grid.qmax):
            return f"its codes lie outside {name}'s [{grid.qmin}, {grid.qmax}]"
        d16 = fp16_value(layer.scale)
        rounded = not torch.equal(d16, layer.scale)
        q = layer.codes.reshape(-1, grid.span).numpy()
        d = d16.reshape(-1).numpy()
        packer = {"q8_0": pack_q8_0, "q4_0": pack_q4_0, "q5_0": pack_q5_0}[name]
        return packer(q, d).reshape(rows, -1), rounded
    if name == "q4_1":
        # x = (q - z)·s = s·q' + b with q' = q + shift (symmetric codes shifted to unsigned), b = -(z + shift)·s
        unsigned = _unsigned_4bit(layer, name)
        if isinstance(unsigned, str):
            return unsigned
        u, z, shift = unsigned
        d16 = fp16_value(layer.scale)
        b = -(z + shift) * layer.scale
        b16 = fp16_value(b)
        rounded = not (torch.equal(d16, layer.scale) and torch.allclose(b16, b, rtol=2e-6, atol=0.0))
        return pack_q4_1(u.reshape(-1, 32).numpy(), d16.reshape(-1).numpy(), b16.reshape(-1).numpy()).reshape(rows, -1), rounded
    if name == "q4_k":
        unsigned = _unsigned_4bit(layer, name)
        if isinstance(unsigned, str):
            return unsigned
        u, z, shift = unsigned
        s = layer.scale.reshape(-1, 8)  # (super-blocks, 8)
        o = ((z + shift) * layer.scale).reshape(-1, 8)  # offsets M·m_j (>= 0 on the grid)
        if bool((s <= 0).any()) or bool((o < 0).any()):
            return "its scales or offsets are not q4_k's (positive scales, non-negative offsets)"
        fs = _factor(s, 63, signed=False)
        fo = _factor(o, 63, signed=False, rel=2e-6)
        if fs is None or fo is None or bool((fs[1] < 1).any()):
            return "its scales are not q4_k's fp16 super-block scale times 6-bit sub-scales"
        (D, sc), (M, m) = fs, fo
        return pack_q4_k(u.reshape(-1, QK_K).numpy(), D.numpy(), sc.numpy(), M.numpy(), m.numpy()).reshape(rows, -1), False
    if name == "q6_k":
        if layer.offset_codes is not None:
            return "its zero points need an offset, which q6_k does not store"
        if not _fits_codes(layer.codes, -32, 31):
            return "its codes lie outside q6_k's [-32, 31]"
        f = _factor(layer.scale.reshape(-1, 16), 127, signed=True)
        if f is None:
            return "its scales are not q6_k's fp16 super-block scale times 8-bit sub-scales"
        D, sc = f
        return pack_q6_k(layer.codes.reshape(-1, QK_K).numpy(), D.numpy(), sc.numpy()).reshape(rows, -1), False
    raise ValueError(f"no block layout for {name}")


def write_gguf_file(path: Any, arch: str, fill: Any) -> None:
    """Write a GGUF file atomically: a ``gguf.GGUFWriter`` on ``path + ".part"`` is given to ``fill(writer)`` to
    add keys and tensors, then written out and renamed onto ``path``; on any failure the part file is removed
    and an existing ``path`` is left as it was."""
    import os
    from pathlib import Path

    import gguf

    part = Path(f"{path}.part")
    try:
        writer = gguf.GGUFWriter(part, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _encode_quantized(qw: Any, grid: BlockGrid) -> np.ndarray:
    """Blocks of a ``QuantizedWeight`` made on ``grid`` (always exact)."""
    layer = _Layer(qw.q.to(torch.int32), qw.scale.float(), None if qw.zero is None else qw.zero.float())
    out = _encode_copy(layer, grid)
    if isinstance(out, str):  # a grid's own output always factors; anything else is a bug here
        raise AssertionError(f"{grid.name} could not encode its own quantization: {out}")
    return out[0]


def encode_dense(weight: torch.Tensor, qtype: str) -> EncodedTensor:
    """A float weight encoded as ``qtype`` (1-D tensors always f32; block types by RTN onto the grid)."""
    check_type(qtype)
    w = weight.detach().float().cpu()
    if w.dim() == 1 or qtype == "f32":
        shape = tuple(w.shape) if w.dim() == 2 else (1, w.numel())
        return EncodedTensor(w.numpy(), "f32", shape)
    if w.dim() != 2:
        raise ValueError(f"GGUF weights are 1-D or 2-D, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    actual, note = row_type(qtype, cols)
    if actual == "f16":
        return EncodedTensor(w.to(torch.float16).numpy(), "f16", (rows, cols), note)
    grid = GRIDS[actual]
    return EncodedTensor(_encode_quantized(grid.quantize(w), grid).reshape(rows, -1), actual, (rows, cols), note)


def fitting_types(module: Any) -> list[str]:
    """The GGUF block types ``module``'s codes can be copied into as they are."""
    out = []
    for name, grid in GRIDS.items():
        if not grid.fits(module._cols):
            continue
        layer = _layer_on(module, grid)
        if not isinstance(layer, str) and not isinstance(_encode_copy(layer, grid), str):
            out.append(name)
    return out


def encode_module(module: Any, qtype: str, *, requantize: bool = False) -> EncodedTensor:
    """A quantized slimkit layer (QuantLinear/QuantEmbedding) encoded as ``qtype``.

    Its codes are copied when they lie on the type's grid. A group size the type's blocks
    cannot hold (smaller than the block, or not a multiple of it) is a ConfigError naming
    the types that fit, unless ``requantize``; any other mismatch (bits, symmetry, act-order
    columns, scales off the K-quant grid) re-quantizes the dequantized weight with a note.
    """
    check_type(qtype)
    rows, cols = module._rows, module._cols
    actual, fallback_note = row_type(qtype, cols)
    dense = None
    if actual in ("f32", "f16"):
        dense = module.dense_weight(torch.float32)
        return encode_dense(dense, actual) if fallback_note is None else \
            EncodedTensor(dense.to(torch.float16).numpy(), "f16", (rows, cols), fallback_note)
    grid = GRIDS[actual]
    layer = _layer_on(module, grid)
    reason = layer if isinstance(layer, str) else None
    if reason is not None and reason.startswith("group size") and not requantize:
        fit = fitting_types(module)
        raise ConfigError(f"{reason}: its codes cannot be copied into {actual} blocks. Types that hold them as they "
                          f"are: {', '.join(fit) if fit else 'none'}; or re-quantize (--requantize)")
    if reason is None:
        out = _encode_copy(layer, grid)
        if not isinstance(out, str):
            data, rounded = out
            notes = [n for n in (fallback_note, "scales rounded to fp16" if rounded else None) if n]
            return EncodedTensor(data, actual, (rows, cols), "; ".join(notes) or None, copied_codes=True)
        reason = out
    dense = module.dense_weight(torch.float32)
    data = _encode_quantized(grid.quantize(dense), grid).reshape(rows, -1)
    note = f"re-quantized onto {actual} ({reason})"
    return EncodedTensor(data, actual, (rows, cols), "; ".join(n for n in (fallback_note, note) if n))
