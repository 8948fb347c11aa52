"""ONNX Runtime ``com.microsoft::MatMulNBits`` from slimkit's own low-bit weight codes.

``export_onnx`` writes every weight-only QuantLinear with 2/4-bit codes (per channel or
group-wise) or group-wise 8-bit codes as one MatMulNBits node, straight from its stored
codes, scales and zero points: nothing is re-quantized. This module holds the pure layout
maths (``nbits_layout``: QuantLinear -> the node's inputs; ``dequantize_nbits``: the
inverse, the reference every test compares with), the torch custom op the export twin
calls (``slimkit::matmul_nbits``, translated to the contrib op), the error bound of ORT's
int8-activation kernels, and ``set_accuracy_level`` for files already written.

The contrib op (ORT 1.32 schema, checked against ``get_all_operator_schema``):
- ``Y = A · dequant(B)ᵀ (+ bias)``, ``dequant = (code − zero_point) · scale`` per block of
  ``block_size`` input columns; attributes ``K`` (in), ``N`` (out), ``bits`` (2, 4 or 8),
  ``block_size`` (a power of two ≥ 16), ``accuracy_level``.
- ``B``: uint8 (N, k_blocks, block_size·bits/8), codes packed along K, the FIRST code in the
  LOW bits: slimkit's own packing order (``primitives.pack``), so a row of ``qweight``
  reshaped to (k_blocks, blob) is B's row as is.
- ``scales``: (N, k_blocks) float32.
- ``zero_points``: optional; absent means 2^(bits−1) (8 at 4 bit), which is exactly the offset
  slimkit stores symmetric codes with, so symmetric layers need none. Asymmetric layers
  get slimkit's uint8 zeros packed like B: (N, ceil(k_blocks·bits/8)).
- ``g_idx``: optional int32 (K,), input column -> block (deprecated in ORT; see below).

Choices (each layer's choice is in ``OnnxExport.notes``):
- Block size: the group size when it is a power of two ≥ 16; otherwise the largest power of
  two ≥ 16 dividing it (per-channel weights: dividing ``in_features``, at most
  ``MAX_REPLICATED_BLOCK``), with each scale and zero point repeated over the blocks of its
  group: the same dequantized weight, exactly. A group with no such divisor (e.g. 24, or an
  odd ``in_features``) keeps the older export (DequantizeLinear, or float) with the reason.
- Act-order weights (a ``g_idx`` buffer, column -> group): when every group has the same
  number of columns (GPTQ's act-order always does), the columns are sorted by group and the
  graph gathers the input columns in that order (``Gather(x, perm, axis=-1)``) before a
  normal MatMulNBits: the same product, and ORT's fast int8 kernel still applies. Otherwise
  the ``g_idx`` input is used; ORT then dequantizes B to float for every call (slower) and,
  as measured with ORT 1.32, misreads *packed* zero points together with ``g_idx`` (45%
  error), so that path writes unpacked float zero points, which it reads correctly.
- ``accuracy_level`` (``DEFAULT_ACCURACY_LEVEL`` = 4): ORT's CPU kernel then quantizes the
  input A to int8 per block of ``block_size`` (symmetric, scale max|a|/127) and runs an
  integer dot product: ~3.8× fp32 decode speed on a 120M Llama here, at a small error that
  ``int8_input_error_bound`` bounds exactly; level 0 or 1 computes in float32 (error at
  float precision). ``set_accuracy_level(path, level)`` changes it in a written file.
- Per-channel 8-bit weight-only layers (``int8_per_channel=True``, the decoder-with-past
  export only; ``export_onnx`` of other models keeps DequantizeLinear -> MatMul): block 128,
  the one scale repeated over the blocks. ORT 1.32 turns DequantizeLinear -> MatMul into the
  same MatMulNBits bits=8 node at session creation, at the level the session asks for
  (``ort_session(exact=True)``: 1), so the node itself is no faster; writing it makes the
  file's ``accuracy_level`` decide instead of a session option. ORT 1.32's 8-bit kernel has no
  fast float path. Measured (one layer, M=1, 2 threads, AMD EPYC with AVX-512 VNNI, median
  µs on a loaded 2-core machine): 1024×1024: fp32 MatMul 67, DequantizeLinear -> MatMul 1303
  (exact session) / 28 (``exact=False``), MatMulNBits bits=8 level 0 1183, level 4 30;
  2048×2048: fp32 406, DequantizeLinear -> MatMul 11377 / 112, MatMulNBits level 0 20015
  (block 32: 11211), level 4 110. Level 4 errs by ~0.5% of max|y| on random data (inside
  ``int8_input_error_bound``); levels 0/1 are exact but 20-50× slower than fp32.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from slimkit.core.errors import ConfigError, SlimkitError
from slimkit.quantization.primitives import pack, unpack

NBITS = (2, 4, 8)  # the bit widths MatMulNBits takes (ORT 1.32 schema: "supported values: 2, 4, 8")
MIN_BLOCK = 16  # the schema: block_size is a power of two >= 16
MAX_REPLICATED_BLOCK = 128  # per-channel scales are repeated over blocks of at most this (ORT's int8 path quantizes A per block)
DEFAULT_ACCURACY_LEVEL = 4  # int8 compute on CPU: the fast decode path
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8
DOMAIN = "com.microsoft"
OP_NAME = "MatMulNBits"


@dataclass(frozen=True, eq=False)
class NBitsLayout:
    """The inputs and attributes of one MatMulNBits node (see the module docstring).

    ``packed`` uint8 (N, k_blocks, blob); ``scales`` float32 (N, k_blocks); ``zero_points``
    None (default 2^(bits−1)), packed uint8 (N, ceil(k_blocks·bits/8)) or, with ``g_idx``,
    float32 (N, k_blocks); ``g_idx`` int32 (K,) or None; ``perm`` int64 (K,): the input
    columns to gather first (act-order sorted by group), or None.
    """

    K: int
    N: int
    bits: int
    block_size: int
    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    g_idx: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    def describe(self) -> str:
        """One line for the export notes."""
        zero = "default zero point" if self.zero_points is None else \
            ("float zero points" if self.zero_points.is_floating_point() else "packed uint8 zero points")
        extra = ", act-order columns gathered by group" if self.perm is not None else \
            (", g_idx input (float dequantization in ORT)" if self.g_idx is not None else "")
        return f"MatMulNBits bits={self.bits} block_size={self.block_size}, {zero}{extra}"


def power_of_two_block(columns: int, cap: int | None = None) -> int | None:
    """The largest power of two ≥ ``MIN_BLOCK`` dividing ``columns`` (and ≤ ``cap``), or None."""
    block = columns & -columns  # lowest set bit: the largest power of two dividing columns
    if cap is not None:
        block = min(block, cap)
    return block if block >= MIN_BLOCK else None


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 zero points (N, k_blocks) packed along the blocks like B: (N, ceil(k_blocks·bits/8)).

    8 bit: one per byte. ``primitives.pack`` pads the last byte with zeros, which ORT ignores.
    """
    return pack(zero.to(torch.uint8), bits, symmetric=False)


def nbits_unsupported(src, *, int8_per_channel: bool = False) -> str | None:
    """Why QuantLinear ``src`` is not exported as MatMulNBits (None when it is).

    Only weight-only layers (``act_mode`` None) of 2/4-bit codes, or group-wise 8-bit ones;
    per-channel 8-bit ones only with ``int8_per_channel`` (the KV-cache decoder export: see
    the module docstring; otherwise they keep the DequantizeLinear graph ORT fuses itself).
    The groups must split into power-of-two blocks of at least 16 columns.
    """
    if src.act_mode is not None:
        return "its input is quantized too (not weight-only)"
    if src.bits not in NBITS or (src.bits == 8 and src.group_size is None and not int8_per_channel):
        return f"{src.bits}-bit {'group-wise' if src.group_size else 'per-channel'} codes"
    if getattr(src, "g_idx", None) is not None:
        return _act_order_problem(src)
    group = src.group_size or src.in_features
    if power_of_two_block(group) is None:
        what = f"group_size {group}" if src.group_size else f"in_features {group} (per-channel)"
        return f"{what} has no power-of-two divisor >= {MIN_BLOCK}, which MatMulNBits blocks need"
    return None


def _act_order_problem(src) -> str | None:
    n_groups = src.scale.shape[1]
    group = src.in_features // n_groups
    counts = torch.bincount(src.g_idx.to(torch.int64), minlength=n_groups)
    if bool((counts == group).all()):
        return None if power_of_two_block(group) is not None else \
            f"act-order group size {group} has no power-of-two divisor >= {MIN_BLOCK}"
    if group & (group - 1) or group < MIN_BLOCK:
        return f"act-order groups of unequal size need block_size = group size, a power of two >= {MIN_BLOCK}, got {group}"
    return None


def nbits_layout(src, act_order: str = "reorder", *, int8_per_channel: bool = False) -> NBitsLayout:
    """MatMulNBits inputs holding exactly ``src``'s codes, scales and zero points.

    ``src``: a QuantLinear for which ``nbits_unsupported(src, int8_per_channel=...)`` is None.
    ``act_order`` (only read when ``src`` has a ``g_idx``): "reorder" gathers input columns
    sorted by group (needs groups of equal size; falls back to "g_idx" otherwise), "g_idx"
    writes the g_idx input.
    """
    reason = nbits_unsupported(src, int8_per_channel=int8_per_channel)
    if reason:
        raise SlimkitError(f"this QuantLinear cannot be written as MatMulNBits: {reason}")
    if act_order not in ("reorder", "g_idx"):
        raise ConfigError(f"act_order must be 'reorder' or 'g_idx', got {act_order!r}")
    K, N, bits = src.in_features, src.out_features, src.bits
    with torch.no_grad():
        codes = src.codes().to(torch.int32)  # (N, K) signed (symmetric) or unsigned codes
        offset = 2 ** (bits - 1) if src.symmetric else 0
        stored = codes + offset  # unsigned: the default zero point 2^(b-1) undoes the symmetric offset
        scale = src.scale.float()  # (N, n_groups)
        # float zero points (the GGUF q4_1/q4_k grids) go in unpacked as float, which MatMulNBits also reads
        float_zero = src.zero is not None and src.zero.is_floating_point()
        zero = None if src.zero is None else src.zero.float() if float_zero else src.zero.to(torch.int32)
        n_groups = scale.shape[1]
        g_idx = getattr(src, "g_idx", None)
        perm = None
        if g_idx is not None:
            counts = torch.bincount(g_idx.to(torch.int64), minlength=n_groups)
            equal = bool((counts == K // n_groups).all())
            if act_order == "reorder" and equal:
                perm = torch.argsort(g_idx.to(torch.int64), stable=True)  # columns of group 0 first, then 1, ...
                stored = stored[:, perm]
                g_idx = None
        group = K // n_groups
        if g_idx is not None:
            # ORT indexes scales by g_idx: one block per group, so block_size is the group size.
            block = group
            zp = None if zero is None else zero.float()  # float: ORT misreads packed zeros with g_idx
            gi = g_idx.to(torch.int32).clone()
            blocks_scale = scale
        else:
            block = power_of_two_block(group, None if src.group_size else MAX_REPLICATED_BLOCK)
            repeat = group // block
            blocks_scale = scale.repeat_interleave(repeat, dim=1)  # (N, k_blocks): each group's scale per block
            zp = None if zero is None else zero.repeat_interleave(repeat, dim=1) if float_zero else \
                pack_zero_points(zero.repeat_interleave(repeat, dim=1), bits)
            gi = None
        k_blocks = K // block
        packed = pack(stored.to(torch.int16), bits, symmetric=False) if bits < 8 else stored.to(torch.uint8)
        packed = packed.reshape(N, k_blocks, block * bits // 8).contiguous()
    return NBitsLayout(K, N, bits, block, packed, blocks_scale.contiguous(), zp, gi, perm)


def dequantize_nbits(layout: NBitsLayout) -> torch.Tensor:
    """The float32 (N, K) weight a MatMulNBits node computes with, in the node's column order.

    The reference for the layout (and the eager body of ``slimkit::matmul_nbits``): unpack B
    low bits first, subtract the zero point (2^(bits−1) when absent), times the scale of the
    column's block (``g_idx``'s entry when given). With ``perm`` the columns are in gathered
    order: column j of the result multiplies input column ``perm[j]``.
    """
    return _dequantize(layout.packed, layout.scales, layout.zero_points, layout.g_idx, layout.K, layout.bits,
                       layout.block_size)


def _dequantize(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                g_idx: torch.Tensor | None, K: int, bits: int, block_size: int) -> torch.Tensor:
    N, k_blocks = packed.shape[0], packed.shape[1]
    flat = packed.reshape(N, -1)
    codes = (unpack(flat, bits, K, symmetric=False) if bits < 8 else flat).to(torch.float32)  # (N, K)
    if zero_points is None:
        zero = torch.full((N, k_blocks), float(2 ** (bits - 1)))
    elif zero_points.is_floating_point():
        zero = zero_points.float()
    else:
        zero = unpack(zero_points, bits, k_blocks, symmetric=False).float() if bits < 8 else zero_points.float()
    block = torch.arange(K) // block_size if g_idx is None else g_idx.to(torch.int64)
    return (codes - zero[:, block]) * scales.reshape(N, k_blocks).float()[:, block]


# -- the custom op the export twin calls --------------------------------------------------
@torch.library.custom_op("slimkit::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 g_idx: torch.Tensor | None, bias: torch.Tensor | None, K: int, N: int, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    """``x · dequant(B)ᵀ + bias`` with MatMulNBits' inputs; exported as that contrib op.

    Eager: the float32 product (accuracy_level plays no part; it only tells ORT how to run).
    """
    w = _dequantize(packed, scales, zero_points, g_idx, K, bits, block_size).to(x.dtype)
    y = torch.matmul(x, w.t())
    return y if bias is None else y + bias


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, g_idx, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


def _register_schema() -> None:
    """Give onnx (hence onnxscript and the exporter) the contrib op's schema, once per process.

    onnx knows only the standard domains; the torch exporter needs a schema to build the
    node. This one follows ORT 1.32's (inputs A, B, scales, zero_points?, g_idx?, bias?).
    """
    from onnx import defs

    if defs.has(OP_NAME, DOMAIN):
        return
    P = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    A = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_NAME, DOMAIN, 1, "ONNX Runtime's block-quantized MatMul (registered by slimkit for export).",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=optional),
                P("g_idx", "T4", param_option=optional), P("bias", "T1", param_option=optional)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float input and output"),
                          ("T2", ["tensor(uint8)"], "packed codes"),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "zero points"),
                          ("T4", ["tensor(int32)"], "column -> block")],
        attributes=[defs.OpSchema.Attribute("K", A.INT, "in features"),
                    defs.OpSchema.Attribute("N", A.INT, "out features"),
                    defs.OpSchema.Attribute("bits", A.INT, "bits per code"),
                    defs.OpSchema.Attribute("block_size", A.INT, "columns per block"),
                    defs.OpSchema.Attribute("accuracy_level", A.INT, "0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8")],
    )
    defs.register_schema(schema)


def matmul_nbits_onnx(x, packed, scales, zero_points=None, g_idx=None, bias=None, K: int = 0, N: int = 0,
                      bits: int = 4, block_size: int = 32, accuracy_level: int = DEFAULT_ACCURACY_LEVEL):
    """onnxscript translation of ``slimkit::matmul_nbits``: one ``com.microsoft::MatMulNBits`` node."""
    from onnxscript import values

    _register_schema()
    msft = values.Opset(DOMAIN, 1)
    return msft.MatMulNBits(x, packed, scales, zero_points, g_idx, bias, K=K, N=N, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)


# -- error of ORT's int8-activation kernel -------------------------------------------------
def int8_input_error_bound(x: torch.Tensor, layout: NBitsLayout) -> float:
    """Largest possible |error| of one output of a MatMulNBits node with accuracy_level 4 on input ``x``.

    ORT quantizes each row of A per block of ``block_size`` columns to int8 with scale
    s = max|a_block| / 127; rounding moves each element by at most s/2, so output (t, n)
    moves by at most Σ_blocks s_tb/2 · Σ_{k∈block} |W_nk|; the integer dot products are exact.
    The same bound covers fp16/bf16 compute (relative rounding ≤ 2⁻¹¹ / 2⁻⁹ per element < 1/254).
    """
    a = x.detach().reshape(-1, x.shape[-1]).double()
    if layout.perm is not None:
        a = a[:, layout.perm]
    if layout.g_idx is not None:
        return 0.0  # ORT dequantizes B and multiplies in float32 on the g_idx path
    if a.numel() == 0:
        return 0.0
    nb, bs = layout.K // layout.block_size, layout.block_size
    step = a.reshape(-1, nb, bs).abs().amax(dim=-1) / 127.0  # (T, n_blocks)
    w = dequantize_nbits(layout).double().abs().reshape(layout.N, nb, bs).sum(dim=-1)  # (N, n_blocks)
    return float(((step / 2) @ w.t()).max())


# -- files already written ----------------------------------------------------------------
def accuracy_levels(path: str | os.PathLike) -> dict[str, int]:
    """MatMulNBits node name -> accuracy_level in the ONNX file ``path`` (0 where unset)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    levels = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == DOMAIN:
            attr = next((a for a in node.attribute if a.name == "accuracy_level"), None)
            levels[node.name] = 0 if attr is None else int(attr.i)
    return levels


def check_accuracy_level(level: object) -> int:
    """``level`` if it is one of ``ACCURACY_LEVELS``, else ConfigError."""
    if isinstance(level, bool) or not isinstance(level, int) or level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level must be one of {', '.join(map(str, ACCURACY_LEVELS))} "
                          f"(0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got {level!r}")
    return level


def set_accuracy_level(path: str | os.PathLike, level: int) -> int:
    """Set ``accuracy_level`` of every MatMulNBits node of the ONNX file ``path`` in place (atomically).

    Returns how many nodes were changed. The rest of the file (metadata included) is kept;
    an external-data file beside it is left untouched (only the graph is rewritten).
    """
    import onnx

    level = check_accuracy_level(level)
    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"ONNX file {path} not found")
    proto = onnx.load(str(path), load_external_data=False)
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != DOMAIN:
            continue
        for attr in list(node.attribute):
            if attr.name == "accuracy_level":
                node.attribute.remove(attr)
        node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        changed += 1
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        onnx.save(proto, str(tmp / path.name))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return changed


def file_accuracy_level(path: str | os.PathLike) -> int:
    """The highest accuracy_level of the file's MatMulNBits nodes (0 without any)."""
    return max(accuracy_levels(path).values(), default=0)



# -- the export twin ----------------------------------------------------------------------
ACT_ORDER = "reorder"  # how act-order layers are written: "reorder" (Gather + fast kernel) or "g_idx"


class NBitsLinear(torch.nn.Module):
    """Export-only twin of a weight-only QuantLinear: (smoothing Mul,) (act-order Gather,) MatMulNBits."""

    def __init__(self, src, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, act_order: str | None = None, *,
                 int8_per_channel: bool = False) -> None:
        super().__init__()
        self.layout = nbits_layout(src, act_order or ACT_ORDER, int8_per_channel=int8_per_channel)
        self.accuracy_level = check_accuracy_level(accuracy_level)
        lay = self.layout
        for name in ("packed", "scales", "zero_points", "g_idx", "perm"):
            value = getattr(lay, name)
            self.register_buffer(name, None if value is None else value.clone())
        multiplier = getattr(src, "input_multiplier", None)
        self.register_buffer("multiplier", None if multiplier is None else multiplier.detach().float().clone())
        bias = None if src.bias is None else src.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def describe(self) -> str:
        smooth = "smoothed (Mul), " if self.multiplier is not None else ""
        return f"weight-only, {smooth}{self.layout.describe()}, accuracy_level={self.accuracy_level}"

    @property
    def weight(self) -> torch.Tensor:
        """The float32 (out, in) weight the node computes with, in the input's column order, as graph ops.

        For a parent that reads ``.weight`` instead of calling the layer (``nn.TransformerEncoderLayer``
        checks its children's weights before choosing a path): act-order undone, smoothing multiplier folded in.
        """
        lay = self.layout
        N, k_blocks = self.packed.shape[0], self.packed.shape[1]
        flat = self.packed.reshape(N, -1).to(torch.int32)
        if lay.bits < 8:  # low bits first, by division and remainder: ops the ONNX exporter translates (no shifts)
            per_byte = 8 // lay.bits
            place = torch.tensor([2 ** (lay.bits * i) for i in range(per_byte)], dtype=torch.int32)
            flat = torch.remainder(torch.div(flat.unsqueeze(-1), place, rounding_mode="floor"), 2 ** lay.bits)
            flat = flat.reshape(N, -1)[:, :lay.K]
        if self.zero_points is None:
            zero = torch.full((N, k_blocks), float(2 ** (lay.bits - 1)))
        elif self.zero_points.is_floating_point() or lay.bits == 8:
            zero = self.zero_points.float()
        else:
            zero = unpack(self.zero_points, lay.bits, k_blocks, symmetric=False).float()
        block = torch.arange(lay.K) // lay.block_size if self.g_idx is None else self.g_idx.to(torch.int64)
        w = (flat.float() - zero[:, block]) * self.scales.reshape(N, k_blocks).float()[:, block]
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]  # column j of the node multiplies input column perm[j]
        return w if self.multiplier is None else w * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier is not None:
            x = x * self.multiplier
        if self.perm is not None:
            x = torch.index_select(x, -1, self.perm)
        lay = self.layout
        return torch.ops.slimkit.matmul_nbits(x, self.packed, self.scales, self.zero_points, self.g_idx, self.bias,
                                              lay.K, lay.N, lay.bits, lay.block_size, self.accuracy_level)


__all__ = [
    "ACCURACY_LEVELS",
    "ACT_ORDER",
    "DEFAULT_ACCURACY_LEVEL",
    "NBITS",
    "NBitsLayout",
    "NBitsLinear",
    "accuracy_levels",
    "check_accuracy_level",
    "dequantize_nbits",
    "file_accuracy_level",
    "int8_input_error_bound",
    "matmul_nbits",
    "matmul_nbits_onnx",
    "nbits_layout",
    "nbits_unsupported",
    "pack_zero_points",
    "power_of_two_block",
    "set_accuracy_level",
]
