"""ONNX export: float models as they are, slimkit's quantized layers as real int8 graphs.

``export_onnx(model, path)`` exports any model ``slimkit.load`` gives (a transformers causal
LM or encoder, a zoo nn.Module, a user's nn.Module with an ``example`` input) through
``torch.onnx.export(..., dynamo=True)`` and returns an ``OnnxExport(path, notes,
max_abs_diff)``. ``check_onnx`` runs the PyTorch model and ONNX Runtime on the same inputs
and returns their largest difference; ``ort_session``/``run_onnx`` run the file.

Inputs and outputs by model kind (batch and sequence axes dynamic):

| kind | inputs | output |
|---|---|---|
| causal-lm | ``input_ids``, ``attention_mask`` (int64, all ones when exporting) | ``logits`` |
| encoder | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` (``logits`` for a classification head) |
| classifier / module | ``input`` (the ``example`` tensor; digits-cnn: (N, 1, 8, 8) float) | ``logits`` |

Quantized layers are exported from slimkit's own integer codes and scales (the float
weight is never in the file). Before export, each ``Quant*`` layer of a *deep copy* of the
model is swapped for an export-only twin whose forward uses
``torch.ops.quantized_decomposed`` ops, which the exporter writes as ONNX QuantizeLinear /
DequantizeLinear; the user's model is never modified. The patterns (x: layer input, codes
``q``, per-output-channel scales ``s_w``):

| layer | ONNX graph | what ONNX Runtime (ORT_ENABLE_ALL, CPU) runs |
|---|---|---|
| QuantLinear, static uint8 input (default) | ``QuantizeLinear(x, s_x, z_x:uint8) -> DequantizeLinear``; ``DequantizeLinear(q^T:int8 (in, out), s_w, 0:int8, axis=1)``; ``MatMul``; ``Add(bias)`` | ``MatMulIntegerToFloat`` (int8 GEMM, float output) + Add |
| QuantLinear, static symmetric int8 input (``act_symmetric``) | ``Clip(x, ±127·s_x) -> QuantizeLinear(uint8, zero 128) -> DequantizeLinear``: slimkit's int8 codes q stored as q + 128 (the same values); weight DQ as above | ``MatMulIntegerToFloat`` (U8S8; with int8 activations ORT fused only some layers and its x64 precision rewrite broke the rest) |
| QuantLinear, dynamic input | ``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, q^T:int8, x_zp) -> Cast -> Mul(x_scale·s_w) -> Add(bias)`` (symmetric input: ``Abs, ReduceMax, Div 127, Where, QuantizeLinear(uint8, zero 128)`` in place of DynamicQuantizeLinear, int8 codes + 128 as above) | ``DynamicQuantizeMatMul`` (bias folded in); symmetric: ``MatMulIntegerToFloat`` |
| QuantLinear, weight-only (``act_mode=None``), 2/4-bit codes or group-wise 8-bit | ``com.microsoft::MatMulNBits`` from the stored codes, scales and zero points (``slimkit.export.nbits``: block size, act-order, ``accuracy_level`` 4 by default) | the same node (int8 compute at level 4; float at 0/1) |
| QuantLinear, weight-only, per-channel 8-bit (or no power-of-two block) | ``DequantizeLinear(q^T) -> MatMul -> Add`` | ``MatMulNBits`` (bits=8; float compute in ``ort_session(exact=True)``) |
| QuantConv2d | input Q/DQ as for Linear; ``DequantizeLinear(q:int8 (out, in/g, kh, kw), s_w, axis=0) -> Conv -> (bias)`` | ``QLinearConv`` when the Conv's output (through a ReLU) feeds another layer's input Q; otherwise DQ + float Conv |
| QuantEmbedding | ``Gather(q:int8 (rows, dim), ids) -> Cast -> Mul(Gather(s (rows, n_groups), ids))`` | the same; the table stays int8 in the file (~4x smaller) |

Details:
- 4/2/1-bit codes are unpacked into an int8 container (exact); asymmetric weight codes use a
  uint8 container with their per-channel uint8 zero points.
- 16-bit weight codes: int16 DequantizeLinear, which needs opset 21 (chosen automatically
  when ``opset`` is None); with an explicit lower opset they are dequantized to float.
- Group-wise weights (``group_size``) of input-quantizing Linear layers and of Conv are
  exported as the dequantized float weight; their input quantization is kept.
- 16-bit activations, and dynamic inputs of Conv or of float-exported weights, are written as
  the same float arithmetic as the eager fake-quant (Div, Round, Add, Clip, Sub, Mul).
- 2-D inputs of a quantized Linear are run as (1, N, in): ORT would otherwise fuse
  MatMul + Add into a float Gemm before its int8 fusion gets to see the pattern.
- Layers of any other type are exported as the float graph of their forward.

Every layer's treatment is listed in ``OnnxExport.notes`` (and in the file's
``metadata_props["slimkit.notes"]``).

Running the files (sessions, op counts, the session option int8 weights beyond ±63 need on
some CPUs) lives in ``slimkit.export.ort``; its names are re-exported here.

Tolerance of ``check_onnx`` (``atol=None``):
- float layers: ``1e-4 · max|reference| + 1e-6`` (float32 summation order only);
- MatMulNBits nodes at accuracy_level ≥ 2 (int8 inputs): plus ``NBITS_MARGIN`` (1) times
  ``nbits.int8_input_error_bound`` of each such layer, an exact worst-case bound of the
  per-block int8 rounding of its input (measured on tiny Llama/Qwen2/OPT RTN int4/int8
  models: the logits differ by 2.5-5.5% of the summed bounds, ~1% of max|logits|);
- plus ``FLIPS_PER_LAYER (3) · s_x · max|W|`` for every layer that quantizes its input. The
  integer kernels are exact, but the float values *entering* a quantizer differ between ORT
  and PyTorch in their last bits (summation order upstream; a dynamic scale computed in
  float32 rather than float64), so a value lying on a rounding boundary can land on the
  neighbouring code. One flipped input code moves each output of that layer by at most
  ``s_x · max|W|`` (``s_x``: the layer's input step, its static scale or the per-batch dynamic
  one seen on these inputs); the change then propagates and may flip codes further on.
  Measured on stdlib-coder (6 layers, 43 int8 Linears, 2 x 256 tokens): the max difference was
  0.97 (static) and 1.18 (dynamic) times the sum of ``s_x · max|W|`` over layers, so three per
  layer leaves a ~2.5x margin. On the small models of ``tests/export`` the median difference
  stays at float precision, and the saturating u8s8 kernel (without the session option
  above) is caught with errors 6-23x the tolerance.

The exported file is written atomically: to a temporary folder beside ``path``, then
renamed into place (the ``.data`` file first when the model exceeds 1.8 GB and its weights
go to external data), so a failed export leaves an existing file intact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError, DataError, SlimkitError, UnsupportedError
from slimkit.core.io import model_info
from slimkit.export.nbits import (
    NBitsLinear,
    file_accuracy_level,
    int8_input_error_bound,
    matmul_nbits_onnx,
    nbits_unsupported,
)
from slimkit.export.ort import (  # noqa: F401  (re-exported: the public names of running a file)
    MISSING_MESSAGE,
    ORT_EXACT_CONFIG,
    ORT_SESSION_CONFIG,
    SATURATION_FREE_FLAGS,
    _recorded_session_config,
    _require_onnx,
    _require_ort,
    cpu_saturates_u8s8,
    op_counts,
    ort_op_counts,
    ort_session,
    run_onnx,
)
from slimkit.quantization.attention import IMPLEMENTATION as ATTENTION_IMPLEMENTATION
from slimkit.quantization.attention import QuantAttentionInputs
from slimkit.quantization.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quantization.primitives import qrange, scale_zero_from_range

DEFAULT_OPSET = 20  # torch.onnx's default
INT16_OPSET = 21  # the first opset whose (De)QuantizeLinear take 16-bit integers
OPSETS = range(18, 24)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin for the graph itself
FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-6
FLIPS_PER_LAYER = 3.0
NBITS_MARGIN = 1.0  # times the exact per-layer bound of MatMulNBits' int8 input rounding (see check_onnx)
# digits-cnn and other zoo nn.Modules: the input shape per sample, for the default example.
ZOO_INPUT_SHAPES = {"digits-cnn": (1, 8, 8)}
# Op types the CLI and notes count (the rest are still counted, just not shown by default).
OPS_OF_INTEREST = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMul", "Gemm",
                   "Conv", "Gather", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
                   "QGemm", "MatMulNBits")


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote.

    ``path``: the .onnx file. ``notes``: one line per quantized layer (how it was exported)
    plus general remarks. ``max_abs_diff``: ORT vs PyTorch on default inputs when
    ``export_onnx(..., check=True)`` ran the check, else None.
    """

    path: Path
    notes: tuple[str, ...] = ()
    max_abs_diff: float | None = None
    files: tuple[Path, ...] = field(default=(), repr=False)

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the .onnx file and its external-data file, if any."""
        return sum(p.stat().st_size for p in (self.files or (self.path,)) if p.exists())

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op type the file's main graph holds."""
        return op_counts(self.path)


# -- inputs and the export entry module ---------------------------------------------------
def _kind(model: nn.Module) -> str:
    return model_info(model)["kind"]


def _is_transformers(kind: str) -> bool:
    return kind in ("causal-lm", "encoder")


def example_inputs(model: nn.Module, example: Any = None, *, batch: int = 2, seq: int = 8,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The named inputs ``export_onnx``/``check_onnx`` feed ``model`` (see the module docstring).

    LMs and encoders get random token ids (seeded) and an all-ones attention mask of shape
    (batch, seq); a zoo model with a known input shape gets uniform [0, 1) floats; anything
    else needs ``example`` (a tensor, or a tuple of tensors named input_0, input_1, ...).
    """
    kind = _kind(model)
    if example is not None and _is_transformers(kind):
        # token models: a tensor is the input_ids; a dict may leave out the attention mask
        named = {"input_ids": example} if isinstance(example, torch.Tensor) else dict(example)
        if not isinstance(named.get("input_ids"), torch.Tensor):
            raise DataError("example for a transformers model must be the input_ids tensor or a dict with input_ids")
        named.setdefault("attention_mask", torch.ones_like(named["input_ids"]))
        return {"input_ids": named["input_ids"], "attention_mask": named["attention_mask"]}
    if example is not None:
        if isinstance(example, torch.Tensor):
            return {"input": example}
        if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
            return {f"input_{i}": t for i, t in enumerate(example)}
        if isinstance(example, Mapping) and all(isinstance(t, torch.Tensor) for t in example.values()):
            return dict(example)
        raise DataError("example must be a tensor, a tuple of tensors or a dict of tensors, "
                        f"got {type(example).__name__}")
    gen = torch.Generator().manual_seed(seed)
    if _is_transformers(kind):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise UnsupportedError(f"cannot make token ids for {type(model).__name__}: its config has no vocab_size; "
                                   "pass example=")
        ids = torch.randint(0, int(vocab), (batch, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    arch = getattr(model, "slimkit_arch", None)
    if arch in ZOO_INPUT_SHAPES:
        return {"input": torch.rand((batch, *ZOO_INPUT_SHAPES[arch]), generator=gen)}
    raise UnsupportedError(f"cannot export a {type(model).__name__} ({kind}) without knowing its input: "
                           "pass example=<a tensor of the input's shape>")


def _main_output(out: Any, prefer: tuple[str, ...]) -> torch.Tensor:
    """The one tensor the ONNX graph returns: ``logits``/``last_hidden_state`` of a ModelOutput, else the first."""
    if isinstance(out, torch.Tensor):
        return out
    for key in prefer:
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedError(f"the model returns {type(out).__name__}, not a tensor; slimkit exports one output tensor")


class _TokenEntry(nn.Module):
    """transformers models called with keyword arguments (transformers 5 needs them), one output tensor."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if self.causal else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return _main_output(out, ("logits",) if self.causal else ("last_hidden_state", "logits"))


class _TensorEntry(nn.Module):
    """A plain nn.Module called with positional tensors, one output tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return _main_output(self.model(*inputs), ("logits", "last_hidden_state"))


def _entry(model: nn.Module, kind: str) -> nn.Module:
    if _is_transformers(kind):
        return _TokenEntry(model, causal=kind == "causal-lm")
    return _TensorEntry(model)


def _output_name(model: nn.Module, kind: str) -> str:
    if kind == "encoder" and hasattr(model, "config") and not type(model).__name__.endswith("Model"):
        return "logits"  # e.g. BertForSequenceClassification
    return "last_hidden_state" if kind == "encoder" else "logits"


def _call(entry: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(entry, _TokenEntry):
        return entry(**inputs)
    return entry(*inputs.values())


# -- export-only twins of the quantized layers --------------------------------------------
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
    """Export-only twin of a QuantLinear: (in, out) codes so the graph is MatMul(x, DQ(W^T))."""

    def __init__(self, src: QuantLinear, opset: int) -> None:
        super().__init__()
        self.input_quant = _InputQuant(src)
        with torch.no_grad():
            float_needed = _float_weight_reason(src, opset) is not None
            codes = src.dense_weight().t() if float_needed else src.codes().t()  # (in, out)
            self.weight = _WeightDQ(src, codes.contiguous(), axis=1, opset=opset)
            self.bias = _float_bias(src)
        # Dynamic 8-bit input with integer weights of at most 8 bits: DynamicQuantizeLinear + MatMulInteger.
        self.dynamic_int = (src.act_mode == "dynamic" and src.act_bits == 8 and self.weight.integer
                            and self.weight.dtype in (torch.int8, torch.uint8))

    def describe(self) -> str:
        if self.dynamic_int:
            kind = ("symmetric uint8+128 (Abs/ReduceMax/QuantizeLinear)" if self.input_quant.symmetric
                    else "DynamicQuantizeLinear uint8")
            return f"dynamic input {kind} + MatMulInteger on {self.weight.describe().split(' ')[0]} codes"
        return f"{self.input_quant.describe()}; weight {self.weight.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # ORT fuses a 2-D MatMul + Add into a float Gemm before its int8 fusions run; keep it 3-D.
            return self._linear(x.unsqueeze(0)).squeeze(0)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_int:
            w = self.weight
            zero = w.zero.to(w.dtype) if w.dtype == torch.uint8 else None
            return torch.ops.slimkit.dynamic_quant_linear(x, w.codes, w.scale, zero, self.bias,
                                                          self.input_quant.symmetric)
        y = torch.matmul(self.input_quant(x), self.weight())
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
            self.weight = _WeightDQ(src, codes.contiguous(), axis=0, opset=opset)
            self.bias = _float_bias(src)

    def describe(self) -> str:
        return f"{self.input_quant.describe()}; kernel {self.weight.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quant(x), self.weight(), self.bias, self.stride, self.padding, self.dilation,
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

    def describe(self) -> str:
        name = str(self.code_dtype).removeprefix("torch.")
        groups = "per-row" if self.n_groups == 1 else f"{self.n_groups} groups per row"
        return f"{name} table, Gather + Cast + Mul by gathered {groups} scales"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(ids, self.codes).float()  # (..., dim): Gather on the integer table, then Cast
        scale = F.embedding(ids, self.scale)  # (..., n_groups)
        if self.n_groups > 1:
            codes = codes.reshape(*codes.shape[:-1], self.n_groups, self.dim // self.n_groups)  # (..., groups, gs)
            scale = scale.unsqueeze(-1)
        if self.zero is not None:
            zero = F.embedding(ids, self.zero)
            codes = codes - (zero.unsqueeze(-1) if self.n_groups > 1 else zero)
        out = codes * scale
        return out.reshape(*ids.shape, self.dim).to(self.out_dtype)


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


def _swap_quantized(model: nn.Module, opset: int) -> tuple[nn.Module, list[str], bool]:
    """A deep copy of ``model`` with every Quant* layer replaced by its export twin; notes; custom ops used."""
    from slimkit.core.targets import set_submodule

    kinds = (QuantLinear, QuantConv2d, QuantEmbedding, QuantAttentionInputs)
    names = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    if not names:
        return model, [], False
    _qd()  # the exporter's registry sees quantized_decomposed ops only if they are registered before it is built
    twin_model = copy.deepcopy(model)
    notes, custom = [], False
    for name, src in names:
        if isinstance(src, QuantLinear) and nbits_unsupported(src) is None:
            # weight-only 2/4-bit (or group-wise 8-bit) codes: one com.microsoft::MatMulNBits node
            twin, custom = NBitsLinear(src), True
            label = f"QuantLinear W{src.bits}"
        elif isinstance(src, QuantLinear):
            twin = _ExportLinear(src, opset)
            custom = custom or twin.dynamic_int
            label = f"QuantLinear W{src.bits}"
        elif isinstance(src, QuantConv2d):
            twin, label = _ExportConv2d(src, opset), f"QuantConv2d W{src.bits}"
        elif isinstance(src, QuantAttentionInputs):
            twin, label = _ExportAttentionInputs(src), "attention matmul inputs"
        else:
            twin, label = _ExportEmbedding(src), f"QuantEmbedding {src.bits}-bit"
        set_submodule(twin_model, name, twin)
        notes.append(f"{name}: {label}: {twin.describe()}")
    return twin_model, notes, custom


# -- export ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (the CLI prints one line per error)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                              "torch.fx.experimental.symbolic_shapes", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _dynamic_shapes(inputs: dict[str, torch.Tensor], token_inputs: bool) -> Any:
    if token_inputs:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        return {name: {0: batch, 1: seq} for name in inputs}
    # Positional *inputs of _TensorEntry: one spec per tensor; AUTO keeps a batch of 1 static instead of failing.
    return (tuple({0: torch.export.Dim.AUTO} if t.dim() else {} for t in inputs.values()),)


def _short(exc: BaseException) -> str:
    """The innermost cause of an exporter error, on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("#")]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _check_opset(opset: int | None, model: nn.Module) -> int:
    if opset is None:
        return INT16_OPSET if _uses_int16(model) else DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ConfigError(f"opset must be an integer in {OPSETS.start}..{OPSETS.stop - 1}, got {opset!r}")
    return opset


def export_onnx(model: nn.Module, path: str | os.PathLike, *, example: Any = None, opset: int | None = None,
                check: bool = False) -> OnnxExport:
    """Export ``model`` to the ONNX file ``path`` (atomically) and return an ``OnnxExport``.

    ``example``: the input of a model whose kind has no default (a tensor or tuple of
    tensors; its first axis is made dynamic). ``opset``: None picks 20, or 21 when the model
    holds 16-bit weight codes. ``check=True`` also runs ``check_onnx`` on fresh inputs of
    another batch/sequence size and fills ``max_abs_diff`` (raising when out of tolerance).
    The model is exported in eval mode and left in the mode it was in.
    """
    _require_onnx()
    for name, module in model.named_modules():
        reason = getattr(module, "onnx_unsupported", None)  # set by layer types with no exact ONNX form
        if reason:
            raise UnsupportedError(f"cannot export layer {name!r} ({type(module).__name__}) to ONNX: {reason}")
    path = Path(path)
    if path.exists() and path.is_dir():
        raise SlimkitError(f"{path} is a folder: give the .onnx file to write, e.g. {path / 'model.onnx'}")
    kind = _kind(model)
    opset = _check_opset(opset, model)
    inputs = example_inputs(model, example)
    was_training = model.training
    export_model, notes, custom = _swap_quantized(model, opset)
    if hasattr(export_model, "set_attn_implementation") and not _quantized_attention(model):
        # Eager attention exports as plain MatMul/Add/Softmax; the SDPA path adds Where/IsNaN
        # masking ops that cost ~9% of MiniLM's ORT time. Same maths, on a copy.
        if export_model is model:
            export_model = copy.deepcopy(model)
        try:
            export_model.set_attn_implementation("eager")
        except Exception:  # a model without an eager path keeps its own
            pass
    entry = _entry(export_model, kind).eval()
    output = _output_name(model, kind)
    table = {torch.ops.slimkit.dynamic_quant_linear.default: _dynamic_quant_linear_onnx,
             torch.ops.slimkit.matmul_nbits.default: matmul_nbits_onnx} if custom else None
    token_inputs = isinstance(entry, _TokenEntry)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                entry, tuple() if token_inputs else tuple(inputs.values()), kwargs=inputs if token_inputs else None,
                dynamo=True, verbose=False, opset_version=opset, input_names=list(inputs), output_names=[output],
                dynamic_shapes=_dynamic_shapes(inputs, token_inputs), custom_translation_table=table,
            )
    except SlimkitError:
        raise
    except Exception as exc:
        raise UnsupportedError(f"ONNX export of {type(model).__name__} failed ({_short(exc)}); "
                               "a layer or op the exporter cannot translate") from exc
    finally:
        # torch.onnx.export can leave modules in train mode: restore the user's mode.
        entry.eval()
        model.train(was_training)
    session_config = ORT_SESSION_CONFIG if _needs_exact_kernel(model) else {}
    if session_config:
        notes.append("on x86 CPUs without VNNI/AMX run with onnxruntime session option session.x64quantprecision=1 "
                     "(slimkit.export.onnx.ort_session sets it there): int8 weights beyond ±63 saturate their "
                     "uint8×int8 kernel; quantize with reduce_range=True to get exact results in any session")
    files = _save(program, path, notes, session_config)
    result = OnnxExport(path=path, notes=tuple(notes), files=files)
    if check:
        diff = check_onnx(model, path, example_inputs(model, example, batch=3, seq=11, seed=1)
                          if example is None else inputs)
        result = replace(result, max_abs_diff=diff)
    return result


def _unshare_weight_qparams(graph: Any) -> int:
    """Give every weight DequantizeLinear its own scale and zero-point initializers; returns how many were copied.

    The exporter merges equal initializers, so layers of the same width share one all-zero
    zero-point tensor. ORT's int8 -> uint8 weight rewrite (``session.x64quantprecision``)
    rewrites a shared one once per consumer and fails ("Attempt to replace the existing
    tensor"); without any zero point it makes a scalar one that per-channel DQ rejects.
    """
    from onnxscript import ir

    copied = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        if not node.inputs or node.inputs[0] is None or not node.inputs[0].is_initializer():
            continue  # an activation DQ: sharing its Q's scale and zero point is the QDQ pair's contract
        for index in (1, 2):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None or not value.is_initializer() or len(value.uses()) < 2:
                continue
            clone = ir.Value(name=f"{node.inputs[0].name}_{'scale' if index == 1 else 'zero_point'}",
                             type=value.type, shape=value.shape,
                             const_value=ir.tensor(value.const_value.numpy().copy()))
            graph.register_initializer(clone)
            node.replace_input_with(index, clone)
            copied += 1
    return copied


def _quantized_attention(model: nn.Module) -> bool:
    """Whether ``model`` dispatches its attention to slimkit's int8 attention (which is eager already)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_IMPLEMENTATION


def _needs_exact_kernel(model: nn.Module) -> bool:
    """Whether an input-quantized 8-bit layer holds weight codes beyond ±63 (which saturate VPMADDUBSW)."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and m.act_mode and m.bits == 8:
            if int(m.codes().to(torch.int16).abs().max()) > 63:
                return True
    return False


def _save(program: Any, path: Path, notes: list[str], session_config: dict[str, str]) -> tuple[Path, ...]:
    """Write ``program`` to ``path`` through a temporary folder beside it; returns the files written."""
    model = program.model
    _unshare_weight_qparams(model.graph)
    for node in model.graph.all_nodes():
        # The exporter's per-node stack traces and scopes: ~0.9 MB of MiniLM's 24 MB int8 file, unused by runtimes.
        node.metadata_props.clear()
    model.metadata_props["slimkit.notes"] = json.dumps(notes)
    model.metadata_props["slimkit.ort_session_config"] = json.dumps(session_config)
    size = sum(getattr(v.const_value, "nbytes", 0) or 0 for v in model.graph.initializers.values())
    external = size > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    data_name = f"{path.name}.data"
    try:
        program.save(tmp / path.name, external_data=external)
        written = [path]
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, path.parent / data_name)  # data first: the new .onnx points to it
            written.insert(0, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stale = path.parent / data_name
    if not external and stale.exists():
        stale.unlink()  # an earlier external-data export's weights, no longer referenced
    return tuple(written)


# -- checking -----------------------------------------------------------------------------
def _input_steps(model: nn.Module, entry: nn.Module, inputs: dict[str, torch.Tensor],
                 nbits_level: int = 0) -> tuple[torch.Tensor, float]:
    """The PyTorch output, and the flip allowance Σ FLIPS_PER_LAYER · s_x · max|W| over input-quantizing layers.

    ``nbits_level`` ≥ 2 (MatMulNBits nodes computing in int8/fp16/bf16): plus
    ``NBITS_MARGIN`` times ``int8_input_error_bound`` of every layer exported as MatMulNBits.
    """
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and m.act_mode is not None]
    allowance: list[float] = []
    layouts = {}
    if nbits_level >= 2:
        from slimkit.export.nbits import nbits_layout

        layouts = {id(m): nbits_layout(m) for m in model.modules()
                   if isinstance(m, QuantLinear) and nbits_unsupported(m) is None}

    def nbits_hook(module, args):
        x = args[0].detach().float()
        if module.input_multiplier is not None:
            x = x * module.input_multiplier
        allowance.append(NBITS_MARGIN * int8_input_error_bound(x, layouts[id(module)]))

    def hook(module, args):
        x = args[0].detach().float()
        if module.act_mode == "static":
            step = float(module.act_scale)
        else:
            lo, hi = torch.aminmax(x)
            step = float(scale_zero_from_range(lo, hi, module.act_bits, module.act_symmetric)[0])
        allowance.append(FLIPS_PER_LAYER * step * float(module.dense_weight().abs().max()))

    seen: dict[int, dict[int, tuple[float, float, int]]] = {}  # attention quantizer -> role -> (step, max|x|, dim)

    def attention_hook(module, args):
        if module.enabled and module.observers is None:
            x, role = args[0].detach().float(), int(args[1])
            seen.setdefault(id(module), {})[role] = (float(module.scale[role]), float(x.abs().max()), x.shape[-1])

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    handles += [m.register_forward_pre_hook(nbits_hook) for m in model.modules() if id(m) in layouts]
    handles += [m.register_forward_pre_hook(attention_hook) for m in model.modules()
                if isinstance(m, QuantAttentionInputs)]
    try:
        with torch.no_grad():
            out = _call(entry, inputs)
    finally:
        for h in handles:
            h.remove()
    for roles in seen.values():
        if len(roles) == 4:
            (s_q, m_q, dim), (s_k, m_k, _), (s_p, _, _), (s_v, m_v, _) = (roles[i] for i in range(4))
            # A flipped query/key code moves a score by s·max|other|·scaling, hence the context by at
            # most that times max|V|; a flipped probability or value code moves it by s_p·max|V| or s_v.
            allowance.append(FLIPS_PER_LAYER * (dim ** -0.5 * (s_q * m_k + s_k * m_q) * m_v + s_p * m_v + s_v))
    return out, sum(allowance)


def check_onnx(model: nn.Module, path: str | os.PathLike, inputs: Any = None, *, atol: float | None = None) -> float:
    """Max |ORT − PyTorch| of the exported file's output on ``inputs``; raises when above tolerance.

    ``inputs``: a dict of named inputs as the ONNX graph names them, a tensor (or tuple) for
    a plain module, or None for the kind's defaults at batch 3 / sequence 11 (so the dynamic
    axes are exercised). ``atol`` None: the rule in the module docstring (float: 1e-4 of the
    output's scale; quantized inputs: plus two code steps' worth per layer).
    """
    if inputs is None or not isinstance(inputs, Mapping):
        inputs = example_inputs(model, inputs, batch=3, seq=11, seed=1)
    kind = _kind(model)
    entry = _entry(model, kind)
    was_training = model.training
    model.eval()
    try:
        ref, allowance = _input_steps(model, entry, dict(inputs), file_accuracy_level(path))
    finally:
        model.train(was_training)
    session = ort_session(path, threads=2)
    got = run_onnx(session, dict(inputs))[0]
    ref_np = ref.detach().float().cpu().numpy()
    name = session.get_outputs()[0].name
    if got.shape != ref_np.shape:
        raise SlimkitError(f"ONNX output {name!r} has shape {got.shape}, PyTorch gives {ref_np.shape}")
    diff = float(np.abs(got.astype(np.float64) - ref_np.astype(np.float64)).max()) if got.size else 0.0
    if atol is None:
        atol = FLOAT_RTOL * float(np.abs(ref_np).max(initial=0.0)) + FLOAT_ATOL + allowance
    if not np.isfinite(diff) or diff > atol:
        raise SlimkitError(f"ONNX output {name!r} differs from PyTorch by {diff:.3g} (tolerance {atol:.3g}) in {path}")
    return diff


def quantized_tolerance(model: nn.Module, inputs: Any = None, accuracy_level: int = 0) -> float:
    """The default ``check_onnx`` tolerance for ``model`` on ``inputs`` (see the module docstring).

    ``accuracy_level``: that of the file's MatMulNBits nodes (``nbits.file_accuracy_level``).
    """
    if inputs is None or not isinstance(inputs, Mapping):
        inputs = example_inputs(model, inputs, batch=3, seq=11, seed=1)
    ref, allowance = _input_steps(model, _entry(model, _kind(model)), dict(inputs), accuracy_level)
    return FLOAT_RTOL * float(ref.detach().abs().max()) + FLOAT_ATOL + allowance
