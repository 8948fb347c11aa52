"""Short measurements ``slimkit advise`` bases its expectations on: one Linear layer per shape, per path.

A probe builds a one-layer model of each dominant Linear shape of the user's model, applies
the technique with slimkit's own step (so the layer is exactly what a recipe would produce),
and times it where it would run:

- ``torch``: the layer's forward, which takes the integer kernel ``quantization/kernels``
  measured to win for that layout on this ISA (or the dequantize reference);
- ``onnxruntime``: the layer exported with slimkit's ONNX exporter and run in an ORT session
  (its int8 / MatMulNBits kernels).

Rows are what the model feeds its Linears: 1 for a model that generates (one decode step),
batch × sequence of the task's latency inputs otherwise. Structured pruning and low-rank
factorization need no step: their probe times the float layer at the smaller shapes.

``expected_ms`` turns the per-shape times into a whole-model figure: the model's measured
fp32 time with each Linear's fp32 time replaced by the probed path's (the rest of the model,
attention scores, norms, the embedding lookup, assumed unchanged).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.measure import fastest_ms
from slimkit.recipe.steps import apply_step
from slimkit.tasks import GenericTask, set_task

#: the fraction of rows and columns structured pruning at 30% keeps
STRUCTURED_KEEP = 0.7


@dataclass(frozen=True)
class ProbePath:
    """One way to run a Linear: a runtime, a label, and how to build it (a slimkit step, or a shape change)."""

    runtime: str  # "torch" or "onnxruntime"
    label: str
    step: Config | None = None  # applied to the one-layer model; None = float
    shape_change: str | None = None  # torch float only: "structured" (30% of rows or columns gone), "lowrank"


@dataclass
class ShapeTimes:
    """Milliseconds of one Linear shape on every probed path (None: the path failed; reason kept)."""

    shape: tuple[int, int]
    layers: int
    rows: int
    ms: dict[str, float | None] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def _one_layer(shape: tuple[int, int], rows: int, step: Config | None, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A one-Linear model of ``shape`` (random weights), ``step`` applied, and a (rows, in) input."""
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f))
        layer.bias.zero_()
    model = nn.Sequential(layer).eval()
    x = torch.randn(rows, in_f, generator=gen)
    calib = CalibrationData.from_tensors(torch.randn(max(8, min(rows, 64)), in_f, generator=gen), batch_size=8)
    set_task(model, GenericTask(example_inputs=x[:2], calibration=calib))
    if step is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few calibration rows: a probe times the layout, not its accuracy
            apply_step(model, step, data=calib)
    return model, x


def _float_ms(shape: tuple[int, int], rows: int, change: str | None) -> float:
    """fp32 time of a Linear module at ``shape``, or of what structured pruning / low-rank leaves of it.

    Modules, not bare ``F.linear``: the model calls each layer as a module, and at one row
    (decoding) the call's overhead is a real part of a small layer's time, on every path alike.
    """
    out_f, in_f = shape
    torch.manual_seed(0)
    x = torch.randn(rows, in_f)
    with torch.no_grad():
        if change == "structured":  # half the layers lose output rows (q/k/v, MLP up), half input columns
            fewer_rows = nn.Linear(in_f, max(1, round(out_f * STRUCTURED_KEEP)))
            fewer_cols = nn.Linear(max(1, round(in_f * STRUCTURED_KEEP)), out_f)
            x_small = torch.randn(rows, fewer_cols.in_features)
            return (fastest_ms(lambda: fewer_rows(x)) + fastest_ms(lambda: fewer_cols(x_small))) / 2
        if change == "lowrank":  # the rank that halves the weights: r·(in + out) = in·out / 2
            r = max(1, (out_f * in_f) // (2 * (out_f + in_f)))
            pair = nn.Sequential(nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f))
            return fastest_ms(lambda: pair(x))
        layer = nn.Linear(in_f, out_f)
        return fastest_ms(lambda: layer(x))


def _torch_ms(path: ProbePath, shape: tuple[int, int], rows: int) -> float:
    model, x = _one_layer(shape, rows, path.step)
    layer = model[0]  # the layer itself, as the float probe times its nn.Linear
    with torch.no_grad():
        return fastest_ms(lambda: layer(x))


def _ort_ms(path: ProbePath, shape: tuple[int, int], rows: int) -> float:
    import numpy as np

    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    model, x = _one_layer(shape, rows, path.step)
    with tempfile.TemporaryDirectory(prefix="slimkit-probe-") as tmp:
        file = Path(tmp) / "layer.onnx"
        export_onnx(model, file, example=x[:2])
        session = ort_session(file, threads=torch.get_num_threads())
        name = session.get_inputs()[0].name
        feed = {name: x.numpy().astype(np.float32)}
        return fastest_ms(lambda: session.run(None, feed))


def time_path(path: ProbePath, shape: tuple[int, int], rows: int) -> float:
    """Milliseconds of one Linear of ``shape`` on ``path`` at ``rows`` input rows (its fastest of a few runs)."""
    if path.runtime == "torch":
        return _float_ms(shape, rows, path.shape_change) if path.step is None else _torch_ms(path, shape, rows)
    return _ort_ms(path, shape, rows)  # ORT's float path too: the layer exported and run in a session


def probe_shapes(shapes: list[tuple[tuple[int, int], int]], rows: int, paths: list[ProbePath],
                 runtimes: set[str]) -> list[ShapeTimes]:
    """Time every path of an installed runtime on every (shape, layer count); a failing path is recorded."""
    out = []
    for shape, layers in shapes:
        times = ShapeTimes(shape, layers, rows)
        for path in paths:
            if path.runtime not in runtimes:
                continue
            try:
                times.ms[path.label] = time_path(path, shape, rows)
            except Exception as exc:  # noqa: BLE001 - a path that cannot run is a fact to report, not a crash
                times.ms[path.label] = None
                times.failures[path.label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        out.append(times)
    return out


def expected_ms(base_ms: float, probes: list[ShapeTimes], fp32_label: str, label: str,
                shrink: tuple[str, str] | None = None) -> float | None:
    """The whole model's expected time on path ``label``: ``base_ms`` with each Linear's ``fp32_label`` time
    replaced by its ``label`` time.

    ``shrink=(float_label, smaller_label)``: the layers also get smaller (structured pruning,
    low-rank); the ``label`` time is scaled by the ratio of those two (torch float) times, an
    estimate for a runtime where the smaller shape was not timed. None when a time is missing.
    """
    total = base_ms
    for p in probes:
        fp32, new = p.ms.get(fp32_label), p.ms.get(label)
        if shrink is not None and new is not None:
            a, b = (p.ms.get(k) for k in shrink)
            new = None if not a or b is None else new * b / a
        if fp32 is None or new is None:
            return None
        total += p.layers * (new - fp32)
    return max(total, 0.0)
