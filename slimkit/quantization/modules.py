"""Quantized layers: QuantLinear, QuantConv2d and QuantEmbedding.

All hold integer weight codes and float32 scales as buffers (so ``state_dict`` carries
exactly what is stored on disk); the reference forward dequantizes on the fly (simple and
exact), and the ONNX export carries real int8/int4 kernels (``slimkit.export.onnx``).

Stored tensors (rows = out_features / out_channels / num_embeddings, cols = in_features /
in_channels·kh·kw / embedding_dim):
- ``qweight``: 8/16 bit: the codes themselves, (rows, cols) ``code_dtype``; 4/2/1 bit:
  uint8 (rows, ceil(cols·bits/8)) packed by ``primitives.pack`` (first code in the low
  bits, signed codes offset by 2^(bits−1), binary ±1 as bit 0/1).
- ``scale``: float32 (rows, n_groups); ``zero``: uint8 (rows, n_groups), asymmetric only.

QuantLinear and QuantConv2d can also quantize their *input* (``act_mode``):
- ``"static"``: one frozen per-tensor scale/zero (``act_scale``, ``act_zero``) found by an
  observer on calibration data;
- ``"dynamic"``: a per-tensor range measured on each batch at run time;
- ``"dynamic_token"`` (QuantLinear only): a range per token, i.e. per row of the input
  flattened to (tokens, in_features), measured at run time (SmoothQuant's and LLM.int8's
  per-token activations: one outlier token no longer coarsens every other token's grid).
The input is then fake-quantized (quantize, dequantize) before the float matmul, which is
exactly what an int8 kernel computes up to float32 summation order.

QuantLinear runs a real integer kernel (``slimkit.quantization.kernels``: torch's int8 and
int4 weight-only kernels, ``torch._int_mm`` for W8A8) where one fits its layout and was
measured to beat the dequantize path on this machine; ``reference_forward`` is the exact path
those kernels are tested against.

Every layer also answers ``.weight`` (and ``.bias``) like the float layer it replaced: a
read-only property giving the dequantized weight in the original dtype, computed on each
access and never stored (``state_dict`` holds only the codes). Code that reads a child's
weight instead of calling it (``nn.MultiheadAttention``'s ``out_proj``, the fused fast path
of ``nn.TransformerEncoderLayer``) then computes what the layer computes. A layer that
quantizes its input must be *called*: it carries a no-op forward pre-hook, which is what
torch's fused encoder paths check to fall back to calling each child (see
``_forward_must_run``).

``TiedQuantLinear`` is an output layer tied to a QuantEmbedding (lm_head and the token
table of most LMs): it computes with the embedding's codes, so the tie costs nothing twice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.linear_like import embedding_scale, linear_shape, linear_weight
from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.core.sparse_storage import CodeLayout
from slimkit.quantization.kernels import run_kernel
from slimkit.quantization.primitives import (
    STORED_BITS,
    QuantizedWeight,
    code_dtype,
    dequantize_weight,
    fake_quantize,
    pack,
    packed_size,
    qrange,
    quantize_weight,
    scale_zero_from_range,
    split_groups,
    unpack,
)

# Bit widths stored one code per element (not packed).
UNPACKED_BITS = (8, 16)
ACT_MODES = (None, "static", "dynamic", "dynamic_token")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype_from_spec(spec: dict[str, Any], owner: str) -> torch.dtype:
    """The ``dtype`` entry of a spec (float32 when absent, as in checkpoints written before it existed)."""
    name = spec.get("dtype", "float32")
    if name not in _DTYPES:
        raise ValueError(f"{owner} spec: unknown dtype {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _dtype_spec(dtype: torch.dtype) -> dict[str, str]:
    """``{"dtype": name}`` for a non-float32 layer; nothing for float32 (older specs stay valid as written)."""
    return {} if dtype == torch.float32 else {"dtype": str(dtype).removeprefix("torch.")}


def _has_float_zero(qw: QuantizedWeight) -> bool:
    """True when ``qw``'s zero points are fractional (a float tensor): the GGUF offset grids."""
    return qw.zero is not None and qw.zero.is_floating_point()


def _forward_must_run(_module: nn.Module, _args: tuple) -> None:
    """No-op forward pre-hook of layers whose forward does more than a matmul with ``.weight`` (input quantization).

    ``nn.TransformerEncoderLayer`` (and ``nn.TransformerDecoderLayer``) run a fused kernel
    in eval mode without gradients that reads ``linear1.weight`` etc. directly; they fall
    back to calling their children when any child has a hook. This hook is that signal.
    """


class _QuantWeightMixin:
    """Shared storage of a quantized (rows, cols) weight; the subclass sets ``_rows``/``_cols``."""

    bits: int
    group_size: int | None
    symmetric: bool
    dtype: torch.dtype = torch.float32  # the replaced layer's weight dtype: what ``.weight`` returns

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the replaced layer's dtype, read-only and recomputed on each access.

        For code that reads ``.weight`` instead of calling the layer (``nn.MultiheadAttention``
        and friends); not a parameter or buffer, so nothing extra is saved or counted.
        """
        return self.dense_weight(self.dtype)

    def _init_storage(self, rows: int, cols: int, device: torch.device | str | None, g_idx: bool = False,
                      float_zero: bool = False) -> None:
        if self.bits not in STORED_BITS:
            raise ValueError(f"bits must be one of {STORED_BITS}, got {self.bits!r}")
        qrange(self.bits, self.symmetric)  # raises for an impossible bits/symmetric pair
        n_groups, _ = split_groups(cols, self.group_size)
        if self.bits in UNPACKED_BITS:
            qweight = torch.zeros(rows, cols, dtype=code_dtype(self.symmetric, self.bits), device=device)
        else:
            qweight = torch.zeros(rows, packed_size(cols, self.bits), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float32, device=device))
        # float zero points: grids whose offset is not a whole code (GGUF q4_1/q4_k, quantization.grids)
        zero_dtype = torch.float32 if float_zero else torch.uint8 if self.bits <= 8 else torch.int32
        zero = None if self.symmetric else torch.zeros(rows, n_groups, dtype=zero_dtype, device=device)
        self.register_buffer("zero", zero)
        # GPTQ act-order: the group of each input column (groups are runs of permuted columns),
        # in the narrowest integer type that holds every group index (uint8 up to 256 groups),
        # since it costs bits per weight: 8 / out_features for uint8.
        index_dtype = torch.uint8 if n_groups <= 256 else torch.int16 if n_groups <= 2**15 else torch.int32
        self.register_buffer("g_idx", torch.zeros(cols, dtype=index_dtype, device=device) if g_idx else None)

    def _float_zero_spec(self) -> dict[str, bool]:
        """``{"float_zero": True}`` for a layer with fractional zero points; nothing otherwise (older specs stay valid)."""
        return {"float_zero": True} if self.zero is not None and self.zero.is_floating_point() else {}

    def _store(self, qw: QuantizedWeight) -> None:
        """Copy a ``QuantizedWeight`` into the buffers (packing below 8 bits)."""
        if (qw.g_idx is None) != (self.g_idx is None):
            raise ValueError("the weight's g_idx and the layer's g_idx buffer must both be present or both absent")
        q = qw.q if self.bits in UNPACKED_BITS else pack(qw.q, self.bits, symmetric=self.symmetric)
        self.qweight.copy_(q)
        self.scale.copy_(qw.scale)
        if self.zero is not None:
            self.zero.copy_(qw.zero)
        if self.g_idx is not None:
            self.g_idx.copy_(qw.g_idx)

    def _codes(self, qweight: torch.Tensor, cols: int) -> torch.Tensor:
        """Unpacked codes of (gathered rows of) ``qweight``."""
        return qweight if self.bits in UNPACKED_BITS else unpack(qweight, self.bits, cols, symmetric=self.symmetric)

    def codes(self) -> torch.Tensor:
        """The unpacked (rows, cols) integer codes of the whole weight."""
        return self._codes(self.qweight, self._cols)

    def sparse_code_layouts(self) -> dict[str, Any]:
        """``{"qweight": CodeLayout}`` when zero weights have one stored code (symmetric codes: 0, stored as
        2^(b-1) below 8 bits), so a checkpoint can store a pruned layer's codes as bitmask + the others."""
        if not self.symmetric or self.bits not in (2, 4, 8):
            return {}  # a zero point per group: no single code means 0
        return {"qweight": CodeLayout(self.bits, 0 if self.bits in UNPACKED_BITS else 2 ** (self.bits - 1))}

    def weight_bits_per_element(self) -> float:
        """Measured storage bits per weight element: bytes of qweight, scale, zero (and g_idx) × 8 / (rows·cols)."""
        stored = (self.qweight, self.scale, self.zero, self.g_idx)
        nbytes = sum(t.numel() * t.element_size() for t in stored if t is not None)
        return nbytes * 8 / (self._rows * self._cols)

    def slimkit_param_counts(self) -> tuple[int, int]:
        """``(total, nonzero)`` of the logical weight; a bias is an nn.Parameter, counted by the normal walk."""
        with torch.no_grad():
            return self._rows * self._cols, int(torch.count_nonzero(self.dense_weight()))


class _InputQuantMixin:
    """Optional quantization of a layer's input: none, static (frozen scale), dynamic (per batch) or per token."""

    act_mode: str | None
    act_bits: int
    act_symmetric: bool

    def _init_input_quant(self, act_mode: str | None, act_bits: int, act_symmetric: bool, device,
                          smooth: bool = False, features: int = 0) -> None:
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        if act_mode is not None and act_bits not in (8, 16):
            raise ValueError(f"activations are quantized to 8 or 16 bits, got {act_bits!r}")
        if act_mode == "dynamic_token" and features == 0:
            # Only QuantLinear passes its in_features; a conv input's last dim is not its channels.
            raise ValueError("per-token input quantization (act_mode='dynamic_token') applies to QuantLinear only")
        self.act_mode, self.act_bits, self.act_symmetric = act_mode, act_bits, act_symmetric
        if act_mode == "static":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("act_zero", torch.zeros((), dtype=torch.int32, device=device))
        else:
            self.act_scale = self.act_zero = None
        # SmoothQuant-style per-input-channel multiplier 1/s: the stored weight is W·diag(s),
        # so x·(1/s) times it is the original product, with outlier channels tamed before rounding.
        multiplier = torch.ones(features, dtype=torch.float32, device=device) if smooth else None
        self.register_buffer("input_multiplier", multiplier)
        if act_mode is not None or smooth:
            self.register_forward_pre_hook(_forward_must_run)

    def set_input_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Freeze the static input scale and zero point (0-dim tensors from an observer)."""
        if self.act_mode != "static":
            raise ValueError("set_input_qparams needs act_mode='static'")
        self.act_scale.copy_(scale.reshape(()))
        self.act_zero.copy_(zero.reshape(()))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (times the smoothing multiplier, if any) rounded onto the input grid, still a float tensor."""
        if self.input_multiplier is not None:
            x = x * self.input_multiplier.to(x.dtype)
        if self.act_mode is None:
            return x
        if self.act_mode == "static":
            scale, zero = self.act_scale, self.act_zero
        elif self.act_mode == "dynamic_token":
            # One range per token: min/max over the feature (last) dim, kept as size 1 to broadcast.
            xf = x.detach().float()
            lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
            scale, zero = scale_zero_from_range(lo, hi, self.act_bits, self.act_symmetric)
        else:
            lo, hi = torch.aminmax(x.detach().float())
            scale, zero = scale_zero_from_range(lo, hi, self.act_bits, self.act_symmetric)
        return fake_quantize(x, scale, None if self.act_symmetric else zero, self.act_bits, self.act_symmetric)

    def _input_spec(self) -> dict[str, Any]:
        spec = {"act_mode": self.act_mode, "act_bits": self.act_bits, "act_symmetric": self.act_symmetric}
        if self.input_multiplier is not None:
            spec["smooth"] = True
        return spec

    def _input_repr(self) -> str:
        smooth = ", smoothed input" if self.input_multiplier is not None else ""
        if self.act_mode is None:
            return smooth
        kind = "symmetric" if self.act_symmetric else "asymmetric"
        return f", act={self.act_mode} int{self.act_bits} {kind}" + smooth


def _input_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """Input-quantization constructor arguments from a spec (absent in weight-only specs)."""
    return {
        "act_mode": spec.get("act_mode"),
        "act_bits": int(spec.get("act_bits", 8)),
        "act_symmetric": bool(spec.get("act_symmetric", False)),
        "smooth": bool(spec.get("smooth", False)),
    }


@register_module_type
class QuantLinear(_QuantWeightMixin, _InputQuantMixin, SlimkitModule):
    """A Linear whose weight is stored as 16/8/4/2/1-bit codes with per-channel or per-group scales.

    ``forward`` optionally quantizes the input (``act_mode``), dequantizes the weight to
    the input's dtype and calls ``F.linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        device: torch.device | str | None = None,
        act_mode: str | None = None,
        act_bits: int = 8,
        act_symmetric: bool = False,
        smooth: bool = False,
        g_idx: bool = False,
        dtype: torch.dtype = torch.float32,
        float_zero: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.dtype = dtype
        self._init_storage(out_features, in_features, device, g_idx, float_zero)
        self._init_input_quant(act_mode, act_bits, act_symmetric, device, smooth, in_features)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @property
    def _rows(self) -> int:
        return self.out_features

    @property
    def _cols(self) -> int:
        return self.in_features

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        *,
        weight: QuantizedWeight | None = None,
        act_mode: str | None = None,
        act_bits: int = 8,
        act_symmetric: bool = False,
        input_multiplier: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize a Linear-like layer's (out, in) weight (RTN unless ``weight`` gives ready codes).

        ``linear``: an nn.Linear or any layer ``core.linear_like`` reads (a Conv1D's
        transposed weight is read as (out, in)). The bias stays a float Parameter.
        ``input_multiplier`` (per input feature) is applied to the input before anything
        else; ``weight`` must then hold the codes of W·diag(1/multiplier).
        """
        with torch.no_grad():
            w = linear_weight(linear)
            out_f, in_f = linear_shape(linear)
            qw = weight or quantize_weight(w, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                in_f,
                out_f,
                bias=linear.bias is not None,
                bits=qw.bits,
                group_size=qw.group_size,
                symmetric=qw.symmetric,
                device=w.device,
                act_mode=act_mode,
                act_bits=act_bits,
                act_symmetric=act_symmetric,
                smooth=input_multiplier is not None,
                g_idx=qw.g_idx is not None,
                dtype=w.dtype,
                float_zero=_has_float_zero(qw),
            )
            mod._store(qw)
            if input_multiplier is not None:
                mod.input_multiplier.copy_(input_multiplier)
            if linear.bias is not None:
                # Keep the bias dtype (and independence from the old layer).
                mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return mod

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight as stored (W·diag(s) for a smoothed layer), in float32 then ``dtype``."""
        return dequantize_weight(self.codes(), self.scale, self.zero, self.group_size, self.g_idx).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight the layer applies to its input, dequantized, in the replaced layer's dtype; read-only.

        A smoothed layer multiplies its input by 1/s before its W·diag(s) codes, so its
        ``weight`` is W (the multiplier folded back in). Recomputed on each access, never stored.
        """
        w = self.dense_weight()
        if self.input_multiplier is not None:
            w = w * self.input_multiplier
        return w.to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An integer kernel where one was measured to win here (``kernels.run_kernel``), else the reference.
        out = run_kernel(self, x)
        return self.reference_forward(x) if out is None else out

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exact path: quantize the input (if the layer does), dequantize the weight, ``F.linear``.

        Every integer kernel is tested against this.
        """
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(x), self.dense_weight(x.dtype), bias)

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            **({"g_idx": True} if self.g_idx is not None else {}),
            **self._float_zero_spec(),
            **self._input_spec(),
            **_dtype_spec(self.dtype),
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantLinear:
        """An empty QuantLinear of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            bias=bool(spec["bias"]),
            bits=int(spec["bits"]),
            group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]),
            g_idx=bool(spec.get("g_idx", False)),
            dtype=_dtype_from_spec(spec, "QuantLinear"),
            float_zero=bool(spec.get("float_zero", False)),
            **_input_kwargs(spec),
        )

    def extra_repr(self) -> str:
        g_idx = ", g_idx (act-order)" if self.g_idx is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}" + g_idx + self._input_repr()
        )


@register_module_type
class QuantConv2d(_QuantWeightMixin, _InputQuantMixin, SlimkitModule):
    """A Conv2d whose kernel is stored as codes, one scale per output channel (or per group of its flattened inputs).

    The (out, in/groups, kh, kw) kernel is quantized as a (out, in/groups·kh·kw) matrix, so
    every weight code layout, packing and scale of QuantLinear applies unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        device: torch.device | str | None = None,
        act_mode: str | None = None,
        act_bits: int = 8,
        act_symmetric: bool = False,
        smooth: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if smooth:
            raise ValueError("input smoothing applies to QuantLinear only")
        self.dtype = dtype
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._init_storage(out_channels, self._cols, device)
        self._init_input_quant(act_mode, act_bits, act_symmetric, device)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device)) if bias else None

    @property
    def _rows(self) -> int:
        return self.out_channels

    @property
    def _cols(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        *,
        weight: QuantizedWeight | None = None,
        act_mode: str | None = None,
        act_bits: int = 8,
        act_symmetric: bool = False,
    ) -> QuantConv2d:
        """Quantize ``conv``'s kernel (RTN unless ``weight`` gives ready codes for the flattened kernel)."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero padding given as numbers is supported, got {conv.padding_mode!r} / {conv.padding!r}")
        with torch.no_grad():
            flat = conv.weight.reshape(conv.out_channels, -1)  # (out, in/groups·kh·kw)
            qw = weight or quantize_weight(flat, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, bias=conv.bias is not None, bits=qw.bits, group_size=qw.group_size,
                symmetric=qw.symmetric, device=conv.weight.device, act_mode=act_mode, act_bits=act_bits,
                act_symmetric=act_symmetric, dtype=conv.weight.dtype,
            )
            mod._store(qw)
            if conv.bias is not None:
                mod.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        return mod

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in/groups, kh, kw) kernel in ``dtype``."""
        flat = dequantize_weight(self.codes(), self.scale, self.zero, self.group_size)
        return flat.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(self.quantize_input(x), self.dense_weight(x.dtype), bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
            "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, **self._input_spec(),
            **_dtype_spec(self.dtype),
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantConv2d:
        """An empty QuantConv2d of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        pair = lambda v: (int(v[0]), int(v[1]))  # noqa: E731
        return cls(
            int(spec["in_channels"]), int(spec["out_channels"]), pair(spec["kernel_size"]), pair(spec["stride"]),
            pair(spec["padding"]), pair(spec["dilation"]), int(spec["groups"]), bias=bool(spec["bias"]),
            bits=int(spec["bits"]), group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]), dtype=_dtype_from_spec(spec, "QuantConv2d"), **_input_kwargs(spec),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bits={self.bits}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}" + self._input_repr()
        )


@register_module_type
class QuantEmbedding(_QuantWeightMixin, SlimkitModule):
    """An Embedding whose table is stored as 8/4/2-bit codes, one scale per row (or per row-group).

    ``forward`` gathers only the looked-up rows' codes and scales and dequantizes those,
    so no dense (num_embeddings, dim) table is ever built. The output dtype is the original
    table's (``dtype``), since integer token ids carry no dtype to follow. ``embed_scale``
    (None for a plain nn.Embedding): the constant the replaced layer's forward multiplied
    the rows by (Gemma's √hidden, ``core.linear_like.embedding_scale``); ``.weight`` and
    ``dense_weight`` stay the unscaled table, as the original layer's ``.weight`` was.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        embed_scale: float | None = None,
        float_zero: bool = False,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.dtype = dtype
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self._init_storage(num_embeddings, embedding_dim, device, float_zero=float_zero)

    @property
    def _rows(self) -> int:
        return self.num_embeddings

    @property
    def _cols(self) -> int:
        return self.embedding_dim

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
        *, weight: QuantizedWeight | None = None,
    ) -> QuantEmbedding:
        """Round-to-nearest quantize ``embedding``'s table (groups run along the embedding dim).

        ``weight``: ready codes of the table instead of RTN (e.g. a searched range). A
        subclass that scales its rows (``embedding_scale``) keeps that scale; any other
        subclass raises ValueError with the reason.
        """
        if embedding.max_norm is not None:
            # max_norm renormalizes the table in place during forward: impossible on codes.
            raise ValueError("an Embedding with max_norm cannot be quantized")
        embed_scale = embedding_scale(embedding)
        with torch.no_grad():
            qw = weight or quantize_weight(embedding.weight, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                embedding.num_embeddings,
                embedding.embedding_dim,
                padding_idx=embedding.padding_idx,
                bits=qw.bits,
                group_size=qw.group_size,
                symmetric=qw.symmetric,
                dtype=embedding.weight.dtype,
                device=embedding.weight.device,
                embed_scale=embed_scale,
                float_zero=_has_float_zero(qw),
            )
            mod._store(qw)
        return mod

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (num_embeddings, dim) table in ``dtype`` (default: the original dtype), unscaled."""
        codes = self._codes(self.qweight, self.embedding_dim)
        return dequantize_weight(codes, self.scale, self.zero, self.group_size).to(dtype or self.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        codes = self._codes(F.embedding(input, self.qweight), self.embedding_dim)  # (..., dim)
        scale = F.embedding(input, self.scale)  # (..., n_groups)
        zero = None if self.zero is None else F.embedding(input, self.zero)
        out = dequantize_weight(codes, scale, zero, self.group_size).to(self.dtype)
        if self.embed_scale is not None:
            # As transformers' scaled embeddings: the scale in the table's dtype, multiplied after the lookup.
            out = out * torch.tensor(self.embed_scale, dtype=self.dtype, device=out.device)
        return out

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "dtype": str(self.dtype).removeprefix("torch."),
            **({} if self.embed_scale is None else {"embed_scale": self.embed_scale}),
            **self._float_zero_spec(),
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantEmbedding:
        """An empty QuantEmbedding of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        scale = spec.get("embed_scale")
        return cls(
            int(spec["num_embeddings"]),
            int(spec["embedding_dim"]),
            padding_idx=None if spec["padding_idx"] is None else int(spec["padding_idx"]),
            bits=int(spec["bits"]),
            group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]),
            dtype=_dtype_from_spec(spec, "QuantEmbedding"),
            embed_scale=None if scale is None else float(scale),
            float_zero=bool(spec.get("float_zero", False)),
        )

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, dtype={self.dtype}" + scale
        )


@register_module_type
class TiedQuantLinear(SlimkitModule):
    """An output layer (lm_head) tied to a QuantEmbedding: y = x · dequant(table)ᵀ (+ bias), no codes of its own.

    The table's codes, scales and zero points are read from the embedding at ``source``
    (a module path from the model's root) on every call, so the tie costs nothing twice in
    memory, in ``state_dict`` and on disk, and survives ``.to()`` and ``deepcopy``. The
    embedding is referenced, not registered as a child (it is not walked twice);
    ``after_load`` re-binds it in a reloaded checkpoint. Weight-only: no input quantization.
    """

    def __init__(self, in_features: int, out_features: int, source: str, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.source = in_features, out_features, source
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        object.__setattr__(self, "_table", None)  # the QuantEmbedding, kept out of the module tree

    @classmethod
    def tie(cls, linear: nn.Module, table: QuantEmbedding, source: str) -> TiedQuantLinear:
        """The tied replacement of ``linear`` reading ``table`` (at path ``source``); its bias is kept."""
        out_f, in_f = linear_shape(linear)
        if (out_f, in_f) != (table.num_embeddings, table.embedding_dim):
            raise ValueError(f"a ({out_f}, {in_f}) output layer cannot read a {table.num_embeddings}x"
                             f"{table.embedding_dim} table")
        mod = cls(in_f, out_f, source, bias=False)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        mod.bind(table)
        mod.train(linear.training)
        return mod

    def bind(self, table: nn.Module) -> None:
        """Read the codes of ``table`` (a QuantEmbedding of this layer's shape) from now on."""
        if not isinstance(table, QuantEmbedding) or (table.num_embeddings, table.embedding_dim) != (
                self.out_features, self.in_features):
            raise ValueError(f"TiedQuantLinear needs a {self.out_features}x{self.in_features} QuantEmbedding at "
                             f"{self.source!r}, found {type(table).__name__}")
        object.__setattr__(self, "_table", table)

    @classmethod
    def after_load(cls, model: nn.Module) -> None:
        """Bind every TiedQuantLinear of a reloaded ``model`` to its embedding."""
        from slimkit.core.errors import ModelLoadError

        for name, m in model.named_modules():
            if isinstance(m, cls):
                try:
                    m.bind(model.get_submodule(m.source))
                except (AttributeError, ValueError) as exc:
                    raise ModelLoadError(f"{name} is tied to {m.source!r}, which the checkpoint does not rebuild "
                                         f"as a QuantEmbedding ({exc})") from None

    @property
    def table(self) -> QuantEmbedding:
        """The QuantEmbedding whose codes this layer computes with."""
        if self._table is None:
            raise RuntimeError(f"TiedQuantLinear is not bound to its embedding {self.source!r} yet")
        return self._table

    @property
    def dtype(self) -> torch.dtype:
        """The table's dtype (the tied weight's)."""
        return self.table.dtype

    @property
    def bits(self) -> int:
        """The table's bit width."""
        return self.table.bits

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) table in its dtype, read-only: equal to the embedding's ``.weight``."""
        return self.table.dense_weight()

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight: the tied table."""
        return self.table.dense_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.table.dense_weight(x.dtype), bias)

    def weight_bits_per_element(self) -> float:
        """The bits per element of the tied table (stored once, by the embedding)."""
        return self.table.weight_bits_per_element()

    def slimkit_param_counts(self) -> tuple[int, int]:
        """``(0, 0)``: the weight is the embedding's and is counted there, as a tied float weight is counted once."""
        return 0, 0

    def as_quant_linear(self) -> QuantLinear:
        """A standalone QuantLinear with copies of the table's codes (for exports that write each layer apart)."""
        t = self.table
        mod = QuantLinear(self.in_features, self.out_features, bias=self.bias is not None, bits=t.bits,
                          group_size=t.group_size, symmetric=t.symmetric, device=t.qweight.device, dtype=t.dtype)
        with torch.no_grad():
            mod.qweight.copy_(t.qweight)
            mod.scale.copy_(t.scale)
            if t.zero is not None:
                mod.zero.copy_(t.zero)
            if self.bias is not None:
                mod.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return mod

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``): the tied embedding's path included."""
        return {"in_features": self.in_features, "out_features": self.out_features, "source": self.source,
                "bias": self.bias is not None}

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> TiedQuantLinear:
        """An unbound TiedQuantLinear (``after_load`` binds it once the weights are in)."""
        return cls(int(spec["in_features"]), int(spec["out_features"]), str(spec["source"]), bias=bool(spec["bias"]))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to {self.source}"
