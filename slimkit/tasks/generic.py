"""The generic task: a user's own model, fed and measured by the user's callbacks.

    task = sk.GenericTask(example_inputs=torch.randn(2, 3, 32, 32),
                          calibration=sk.CalibrationData.from_tensors(x, batch_size=32),
                          eval_data=(x_test, y_test), metric=lambda model, data: {"accuracy": my_acc(model, data)})
    sk.set_task(model, task)      # every verb, evaluate and export_onnx now ask it
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError, DataError
from slimkit.tasks.base import EvalData, Progress, Task, register_task


def _named(example: Any) -> dict[str, torch.Tensor]:
    if isinstance(example, torch.Tensor):
        return {"input": example}
    if isinstance(example, dict) and all(isinstance(v, torch.Tensor) for v in example.values()):
        return dict(example)
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return {f"input_{i}": t for i, t in enumerate(example)}
    raise ConfigError(f"GenericTask.example_inputs must be a tensor, a tuple or a dict of tensors, "
                      f"got {type(example).__name__}")


@register_task
class GenericTask(Task):
    """A task driven by callbacks: for any nn.Module slimkit has no built-in knowledge of.

    ``example_inputs``: a tensor / tuple / dict of tensors (batch first), the input for
    export, tracing, latency and the check after every step. ``calibration``: a
    ``CalibrationData`` (or anything ``CalibrationData.from_loader`` takes). ``eval_data``:
    anything ``metric`` understands. ``metric(model, eval_data) -> {name: value}``: the
    quality figures. ``loss(model, batch) -> scalar tensor``: for Taylor importance.
    ``training_data``: a callable ``step -> batch`` for distillation.
    """

    kind = "module"

    def __init__(self, example_inputs: Any = None, calibration: Any = None, eval_data: Any = None,
                 metric: Callable[[nn.Module, Any], dict] | None = None,
                 loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 training_data: Callable[[int], Any] | None = None) -> None:
        self._example = _named(example_inputs) if example_inputs is not None else None
        if calibration is not None and not isinstance(calibration, CalibrationData):
            calibration = CalibrationData.from_loader(calibration)
        self._calibration = calibration
        self._eval_data = eval_data
        if metric is not None and not callable(metric):
            raise ConfigError("GenericTask.metric must be a callable (model, eval_data) -> dict of figures")
        self._metric = metric
        self._loss = loss
        self._training = training_data

    @property
    def default_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        """Latency and FLOPs when example inputs are known; quality when a metric is."""
        metrics = ("size", "params", "sparsity")
        if self._example is not None:
            metrics += ("flops", "latency")
        return metrics + (("accuracy",) if self._metric is not None else ())

    def calibration(self, model: nn.Module, spec: Any = None) -> CalibrationData:
        """The user's calibration data."""
        if self._calibration is None:
            return super().calibration(model, spec)
        return self._calibration

    def eval_data(self, model: nn.Module, data: Any = None, max_tokens: int | None = None,
                  split: str = "eval") -> EvalData:
        """The user's evaluation data (``data`` when given), passed to ``metric`` untouched."""
        if isinstance(data, EvalData):
            return data
        payload = data if data is not None else self._eval_data
        return EvalData(self.kind, "the user's evaluation data" if payload is not None else "no evaluation data",
                        inputs=payload)

    def training_batches(self, model: nn.Module, spec: Any, batch_size: int, seq_len: int, steps: int,
                         seed: int) -> Callable[[int], Any]:
        """The user's ``training_data`` callable."""
        if self._training is None:
            return super().training_batches(model, spec, batch_size, seq_len, steps, seed)
        return self._training

    def example_inputs(self, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """The user's example inputs (their own batch size)."""
        if self._example is None:
            return super().example_inputs(model, batch, seq, seed)
        return dict(self._example)

    def latency_inputs(self, model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
        """The example inputs."""
        inputs = self.example_inputs(model)
        first = next(iter(inputs.values()))
        return (inputs["input"] if list(inputs) == ["input"] else inputs), int(first.shape[0]), None

    def measure_quality(self, model: nn.Module, data: EvalData, reference: Any = None,
                        progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """``metric(model, eval_data)``, checked to be a dict of numbers."""
        if self._metric is None or data.inputs is None:
            return {}, {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                figures = self._metric(model, data.inputs)
        finally:
            model.train(was_training)
        if not isinstance(figures, dict) or not all(isinstance(v, (int, float)) for v in figures.values()):
            raise DataError(f"GenericTask.metric must return a dict of numbers, got {figures!r}")
        return {str(k): float(v) for k, v in figures.items()}, {}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The user's loss, else cross-entropy on the model's own predictions."""
        return self._loss(model, batch) if self._loss is not None else super().loss(model, batch)
