"""Quantized layers: QuantLinear, QuantConv2d and QuantEmbedding.

All hold integer weight codes and float32 scales as buffers (so ``state_dict`` carries
exactly what is stored on disk) and dequantize on the fly in ``forward``: simple and exact;
the fast path is the ONNX export with real int8 kernels (``slimkit.export.onnx``).

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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.quantization.primitives import (
    BITS,
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


class _QuantWeightMixin:
    """Shared storage of a quantized (rows, cols) weight; the subclass sets ``_rows``/``_cols``."""

    bits: int
    group_size: int | None
    symmetric: bool

    def _init_storage(self, rows: int, cols: int, device: torch.device | str | None, g_idx: bool = False) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        qrange(self.bits, self.symmetric)  # raises for an impossible bits/symmetric pair
        n_groups, _ = split_groups(cols, self.group_size)
        if self.bits in UNPACKED_BITS:
            qweight = torch.zeros(rows, cols, dtype=code_dtype(self.symmetric, self.bits), device=device)
        else:
            qweight = torch.zeros(rows, packed_size(cols, self.bits), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float32, device=device))
        zero_dtype = torch.uint8 if self.bits <= 8 else torch.int32
        zero = None if self.symmetric else torch.zeros(rows, n_groups, dtype=zero_dtype, device=device)
        self.register_buffer("zero", zero)
        # GPTQ act-order: the group of each input column (groups are runs of permuted columns),
        # in the narrowest integer type that holds every group index (uint8 up to 256 groups),
        # since it costs bits per weight: 8 / out_features for uint8.
        index_dtype = torch.uint8 if n_groups <= 256 else torch.int16 if n_groups <= 2**15 else torch.int32
        self.register_buffer("g_idx", torch.zeros(cols, dtype=index_dtype, device=device) if g_idx else None)

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
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._init_storage(out_features, in_features, device, g_idx)
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
        linear: nn.Linear,
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
        """Quantize ``linear``'s weight (RTN unless ``weight`` gives ready codes); the bias stays a float Parameter.

        ``input_multiplier`` (per input feature) is applied to the input before anything
        else; ``weight`` must then hold the codes of W·diag(1/multiplier).
        """
        with torch.no_grad():
            qw = weight or quantize_weight(linear.weight, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                bits=qw.bits,
                group_size=qw.group_size,
                symmetric=qw.symmetric,
                device=linear.weight.device,
                act_mode=act_mode,
                act_bits=act_bits,
                act_symmetric=act_symmetric,
                smooth=input_multiplier is not None,
                g_idx=qw.g_idx is not None,
            )
            mod._store(qw)
            if input_multiplier is not None:
                mod.input_multiplier.copy_(input_multiplier)
            if linear.bias is not None:
                # Keep the bias dtype (and independence from the old layer).
                mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return mod

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight, computed in float32 then cast to ``dtype``."""
        return dequantize_weight(self.codes(), self.scale, self.zero, self.group_size, self.g_idx).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            **self._input_spec(),
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
    ) -> None:
        super().__init__()
        if smooth:
            raise ValueError("input smoothing applies to QuantLinear only")
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
                act_symmetric=act_symmetric,
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
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantConv2d:
        """An empty QuantConv2d of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        pair = lambda v: (int(v[0]), int(v[1]))  # noqa: E731
        return cls(
            int(spec["in_channels"]), int(spec["out_channels"]), pair(spec["kernel_size"]), pair(spec["stride"]),
            pair(spec["padding"]), pair(spec["dilation"]), int(spec["groups"]), bias=bool(spec["bias"]),
            bits=int(spec["bits"]), group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]), **_input_kwargs(spec),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bits={self.bits}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}" + self._input_repr()
        )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@register_module_type
class QuantEmbedding(_QuantWeightMixin, SlimkitModule):
    """An Embedding whose table is stored as 8/4/2-bit codes, one scale per row (or per row-group).

    ``forward`` gathers only the looked-up rows' codes and scales and dequantizes those,
    so no dense (num_embeddings, dim) table is ever built. The output dtype is the original
    table's (``dtype``), since integer token ids carry no dtype to follow.
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
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.dtype = dtype
        self._init_storage(num_embeddings, embedding_dim, device)

    @property
    def _rows(self) -> int:
        return self.num_embeddings

    @property
    def _cols(self) -> int:
        return self.embedding_dim

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, bits: int = 8, group_size: int | None = None, symmetric: bool = True
    ) -> QuantEmbedding:
        """Round-to-nearest quantize ``embedding``'s table (groups run along the embedding dim)."""
        if embedding.max_norm is not None:
            # max_norm renormalizes the table in place during forward: impossible on codes.
            raise ValueError("an Embedding with max_norm cannot be quantized")
        with torch.no_grad():
            qw = quantize_weight(embedding.weight, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                embedding.num_embeddings,
                embedding.embedding_dim,
                padding_idx=embedding.padding_idx,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                dtype=embedding.weight.dtype,
                device=embedding.weight.device,
            )
            mod._store(qw)
        return mod

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (num_embeddings, dim) table in ``dtype`` (default: the original dtype)."""
        codes = self._codes(self.qweight, self.embedding_dim)
        return dequantize_weight(codes, self.scale, self.zero, self.group_size).to(dtype or self.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        codes = self._codes(F.embedding(input, self.qweight), self.embedding_dim)  # (..., dim)
        scale = F.embedding(input, self.scale)  # (..., n_groups)
        zero = None if self.zero is None else F.embedding(input, self.zero)
        return dequantize_weight(codes, scale, zero, self.group_size).to(self.dtype)

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
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantEmbedding:
        """An empty QuantEmbedding of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        dtype_name = spec.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"QuantEmbedding spec: unknown dtype {dtype_name!r}; known: {', '.join(_DTYPES)}")
        return cls(
            int(spec["num_embeddings"]),
            int(spec["embedding_dim"]),
            padding_idx=None if spec["padding_idx"] is None else int(spec["padding_idx"]),
            bits=int(spec["bits"]),
            group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]),
            dtype=_DTYPES[dtype_name],
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, dtype={self.dtype}"
        )
