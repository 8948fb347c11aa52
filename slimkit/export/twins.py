"""Export-only twins of slimkit's quantized layers: what each becomes in an ONNX graph.

``_swap_quantized`` deep-copies a model and replaces every quantized layer with a twin
whose forward is written in ops the exporter turns into the QDQ / MatMulInteger /
MatMulNBits / int8 Gather patterns listed in ``slimkit.export.onnx`` (which drives the
export and checks the result); the user's model is never modified.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.linear_like import bypassed_forward
from slimkit.export.nbits import NBitsLinear, nbits_unsupported
from slimkit.quantization.attention import QuantAttentionInputs
from slimkit.quantization.modules import (
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    TiedQuantLinear,
)
from slimkit.quantization.primitives import qrange, scale_zero_from_range

INT16_OPSET = 21  # the first opset whose (De)QuantizeLinear take 16-bit integers


def _qd():
    """``torch.ops.quantized_decomposed``, registered on first use."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    return torch.ops.quantized_decomposed


@torch.library.custom_op("slimkit::dynamic_quant_linear", mutates_args=())
def dynamic_quant_linear(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                         bias: torch.Tensor | None, symmetric: bool) -> torch.Tensor:
    """Linear with a per-batch 8-bit quantized input and (in, out) integer weight codes.

    Eager: the same arithmetic as QuantLinear's dynamic mode. In ONNX (see
    ``_dynamic_quant_linear_onnx``): DynamicQuantizeLinear + MatMulInteger.
    """
    from slimkit.quantization.primitives import fake_quantize

    lo, hi = torch.aminmax(x.detach().float())
    scale, zero = scale_zero_from_range(lo, hi, 8, symmetric)
    xq = fake_quantize(x, scale, None if symmetric else zero, 8, symmetric)
    w = qweight_t.float()
    if w_zero is not None:
        w = w - w_zero.float()
    y = torch.matmul(xq, w * w_scale)
    return y if bias is None else y + bias


@dynamic_quant_linear.register_fake
def _(x, qweight_t, w_scale, w_zero, bias, symmetric):
    return x.new_empty((*x.shape[:-1], qweight_t.shape[1]))


def _dynamic_quant_linear_onnx(x, qweight_t, w_scale, w_zero=None, bias=None, symmetric: bool = False):
    """onnxscript translation of ``slimkit::dynamic_quant_linear`` (ORT fuses it into DynamicQuantizeMatMul)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def const(value, dtype):
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))

    if symmetric:
        # scale = max|x| / 127 (1 when x is all zero), codes q in [-127, 127] since |x| / scale <= 127.
        # They are stored as uint8 q + 128 with zero point 128 (the same values): ORT has no kernel for
        # the int8-input MatMulIntegerToFloat its fusion would otherwise make.
        absmax = op.ReduceMax(op.Abs(x), keepdims=0)
        x_scale = op.Div(absmax, const(127.0, np.float32))
        x_scale = op.Where(op.Greater(x_scale, const(0.0, np.float32)), x_scale, const(1.0, np.float32))
        x_zero = const(128, np.uint8)
        x_q = op.QuantizeLinear(x, x_scale, x_zero)
    else:
        x_q, x_scale, x_zero = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(x_q, qweight_t, x_zero, w_zero) if w_zero is not None else \
        op.MatMulInteger(x_q, qweight_t, x_zero)
    y = op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(x_scale, w_scale))
    return y if bias is None else op.Add(y, bias)


def _fake_quant_float(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The eager fake-quant as plain float ops (exported as Div, Round, Add, Clip, Sub, Mul)."""
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def _dynamic_qparams(x: torch.Tensor, bits: int, symmetric: bool,
                     per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (or per-token: per last-dim row) scale and zero of ``x`` as float tensors, as
    ``scale_zero_from_range`` computes them."""
    qmin, qmax = qrange(bits, symmetric)
    lo = x.amin(dim=-1, keepdim=True) if per_token else x.min()
    hi = x.amax(dim=-1, keepdim=True) if per_token else x.max()
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.maximum(-lo, hi) / qmax if symmetric else (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.zeros_like(scale) if symmetric else torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


class _InputQuant(nn.Module):
    """The input side of a QuantLinear/QuantConv2d: nothing, Q/DQ, or float fake-quant ops."""

    def __init__(self, src: QuantLinear | QuantConv2d) -> None:
        super().__init__()
        self.mode, self.bits, self.symmetric = src.act_mode, src.act_bits, src.act_symmetric
        self.qmin, self.qmax = qrange(self.bits, self.symmetric) if self.mode else (0, 0)
        if self.mode == "static":
            self.scale = float(src.act_scale)
            self.zero = 0 if self.symmetric else int(src.act_zero)
        multiplier = getattr(src, "input_multiplier", None)
        # Smoothing: a per-input-channel Mul before the quantizer (the weights already hold W·diag(s)).
        self.register_buffer("multiplier", None if multiplier is None else multiplier.detach().clone())

    def describe(self) -> str:
        smooth = "smoothed (Mul), " if self.multiplier is not None else ""
        return smooth + self._describe()

    def _describe(self) -> str:
        if self.mode is None:
            return "weight-only (float input)"
        if self.mode == "static" and self.bits == 8:
            kind = "symmetric int8 as uint8+128" if self.symmetric else "uint8"
            return f"static {kind} input Q/DQ"
        return f"{self.mode} {self.bits}-bit input fake-quant as float ops"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier is not None:
            x = x * self.multiplier
        if self.mode is None:
            return x
        if self.mode == "static" and self.bits == 8:
            qd = _qd()
            zero, qmin, qmax = self.zero, self.qmin, self.qmax
            if self.symmetric:
                # Symmetric int8 codes q in [-127, 127] are written as uint8 q + 128 with zero point 128:
                # the same values, but ORT fuses U8S8 for every Linear (S8S8: only some, and its
                # x64quantprecision rewrite then breaks per-channel weight DQs). The Clip keeps codes
                # within [-127, 127] like slimkit's restricted range.
                x = torch.clamp(x, -127 * self.scale, 127 * self.scale)
                zero, qmin, qmax = 128, 1, 255
            xq = qd.quantize_per_tensor(x, self.scale, zero, qmin, qmax, torch.uint8)
            return qd.dequantize_per_tensor(xq, self.scale, zero, qmin, qmax, torch.uint8)
        if self.mode == "static":
            scale = torch.tensor(self.scale, dtype=x.dtype)
            zero = torch.tensor(float(self.zero), dtype=x.dtype)
        else:
            scale, zero = _dynamic_qparams(x, self.bits, self.symmetric, per_token=self.mode == "dynamic_token")
        return _fake_quant_float(x, scale, zero, self.qmin, self.qmax)


def _float_weight_reason(src: QuantLinear | QuantConv2d, opset: int) -> str | None:
    """Why this layer's weight must be exported as float, or None when its codes go in the file."""
    if src.group_size is not None:
        return f"group-wise weights (group_size={src.group_size}) exported as float"
    if src.bits == 16 and not src.symmetric:
        return "16-bit asymmetric weights exported as float"
    if src.bits == 16 and opset < INT16_OPSET:
        return f"16-bit weights exported as float (int16 DequantizeLinear needs opset >= {INT16_OPSET})"
    return None


class _WeightDQ(nn.Module):
    """A weight as integer codes + DequantizeLinear, or as a float tensor when that cannot be exact int."""

    def __init__(self, src: QuantLinear | QuantConv2d, codes: torch.Tensor, axis: int, opset: int) -> None:
        super().__init__()
        self.axis = axis
        self.reason = _float_weight_reason(src, opset)
        self.integer = self.reason is None
        if not self.integer:
            self.register_buffer("weight", codes)  # here: the dequantized float weight
            return
        if src.bits == 16:
            self.dtype, self.qmin, self.qmax = torch.int16, -32767, 32767
        elif src.symmetric:
            self.dtype, self.qmin, self.qmax = torch.int8, -128, 127
        else:
            self.dtype, self.qmin, self.qmax = torch.uint8, 0, 255
        rows = src.scale.shape[0]
        self.register_buffer("codes", codes.to(self.dtype).contiguous())
        self.register_buffer("scale", src.scale.reshape(rows).float().clone())
        zero = torch.zeros(rows, dtype=torch.int64) if src.zero is None else src.zero.reshape(rows).to(torch.int64)
        self.register_buffer("zero", zero.clone())

    def describe(self) -> str:
        if not self.integer:
            return self.reason or "float"
        name = {torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16"}[self.dtype]
        return f"{name} codes per-channel DequantizeLinear(axis={self.axis})"

    def forward(self) -> torch.Tensor:
        if not self.integer:
            return self.weight
        return _qd().dequantize_per_channel(self.codes, self.scale, self.zero, self.axis, self.qmin, self.qmax,
                                            self.dtype)


def _float_bias(src: nn.Module) -> nn.Parameter | None:
    return None if src.bias is None else nn.Parameter(src.bias.detach().float().clone(), requires_grad=False)


class _ExportLinear(nn.Module):
    """Export-only twin of a QuantLinear: (in, out) codes so the graph is MatMul(x, DQ(W^T)).

    ``weight`` (the (out, in) DQ output, transposed) and ``bias`` answer a parent that reads
    them instead of calling the layer (``nn.MultiheadAttention``'s out_proj), as the
    QuantLinear does.
    """

    def __init__(self, src: QuantLinear, opset: int) -> None:
        super().__init__()
        self.input_quant = _InputQuant(src)
        with torch.no_grad():
            float_needed = _float_weight_reason(src, opset) is not None
            codes = src.dense_weight().t() if float_needed else src.codes().t()  # (in, out)
            self.weight_dq = _WeightDQ(src, codes.contiguous(), axis=1, opset=opset)
            self.bias = _float_bias(src)
        # Dynamic 8-bit input with integer weights of at most 8 bits: DynamicQuantizeLinear + MatMulInteger.
        self.dynamic_int = (src.act_mode == "dynamic" and src.act_bits == 8 and self.weight_dq.integer
                            and self.weight_dq.dtype in (torch.int8, torch.uint8))

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight as graph ops (DequantizeLinear, Transpose), for parents that read it."""
        return self.weight_dq().t()

    def describe(self) -> str:
        if self.dynamic_int:
            kind = ("symmetric uint8+128 (Abs/ReduceMax/QuantizeLinear)" if self.input_quant.symmetric
                    else "DynamicQuantizeLinear uint8")
            return f"dynamic input {kind} + MatMulInteger on {self.weight_dq.describe().split(' ')[0]} codes"
        return f"{self.input_quant.describe()}; weight {self.weight_dq.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # ORT fuses a 2-D MatMul + Add into a float Gemm before its int8 fusions run; keep it 3-D.
            return self._linear(x.unsqueeze(0)).squeeze(0)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_int:
            w = self.weight_dq
            zero = w.zero.to(w.dtype) if w.dtype == torch.uint8 else None
            return torch.ops.slimkit.dynamic_quant_linear(x, w.codes, w.scale, zero, self.bias,
                                                          self.input_quant.symmetric)
        y = torch.matmul(self.input_quant(x), self.weight_dq())
        return y if self.bias is None else y + self.bias


class _ExportConv2d(nn.Module):
    """Export-only twin of a QuantConv2d: input Q/DQ, DQ(int8 kernel, axis 0), Conv."""

    def __init__(self, src: QuantConv2d, opset: int) -> None:
        super().__init__()
        self.input_quant = _InputQuant(src)
        self.stride, self.padding, self.dilation, self.groups = src.stride, src.padding, src.dilation, src.groups
        with torch.no_grad():
            float_needed = _float_weight_reason(src, opset) is not None
            shape = (src.out_channels, src.in_channels // src.groups, *src.kernel_size)  # (out, in/g, kh, kw)
            codes = src.dense_weight() if float_needed else src.codes().reshape(shape)
            self.weight_dq = _WeightDQ(src, codes.contiguous(), axis=0, opset=opset)
            self.bias = _float_bias(src)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in/groups, kh, kw) kernel as a DequantizeLinear, for parents that read it."""
        return self.weight_dq()

    def describe(self) -> str:
        return f"{self.input_quant.describe()}; kernel {self.weight_dq.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quant(x), self.weight_dq(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _ExportEmbedding(nn.Module):
    """Export-only twin of a QuantEmbedding: Gather of the integer table, Cast, times the gathered scales."""

    def __init__(self, src: QuantEmbedding) -> None:
        super().__init__()
        with torch.no_grad():
            codes = src.codes()
            self.code_dtype = {8: torch.int8, 16: torch.int16}.get(src.bits, torch.int8) if src.symmetric else \
                (torch.uint8 if src.bits <= 8 else torch.int32)
            self.register_buffer("codes", codes.to(self.code_dtype).contiguous())  # (rows, dim)
            self.register_buffer("scale", src.scale.float().clone())  # (rows, n_groups)
            self.register_buffer("zero", None if src.zero is None else src.zero.float().clone())
        self.n_groups = src.scale.shape[1]
        self.dim, self.out_dtype = src.embedding_dim, src.dtype
        self.embed_scale = src.embed_scale  # a scaled embedding's constant (Gemma), applied after the lookup

    def describe(self) -> str:
        name = str(self.code_dtype).removeprefix("torch.")
        groups = "per-row" if self.n_groups == 1 else f"{self.n_groups} groups per row"
        scaled = "" if self.embed_scale is None else f", times embed_scale {self.embed_scale:g}"
        return f"{name} table, Gather + Cast + Mul by gathered {groups} scales{scaled}"

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (rows, dim) table, unscaled (as QuantEmbedding's ``.weight``), for parents that read it."""
        rows = self.codes.shape[0]
        return self._lookup(torch.arange(rows, device=self.codes.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._lookup(ids)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.out_dtype)
        return out

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows ``ids`` (before any embed_scale)."""
        codes = F.embedding(ids, self.codes).float()  # (..., dim): Gather on the integer table, then Cast
        scale = F.embedding(ids, self.scale)  # (..., n_groups)
        if self.n_groups > 1:
            codes = codes.reshape(*codes.shape[:-1], self.n_groups, self.dim // self.n_groups)  # (..., groups, gs)
            scale = scale.unsqueeze(-1)
        if self.zero is not None:
            zero = F.embedding(ids, self.zero)
            codes = codes - (zero.unsqueeze(-1) if self.n_groups > 1 else zero)
        return (codes * scale).reshape(*ids.shape, self.dim).to(self.out_dtype)


class _ExportAttentionInputs(nn.Module):
    """Export-only twin of QuantAttentionInputs: QuantizeLinear -> DequantizeLinear (uint8) per operand.

    ORT fuses DQ(a) -> MatMul <- DQ(b) with both operands activations into MatMulIntegerToFloat.
    """

    def __init__(self, src: QuantAttentionInputs) -> None:
        super().__init__()
        self.enabled = src.enabled
        self.grids = [(float(src.scale[i]), int(src.zero[i])) for i in range(len(src.scale))]

    def describe(self) -> str:
        return "query, key, probs, value: static uint8 Q/DQ" if self.enabled else "disabled (float attention)"

    def forward(self, x: torch.Tensor, role: int) -> torch.Tensor:
        if not self.enabled:
            return x
        scale, zero = self.grids[role]
        qd = _qd()
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(x, scale, zero, 0, 255, torch.uint8),
                                        scale, zero, 0, 255, torch.uint8)


def _uses_int16(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantConv2d)) and m.bits == 16 and m.symmetric and m.group_size is None
               for m in model.modules())


def _standalone(src: nn.Module) -> nn.Module:
    """The layer an export writes for ``src``: a TiedQuantLinear becomes a QuantLinear with a copy of the table's codes.

    ONNX graphs and compressed-tensors folders hold each layer's tensors apart; the tie
    to the embedding is kept in slimkit checkpoints only.
    """
    return src.as_quant_linear() if isinstance(src, TiedQuantLinear) else src


def _swap_quantized(model: nn.Module, opset: int) -> tuple[nn.Module, list[str], bool]:
    """A deep copy of ``model`` with every Quant* layer replaced by its export twin; notes; custom ops used."""
    from slimkit.core.targets import set_submodule

    kinds = (QuantLinear, TiedQuantLinear, QuantConv2d, QuantEmbedding, QuantAttentionInputs)
    names = [(n, _standalone(m)) for n, m in model.named_modules() if isinstance(m, kinds)]
    if not names:
        return model, [], False
    _qd()  # the exporter's registry sees quantized_decomposed ops only if they are registered before it is built
    twin_model = copy.deepcopy(model)
    notes, custom = [], False
    for name, src in names:
        # A layer its parent never calls (MultiheadAttention's out_proj) is read through .weight: the
        # DequantizeLinear twin can answer that, a fused MatMulNBits node cannot.
        read_by_parent = bypassed_forward(model, name) is not None
        if isinstance(src, QuantLinear) and nbits_unsupported(src) is None and not read_by_parent:
            # weight-only 2/4-bit (or group-wise 8-bit) codes: one com.microsoft::MatMulNBits node
            twin, custom = NBitsLinear(src), True
            label = f"QuantLinear W{src.bits}"
        elif isinstance(src, QuantLinear):
            twin = _ExportLinear(src, opset)
            custom = custom or twin.dynamic_int
            label = f"QuantLinear W{src.bits}" + (" (its weight read by the parent)" if read_by_parent else "")
        elif isinstance(src, QuantConv2d):
            twin, label = _ExportConv2d(src, opset), f"QuantConv2d W{src.bits}"
        elif isinstance(src, QuantAttentionInputs):
            twin, label = _ExportAttentionInputs(src), "attention matmul inputs"
        else:
            twin, label = _ExportEmbedding(src), f"QuantEmbedding {src.bits}-bit"
        set_submodule(twin_model, name, twin)
        notes.append(f"{name}: {label}: {twin.describe()}")
    return twin_model, notes, custom
