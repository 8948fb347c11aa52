"""ONNX export: float models as they are, slimkit's quantized layers as real int8 graphs.

``export_onnx(model, path)`` exports any model ``slimkit.load`` gives (a transformers causal
LM or encoder, a zoo nn.Module, a user's nn.Module with an ``example`` input) through
``torch.onnx.export(..., dynamo=True)`` and returns an ``OnnxExport(path, notes,
max_abs_diff)``. ``check_onnx`` runs the PyTorch model and ONNX Runtime on the same inputs
and returns their largest difference; ``ort_session``/``run_onnx`` run the file.

Inputs and outputs come from the model's task (``slimkit.tasks``; batch and sequence axes dynamic):

| task | inputs | output |
|---|---|---|
| causal-lm (transformers) | the decoder-with-past graph (``slimkit.export.onnx_decoder``): ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids``, ``past_key_values.{i}.key/value`` | ``logits``, ``present.{i}.key/value`` |
| causal-lm, ``past=False`` | ``input_ids``, ``attention_mask`` (int64, all ones when exporting) | ``logits`` |
| encoder | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` (``logits`` for a classification head) |
| image-classifier | ``pixel_values`` (N, C, H, W) | ``logits`` |
| classifier / module | ``input`` (the ``example`` tensor, else the declared input shape or a GenericTask's example) | ``logits`` |

Quantized layers are exported from slimkit's own integer codes and scales (the float
weight is never in the file). Before export, each ``Quant*`` layer of a *deep copy* of the
model is swapped for an export-only twin (``slimkit.export.twins``) whose forward uses
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
``metadata_props["slimkit.notes"]``). The decoder-with-past export writes per-channel 8-bit
weight-only layers as MatMulNBits bits=8 too (why, with timings: ``slimkit.export.onnx_decoder``)
and records that in ``metadata_props["slimkit.export_options"]`` for ``check_onnx``.

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
from torch import nn

from slimkit.core.errors import ConfigError, DataError, SlimkitError, UnsupportedError
from slimkit.core.linear_like import bypassed_forward
from slimkit.tasks import Task, task_of
from slimkit.export.nbits import (
    DEFAULT_ACCURACY_LEVEL,
    check_accuracy_level,
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
    recorded_metadata,
    run_onnx,
)
from slimkit.export.twins import INT16_OPSET, _dynamic_quant_linear_onnx, _swap_quantized, _uses_int16
from slimkit.quantization.attention import IMPLEMENTATION as ATTENTION_IMPLEMENTATION
from slimkit.quantization.attention import QuantAttentionInputs
from slimkit.quantization.kernels import kernel_policy
from slimkit.quantization.modules import QuantConv2d, QuantLinear, TiedQuantLinear
from slimkit.quantization.primitives import scale_zero_from_range

DEFAULT_OPSET = 20  # torch.onnx's default
OPSETS = range(18, 24)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin for the graph itself
FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-6
FLIPS_PER_LAYER = 3.0
EXPORT_OPTIONS_KEY = "slimkit.export_options"  # metadata: choices check_onnx must know (JSON)
NBITS_MARGIN = 1.0  # times the exact per-layer bound of MatMulNBits' int8 input rounding (see check_onnx)
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


def example_inputs(model: nn.Module, example: Any = None, *, batch: int = 2, seq: int = 8,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The named inputs ``export_onnx``/``check_onnx`` feed ``model`` (see the module docstring).

    LMs and encoders get random token ids (seeded) and an all-ones attention mask of shape
    (batch, seq); other models get what their task knows (uniform [0, 1) floats of a declared
    input shape, a GenericTask's example); anything else needs ``example`` (a tensor, or a
    tuple of tensors named input_0, input_1, ...).
    """
    task = task_of(model)
    if example is not None and task.token_inputs:
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
    return task.example_inputs(model, batch=batch, seq=seq, seed=seed)


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


def _entry(model: nn.Module, task: Task) -> nn.Module:
    if task.token_inputs:
        return _TokenEntry(model, causal=task.uses_cache)
    return _TensorEntry(model)


def _output_name(model: nn.Module, task: Task) -> str:
    if task.output_name == "last_hidden_state" and not type(model).__name__.endswith("Model"):
        return "logits"  # an encoder with a head, e.g. BertForSequenceClassification
    return task.output_name


def _call(entry: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(entry, _TokenEntry):
        return entry(**inputs)
    return entry(*inputs.values())


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
                check: bool = False, past: bool | None = None, accuracy_level: int | None = None) -> OnnxExport:
    """Export ``model`` to the ONNX file ``path`` (atomically) and return an ``OnnxExport``.

    ``example``: the input of a model whose kind has no default (a tensor or tuple of
    tensors; its first axis is made dynamic). ``opset``: None picks 20, or 21 when the model
    holds 16-bit weight codes. ``check=True`` also runs ``check_onnx`` on fresh inputs of
    another batch/sequence size and fills ``max_abs_diff`` (raising when out of tolerance).
    The model is exported in eval mode and left in the mode it was in.

    ``past``: whether a transformers causal LM is written as the decoder-with-past graph
    (``slimkit.export.onnx_decoder.export_decoder_onnx``: past key/value inputs, present
    outputs, the file a generation loop such as ``OrtDecoder`` runs). None (default): yes for
    a transformers causal LM; False: the graph without a cache (``input_ids``,
    ``attention_mask`` -> ``logits``), as before. ``run_onnx`` and ``check_onnx`` feed the
    decoder graph an empty cache when given only ``input_ids`` and ``attention_mask``.

    ``accuracy_level``: that of every MatMulNBits node (None: ``nbits.DEFAULT_ACCURACY_LEVEL``,
    4; see ``slimkit.export.nbits``), written into the nodes and their notes.
    """
    if accuracy_level is not None:
        check_accuracy_level(accuracy_level)
    if past is None:
        past = _decoder_eligible(model)
    elif past and not _decoder_eligible(model):
        raise UnsupportedError(f"past=True needs a transformers causal LM with a KV cache; "
                               f"{type(model).__name__} is not one (export it with past=False)")
    if past:
        from slimkit.export.onnx_decoder import export_decoder_onnx

        level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
        return export_decoder_onnx(model, path, accuracy_level=level, opset=opset, check=check, example=example)
    path, opset = _checked_target(model, path, opset)
    task = task_of(model)
    inputs = example_inputs(model, example)
    was_training = model.training
    export_model, notes, table = _export_copy(model, opset, accuracy_level=accuracy_level)
    entry = _entry(export_model, task).eval()
    output = _output_name(model, task)
    token_inputs = isinstance(entry, _TokenEntry)
    program = _run_exporter(model, entry, was_training, args=tuple() if token_inputs else tuple(inputs.values()),
                            kwargs=inputs if token_inputs else None, input_names=list(inputs), output_names=[output],
                            dynamic_shapes=_dynamic_shapes(inputs, token_inputs), opset=opset, table=table)
    files = _save(program, path, notes, _session_config(model, notes))
    result = OnnxExport(path=path, notes=tuple(notes), files=files)
    if check:
        diff = check_onnx(model, path, example_inputs(model, example, batch=3, seq=11, seed=1)
                          if example is None else inputs)
        result = replace(result, max_abs_diff=diff)
    return result


def _decoder_eligible(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (a task that uses a KV cache): the with-past graph applies."""
    from slimkit.core.io import is_transformers_model

    task = task_of(model)
    return bool(task.uses_cache and task.token_inputs and is_transformers_model(model))


def _checked_target(model: nn.Module, path: str | os.PathLike, opset: int | None) -> tuple[Path, int]:
    """Refuse layers with no ONNX form and a folder as ``path``; returns the path and the opset to use."""
    _require_onnx()
    for name, module in model.named_modules():
        reason = getattr(module, "onnx_unsupported", None)  # set by layer types with no exact ONNX form
        if reason:
            raise UnsupportedError(f"cannot export layer {name!r} ({type(module).__name__}) to ONNX: {reason}")
    path = Path(path)
    if path.exists() and path.is_dir():
        raise SlimkitError(f"{path} is a folder: give the .onnx file to write, e.g. {path / 'model.onnx'}")
    return path, _check_opset(opset, model)


def _export_copy(model: nn.Module, opset: int, *, accuracy_level: int | None = None,
                 int8_per_channel: bool = False) -> tuple[nn.Module, list[str], dict | None]:
    """The model to trace (quantized layers swapped for export twins, eager attention), its notes, the
    exporter's translation table for slimkit's custom ops (None when none is used).

    ``accuracy_level``: that of every MatMulNBits node (None: ``nbits.DEFAULT_ACCURACY_LEVEL``).
    ``int8_per_channel``: per-channel 8-bit weight-only layers become MatMulNBits bits=8 too
    (instead of DequantizeLinear -> MatMul).
    """
    export_model, notes, custom = _swap_quantized(model, opset)
    if export_model is not model and (accuracy_level is not None or int8_per_channel):
        custom = _nbits_overrides(model, export_model, notes, accuracy_level, int8_per_channel) or custom
    if hasattr(export_model, "set_attn_implementation") and not _quantized_attention(model):
        # Eager attention exports as plain MatMul/Add/Softmax; the SDPA path adds Where/IsNaN
        # masking ops that cost ~9% of MiniLM's ORT time. Same maths, on a copy.
        if export_model is model:
            export_model = copy.deepcopy(model)
        try:
            export_model.set_attn_implementation("eager")
        except Exception:  # a model without an eager path keeps its own
            pass
    table = {torch.ops.slimkit.dynamic_quant_linear.default: _dynamic_quant_linear_onnx,
             torch.ops.slimkit.matmul_nbits.default: matmul_nbits_onnx} if custom else None
    return export_model, notes, table


def _nbits_overrides(model: nn.Module, export_model: nn.Module, notes: list[str], accuracy_level: int | None,
                     int8_per_channel: bool) -> bool:
    """Set the MatMulNBits twins' accuracy level and (``int8_per_channel``) swap per-channel 8-bit
    weight-only twins for MatMulNBits ones, rewriting their notes; returns whether a MatMulNBits twin exists."""
    from slimkit.core.targets import set_submodule
    from slimkit.export.nbits import NBitsLinear
    from slimkit.export.twins import _ExportLinear

    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else check_accuracy_level(accuracy_level)
    index = {note.split(": ", 1)[0]: i for i, note in enumerate(notes)}
    any_nbits = False
    for name, module in model.named_modules():
        src = module.as_quant_linear() if isinstance(module, TiedQuantLinear) else module
        if not isinstance(src, QuantLinear) or name not in index:
            continue
        twin = export_model.get_submodule(name)
        if (int8_per_channel and isinstance(twin, _ExportLinear) and bypassed_forward(model, name) is None
                and nbits_unsupported(src, int8_per_channel=True) is None):
            twin = NBitsLinear(src, level, int8_per_channel=True)
            set_submodule(export_model, name, twin)
        if isinstance(twin, NBitsLinear):
            twin.accuracy_level = level
            label = notes[index[name]].split(": ", 2)[1]
            notes[index[name]] = f"{name}: {label}: {twin.describe()}"
            any_nbits = True
    return any_nbits


def _run_exporter(model: nn.Module, entry: nn.Module, was_training: bool, *, args: tuple, kwargs: dict | None,
                  input_names: list[str], output_names: list[str], dynamic_shapes: Any, opset: int,
                  table: dict | None) -> Any:
    """``torch.onnx.export(dynamo=True)`` of ``entry``, quietly; exporter failures become UnsupportedError."""
    try:
        with _quiet(), torch.no_grad():
            return torch.onnx.export(
                entry, args, kwargs=kwargs, dynamo=True, verbose=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, custom_translation_table=table,
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


def _session_config(model: nn.Module, notes: list[str]) -> dict[str, str]:
    """The ORT session options the file must record (and the note saying why)."""
    if not _needs_exact_kernel(model):
        return {}
    notes.append("on x86 CPUs without VNNI/AMX run with onnxruntime session option session.x64quantprecision=1 "
                 "(slimkit.export.onnx.ort_session sets it there): int8 weights beyond ±63 saturate their "
                 "uint8×int8 kernel; quantize with reduce_range=True to get exact results in any session")
    return ORT_SESSION_CONFIG


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


def _save(program: Any, path: Path, notes: list[str], session_config: dict[str, str],
          metadata: Mapping[str, Any] | None = None) -> tuple[Path, ...]:
    """Write ``program`` to ``path`` through a temporary folder beside it; returns the files written.

    ``metadata``: more ``metadata_props`` entries (each value stored as JSON).
    """
    model = program.model
    _unshare_weight_qparams(model.graph)
    for node in model.graph.all_nodes():
        # The exporter's per-node stack traces and scopes: ~0.9 MB of MiniLM's 24 MB int8 file, unused by runtimes.
        node.metadata_props.clear()
    model.metadata_props["slimkit.notes"] = json.dumps(notes)
    model.metadata_props["slimkit.ort_session_config"] = json.dumps(session_config)
    for key, value in (metadata or {}).items():
        model.metadata_props[key] = json.dumps(value)
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
                 nbits_level: int = 0, int8_per_channel: bool = False) -> tuple[torch.Tensor, float]:
    """The PyTorch output, and the flip allowance Σ FLIPS_PER_LAYER · s_x · max|W| over input-quantizing layers.

    ``nbits_level`` ≥ 2 (MatMulNBits nodes computing in int8/fp16/bf16): plus
    ``NBITS_MARGIN`` times ``int8_input_error_bound`` of every layer exported as MatMulNBits
    (``int8_per_channel``: per-channel 8-bit weight-only layers were, as the decoder export writes them).
    """
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and m.act_mode is not None]
    allowance: list[float] = []
    layouts = {}
    if nbits_level >= 2:
        from slimkit.export.nbits import nbits_layout

        # A tied head is exported as its own QuantLinear; a layer its parent never calls (nn.MultiheadAttention's
        # out_proj) is exported through dequantize ops, not MatMulNBits, so it adds no int8-input rounding.
        for name, m in model.named_modules():
            layer = m.as_quant_linear() if isinstance(m, TiedQuantLinear) else m
            if (isinstance(layer, QuantLinear) and nbits_unsupported(layer, int8_per_channel=int8_per_channel) is None
                    and bypassed_forward(model, name) is None):
                layouts[id(m)] = nbits_layout(layer, int8_per_channel=int8_per_channel)

    def nbits_hook(module, args):
        x = args[0].detach().float()
        if getattr(module, "input_multiplier", None) is not None:
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
        # The file holds the exact dequantized arithmetic: compare with QuantLinear's reference path,
        # not an integer kernel it may pick on this machine (bf16 activations among them).
        with torch.no_grad(), kernel_policy("reference"):
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

    A decoder-with-past file (``slimkit.export.onnx_decoder``) is run twice: a prefill of
    the whole sequence from an empty cache, and a prefill of all but the last two tokens
    followed by a step over those two with the returned cache; the larger difference counts.
    """
    if inputs is None or not isinstance(inputs, Mapping):
        inputs = example_inputs(model, inputs, batch=3, seq=11, seed=1)
    options = recorded_metadata(path, EXPORT_OPTIONS_KEY) or {}
    entry = _entry(model, task_of(model))
    was_training = model.training
    model.eval()
    try:
        ref, allowance = _input_steps(model, entry, dict(inputs), file_accuracy_level(path),
                                      bool(options.get("int8_per_channel_nbits")))
    finally:
        model.train(was_training)
    session = ort_session(path, threads=2)
    got = run_onnx(session, dict(inputs))[0]
    ref_np = ref.detach().float().cpu().numpy()
    name = session.get_outputs()[0].name
    if got.shape != ref_np.shape:
        raise SlimkitError(f"ONNX output {name!r} has shape {got.shape}, PyTorch gives {ref_np.shape}")
    diff = float(np.abs(got.astype(np.float64) - ref_np.astype(np.float64)).max()) if got.size else 0.0
    split = _split_with_past(session, dict(inputs))
    if split is not None:
        diff = max(diff, float(np.abs(split.astype(np.float64) - ref_np.astype(np.float64)).max()))
    if atol is None:
        atol = FLOAT_RTOL * float(np.abs(ref_np).max(initial=0.0)) + FLOAT_ATOL + allowance
    if not np.isfinite(diff) or diff > atol:
        raise SlimkitError(f"ONNX output {name!r} differs from PyTorch by {diff:.3g} (tolerance {atol:.3g}) in {path}")
    return diff


def _split_with_past(session: Any, inputs: dict[str, Any]) -> np.ndarray | None:
    """A decoder-with-past session's logits for ``input_ids`` fed as a prefill of all but the last two
    tokens, then one step over the last two with the returned cache (None for other graphs or short inputs)."""
    names = [o.name for o in session.get_outputs()]
    presents = [n for n in names if n.startswith("present.")]
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if not presents or ids is None or mask is None or ids.shape[-1] < 3 or len(inputs) != 2:
        return None
    cut = ids.shape[-1] - 2
    first = run_onnx(session, {"input_ids": ids[:, :cut], "attention_mask": mask[:, :cut]})
    past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names, first) if n in presents}
    second = run_onnx(session, {"input_ids": ids[:, cut:], "attention_mask": mask, **past})
    return np.concatenate([first[0], second[0]], axis=1)


def quantized_tolerance(model: nn.Module, inputs: Any = None, accuracy_level: int = 0, *,
                        int8_per_channel: bool = False) -> float:
    """The default ``check_onnx`` tolerance for ``model`` on ``inputs`` (see the module docstring).

    ``accuracy_level``: that of the file's MatMulNBits nodes (``nbits.file_accuracy_level``).
    ``int8_per_channel``: per-channel 8-bit weight-only layers are MatMulNBits nodes too (decoder exports).
    """
    if inputs is None or not isinstance(inputs, Mapping):
        inputs = example_inputs(model, inputs, batch=3, seq=11, seed=1)
    ref, allowance = _input_steps(model, _entry(model, task_of(model)), dict(inputs), accuracy_level, int8_per_channel)
    return FLOAT_RTOL * float(ref.detach().abs().max()) + FLOAT_ATOL + allowance
