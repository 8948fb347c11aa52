"""Pure quantization maths: integer ranges, scales, quantize/dequantize, bit packing.

Affine quantization (one scale ``s`` and zero point ``z`` per channel or group):

    q = clamp(round(x / s) + z, qmin, qmax)        x̂ = (q − z) · s

- Rounding is ``torch.round``: round half to even (2.5 -> 2, 3.5 -> 4), like Python's
  ``round`` and numpy; the result is then clamped into ``[qmin, qmax]``.
- Symmetric: signed codes in the *restricted* range [−(2^(b−1)−1), 2^(b−1)−1] (int8:
  [−127, 127]) so that −q is always representable and the grid is symmetric about 0;
  z = 0 and s = max|x| / qmax.
- Asymmetric: unsigned codes in [0, 2^b − 1]; the range is widened to include 0 so that 0
  is exactly representable (padding, ReLU zeros), s = (max − min) / (qmax − qmin),
  z = round(qmin − min / s).
- Binary (1 bit, symmetric): codes are ±1, q = sign(x) with 0 -> +1, and the scale is
  mean|x| per channel/group, the scale that minimizes ‖x − s·sign(x)‖² (XNOR-Net,
  Rastegari et al. 2016); min/max ranges do not apply.
- 16 bit: int16 codes (symmetric, for dynamic weight quantization) or int32-held unsigned codes.
- Integer dtypes: symmetric codes are int8 (int16 at 16 bit), asymmetric codes (up to 255)
  uint8 (int32 at 16 bit); a QuantizedWeight stores zero points as uint8/int32 and scales as float32.

Everything here is a function of tensors: no modules, no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimkit.core.errors import ConfigError, DataError

# Bit widths the quantizers accept.
BITS = (1, 2, 3, 4, 8, 16)
# Bit widths a quantized layer can store: also 5 and 6, the GGUF q5_0 / q6_k grids (``quantization.grids``).
STORED_BITS = (1, 2, 3, 4, 5, 6, 8, 16)
# Bit widths ``pack`` handles: a general little-endian bit stream (3 bit: eight codes in three bytes).
PACK_BITS = (1, 2, 3, 4, 5, 6, 8)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer code range ``(qmin, qmax)`` for ``bits``-bit quantization.

    Symmetric: signed, restricted ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (8 bit: -127..127,
    4 bit: -7..7, 2 bit: -1..1) so negation never overflows; 1 bit is binary, codes
    -1 and +1 (never 0). Asymmetric: unsigned ``[0, 2^b - 1]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits == 16):
        raise ValueError(f"bits must be an integer in 1..8 or 16, got {bits!r}")
    if symmetric:
        if bits == 1:
            return -1, 1
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_dtype(symmetric: bool, bits: int = 8) -> torch.dtype:
    """The dtype that holds unpacked codes: int8 (int16 above 8 bits) when signed, uint8 (int32) when unsigned."""
    if bits > 8:
        return torch.int16 if symmetric else torch.int32
    return torch.int8 if symmetric else torch.uint8


def is_binary(bits: int, symmetric: bool) -> bool:
    """True for 1-bit symmetric quantization: sign codes times a mean-|x| scale."""
    return bits == 1 and symmetric


def scale_zero_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) mapping ``[xmin, xmax]`` onto the code range.

    ``xmin``/``xmax`` may have any broadcastable shape (one entry per channel or group).
    An all-zero channel would give s = 0; it gets s = 1 instead, so its codes are 0 and it
    dequantizes to exact zeros. Symmetric zero points are all 0. For binary (1-bit
    symmetric) this gives s = max|x|; ``binary_scale`` gives the better mean|x| from the data.
    """
    qmin, qmax = qrange(bits, symmetric)
    # float64 so that (xmax - xmin) of huge float32 weights cannot overflow to inf.
    lo = torch.clamp(xmin.double(), max=0.0)
    hi = torch.clamp(xmax.double(), min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).float()
    else:
        scale = ((hi - lo) / (qmax - qmin)).float()
    # A scale that is 0 (or underflowed to 0 in float32) would divide by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if symmetric:
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    else:
        zero = torch.round(qmin - lo / scale.double()).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool
) -> torch.Tensor:
    """Codes ``clamp(round(x / scale) + zero, qmin, qmax)`` as ``code_dtype(symmetric, bits)``.

    ``scale`` and ``zero`` broadcast against ``x``; ``zero=None`` means 0. The division is
    done in float32 (the dtype of the stored scale, so quantize and dequantize agree).
    Binary (1-bit symmetric): ``sign(x)`` with 0 -> +1; the scale plays no part.
    """
    qmin, qmax = qrange(bits, symmetric)
    if is_binary(bits, symmetric):
        return torch.where(x >= 0, 1, -1).to(torch.int8)
    q = torch.round(x.float() / scale.float())
    if zero is not None:
        q = q + zero.float()
    return q.clamp(qmin, qmax).to(code_dtype(symmetric, bits))


def binary_scale(x: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """mean|x| over ``dim`` (kept as size-1 dims; all of x when None): the L2-optimal scale of sign(x).

    An all-zero slice gets 1, like ``scale_zero_from_range`` (its codes dequantize to ±1·1,
    which is wrong but finite; a zero slice is better left unquantized).
    """
    a = x.detach().abs().float()
    s = a.mean() if dim is None else a.mean(dim=dim, keepdim=True)
    return torch.where(s > 0, s, torch.ones_like(s))


def _reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    """Every dim of ``x`` except ``axis`` (all of them when ``axis`` is None)."""
    if axis is None:
        return tuple(range(x.dim()))
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def tensor_qparams(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (binary: mean|x|) scale and zero point of ``x``, per tensor or per slice along ``axis``.

    ``axis`` may be any dim (negative allowed); the results keep ``x``'s rank with size 1
    everywhere but ``axis``, so they broadcast straight into ``quantize``/``dequantize``.
    """
    if not torch.isfinite(x).all():
        raise DataError("tensor contains NaN or inf; quantization needs finite values")
    dims = _reduce_dims(x, axis)
    if is_binary(bits, symmetric):
        s = binary_scale(x, dims)
        return s, torch.zeros(s.shape, dtype=torch.int32)
    xf = x.detach().float()
    return scale_zero_from_range(xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True), bits, symmetric)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: the value a quantized tensor stands for (no gradient rule)."""
    return dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero).to(x.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 values ``(q - zero) * scale`` (``zero=None`` means 0); arguments broadcast."""
    x = q.float()
    if zero is not None:
        x = x - zero.float()
    return x * scale.float()


def split_groups(cols: int, group_size: int | None) -> tuple[int, int]:
    """``(n_groups, group_size)`` for a row of ``cols`` values; ``group_size`` None means one group per row.

    Raises ConfigError (a ValueError) naming both sizes when ``cols`` is not divisible.
    """
    if group_size is None:
        return 1, cols
    if not isinstance(group_size, int) or group_size <= 0:
        raise ConfigError(f"group_size must be a positive integer or None, got {group_size!r}")
    if cols % group_size:
        raise ConfigError(
            f"a row of {cols} values does not split into groups of {group_size} ({cols} % {group_size} = {cols % group_size})"
        )
    return cols // group_size, group_size


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 weight (rows, cols) from codes (rows, cols) and per-group scale/zero (rows, n_groups).

    Leading dimensions other than the last are allowed (e.g. gathered embedding rows).
    ``g_idx`` (cols,) integer, optional: column c uses group ``g_idx[c]`` instead of
    ``c // group_size`` (GPTQ act-order, whose groups are runs of *permuted* columns).
    """
    cols = q.shape[-1]
    n_groups, gs = split_groups(cols, group_size)
    if g_idx is not None:
        if g_idx.shape != (cols,):
            raise ValueError(f"g_idx must have one entry per column ({cols}), got shape {tuple(g_idx.shape)}")
        if cols and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scale.shape[-1]):
            raise ValueError(f"g_idx entries must lie in [0, {scale.shape[-1]}) (one per scale column)")
        idx = g_idx.long()
        z = None if zero is None else zero.index_select(-1, idx)
        return dequantize(q, scale.index_select(-1, idx), z)  # per-column scale/zero gathered by group
    grouped = q.reshape(*q.shape[:-1], n_groups, gs)  # (..., n_groups, group_size)
    z = None if zero is None else zero.unsqueeze(-1)
    return dequantize(grouped, scale.unsqueeze(-1), z).reshape(q.shape)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized 2-D weight: codes, per-group scales and zero points, and how they were made.

    ``q``: (rows, cols) ``code_dtype(symmetric, bits)`` codes in ``qrange``.
    ``scale``: float32 (rows, n_groups). ``zero``: uint8 (int32 at 16 bit) (rows, n_groups), None when symmetric;
    float32 on the grids whose offset is not a whole code (GGUF q4_1/q4_k, ``quantization.grids``).
    ``group_size`` None means one group per row (per output channel).
    ``g_idx``: None for consecutive groups (column c in group c // group_size), else int32
    (cols,) with the group of each column (GPTQ act-order); each group still has ``group_size`` columns.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None
    symmetric: bool
    g_idx: torch.Tensor | None = None  # int32 (cols,): group of each column when groups are not consecutive runs

    def dequantize(self) -> torch.Tensor:
        """The float32 (rows, cols) weight these codes stand for."""
        return dequantize_weight(self.q, self.scale, self.zero, self.group_size, self.g_idx)


def grouped_weight(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` (rows, cols) as float32 (rows, n_groups, group_size), after checking it is 2-D and finite."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise DataError("weight contains NaN or inf; quantization needs finite values")
    rows, cols = w.shape
    n_groups, gs = split_groups(cols, group_size)
    return w.detach().float().reshape(rows, n_groups, gs)


def quantize_weight(
    w: torch.Tensor, bits: int, *, group_size: int | None = None, symmetric: bool = True
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight, min/max range per row or per row-group.

    Binary (``bits=1``, symmetric): sign codes with scale mean|w| per row or group.

    ``w`` is (out, in) for a Linear or (rows, dim) for an Embedding. ``group_size`` None
    gives one scale per row; otherwise each row is cut into groups of ``group_size``
    consecutive columns (``in`` must be divisible) with a scale each.
    """
    grouped = grouped_weight(w, group_size)  # (rows, n_groups, group_size)
    rows, cols = w.shape
    if is_binary(bits, symmetric):
        scale = binary_scale(grouped, -1).squeeze(-1)
    else:
        scale, zero = scale_zero_from_range(grouped.amin(dim=-1), grouped.amax(dim=-1), bits, symmetric)
    zp = None if symmetric else zero
    q = quantize(grouped, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), bits, symmetric)
    return QuantizedWeight(
        q=q.reshape(rows, cols),
        scale=scale.contiguous(),
        zero=None if zp is None else zp.to(torch.uint8 if bits <= 8 else torch.int32),  # in [0, 2^b - 1]
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


# --- bit packing -------------------------------------------------------------------------
#
# Codes are stored unsigned: code = q - offset, offset = -2^(b-1) for signed codes (the
# full two's-complement minimum, so any b-bit signed value fits; the restricted range maps
# to 1..2^b-1) and 0 for unsigned ones. With offset 2^(b-1), a symmetric weight's bytes are
# exactly ONNX Runtime MatMulNBits' layout with its default zero point (8 at 4 bit), so
# export needs no zero-point tensor.
#
# Order: a row is a little-endian bit stream; element i occupies bits [i*b, (i+1)*b).
# So the FIRST element goes in the LOW bits of the first byte (4 bit: byte = e0 | e1 << 4;
# 2 bit: byte = e0 | e1 << 2 | e2 << 4 | e3 << 6), the order MatMulNBits and GPTQ use.


def _offset(bits: int, symmetric: bool) -> int:
    return 2 ** (bits - 1) if symmetric else 0


def _to_stored(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes as the unsigned integers ``pack`` stores (binary ±1 -> bit 0/1)."""
    if is_binary(bits, symmetric):
        return (q.to(torch.int32) + 1) // 2
    return q.to(torch.int32) + _offset(bits, symmetric)


def _from_stored(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if is_binary(bits, symmetric):
        return (codes * 2 - 1).to(torch.int8)
    return (codes - _offset(bits, symmetric)).to(code_dtype(symmetric, bits))


def _word(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` per packing word: the smallest whole number of both (lcm of b and 8)."""
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def _check_pack_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"packing supports bits in {PACK_BITS}, got {bits!r}")


def packed_size(numel_last_dim: int, bits: int) -> int:
    """Bytes that ``pack`` uses for a last dimension of ``numel_last_dim`` codes (after padding)."""
    _check_pack_bits(bits)
    per_word, bytes_per_word = _word(bits)
    return -(-numel_last_dim // per_word) * bytes_per_word


def pack(q: torch.Tensor, bits: int, *, symmetric: bool = True) -> torch.Tensor:
    """Pack integer codes along the last dim into uint8, the first code in the low bits.

    ``symmetric`` says whether ``q`` holds signed codes (stored as ``q + 2^(b-1)``; binary
    ±1 as bit 0/1) or unsigned ones (stored as is). 8 bit keeps one code per byte; 4 bit
    packs two per byte, 2 bit four, 1 bit eight. A last dim not divisible by the codes per byte is zero-padded; ``unpack``
    needs the original length to drop the padding.
    """
    _check_pack_bits(bits)
    if is_binary(bits, symmetric) and q.numel() and bool((q.abs() != 1).any()):
        raise ValueError("binary codes must be -1 or +1")
    codes = _to_stored(q, bits, symmetric)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        kind = "signed" if symmetric else "unsigned"
        raise ValueError(f"values outside the {bits}-bit {kind} range cannot be packed")
    n = q.shape[-1]
    per_word, bytes_per_word = _word(bits)
    pad = -n % per_word
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    n_words = (n + pad) // per_word
    codes = codes.reshape(*codes.shape[:-1], n_words, per_word)  # (..., n_words, codes_per_word)
    # int64 words so that a 56-bit word (7 bit) would fit too.
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    word = (codes.to(torch.int64) << shifts).sum(dim=-1, keepdim=True)  # (..., n_words, 1)
    byte_shifts = torch.arange(bytes_per_word, device=q.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF  # (..., n_words, bytes_per_word)
    return out.reshape(*q.shape[:-1], n_words * bytes_per_word).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel_last_dim: int, *, symmetric: bool = True) -> torch.Tensor:
    """Inverse of ``pack``: codes along the last dim, int8 when ``symmetric`` else uint8.

    ``numel_last_dim`` is the length before padding.
    """
    _check_pack_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    per_word, bytes_per_word = _word(bits)
    if packed.shape[-1] != packed_size(numel_last_dim, bits):
        raise ValueError(
            f"{packed.shape[-1]} bytes do not hold {numel_last_dim} {bits}-bit codes "
            f"(expected {packed_size(numel_last_dim, bits)})"
        )
    n_words = packed.shape[-1] // bytes_per_word
    b = packed.reshape(*packed.shape[:-1], n_words, bytes_per_word).to(torch.int64)  # (..., n_words, bytes)
    byte_shifts = torch.arange(bytes_per_word, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)  # (..., n_words, 1)
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & (2**bits - 1)  # (..., n_words, codes_per_word)
    codes = codes.reshape(*packed.shape[:-1], n_words * per_word)[..., :numel_last_dim]
    return _from_stored(codes, bits, symmetric)


def bits_per_weight(
    bits: int, group_size: int | None, in_features: int, scale_bits: int = 32, zero_bits: int = 0
) -> float:
    """Storage bits per weight: ``bits + (scale_bits + zero_bits) / group``.

    ``group`` is ``group_size``, or ``in_features`` when per channel (None). Packing padding
    is ignored (none when the row length is a multiple of the codes per byte).
    """
    group = in_features if group_size is None else group_size
    return bits + (scale_bits + zero_bits) / group
