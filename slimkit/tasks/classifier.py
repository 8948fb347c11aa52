"""Classifiers of tensors (a CNN on images, a model on feature vectors): measured by top-1 accuracy.

- calibration: ``n`` inputs (default 128) drawn (seeded) from the source, 64 a batch;
- evaluation: accuracy on held-out inputs and labels (default: the corpus's eval split);
- training: (inputs, labels) batches in a seeded order per epoch, with the corpus's augmentation;
  periodic accuracy on the calibration split;
- comparison: logits, divergence = mean KL; Taylor's loss = cross-entropy; default KD loss: kd.

A user's data is a ``.npz`` / ``.safetensors`` file, an image folder (labels from the
sub-folder names, resized to the model's input size) or tensors through the API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import DataError
from slimkit.core.io import model_info
from slimkit.tasks.base import EvalData, Progress, Task, corpus, epoch_rows, register_task
from slimkit.tasks.metrics import accuracy
from slimkit.tasks.sources import DataSpec, TensorRecords, is_builtin_name

CLASSIFIER_LATENCY_BATCH = 256


def _tensors(records: Any, what: str, labelled: bool = True) -> TensorRecords:
    if not isinstance(records, TensorRecords):
        raise DataError(f"{what} for a classifier must be tensors (an .npz/.safetensors file, an image folder or "
                        f"tensors); the source gave text ({records.description})")
    if labelled and records.labels is None:
        raise DataError(f"{what} ({records.description}) has no labels: name them with label_field, or use an "
                        "image folder with one sub-folder per class")
    if len(records.inputs) == 0:
        raise DataError(f"{what} ({records.description}) holds no samples")
    return records


@register_task
class ClassifierTask(Task):
    """A model mapping a tensor (batch first) to class logits."""

    kind = "classifier"
    default_metrics = ("size", "params", "sparsity", "flops", "latency", "accuracy")

    def input_shape(self, model: nn.Module) -> tuple[int, ...] | None:
        """The per-sample input shape declared for ``model`` (zoo models, saved checkpoints), else None."""
        shape = model_info(model).get("defaults", {}).get("input_shape")
        return tuple(int(s) for s in shape) if shape else None

    def read_options(self, model: nn.Module) -> dict[str, Any]:
        """Images are read at the model's input size and channel count when it declares them."""
        shape = self.input_shape(model)
        if shape is None or len(shape) != 3:
            return {}
        return {"image_size": (shape[1], shape[2]), "channels": shape[0]}

    def wrap(self, inputs: torch.Tensor) -> Any:
        """A batch of inputs as the model takes it (positional for a plain module)."""
        return inputs

    def calibration(self, model: nn.Module, spec: Any = None) -> CalibrationData:
        """``n`` (default 128) inputs drawn with the spec's seed, 64 a batch (labels are not needed)."""
        spec = DataSpec.parse(spec) if spec is not None else None
        n = (spec.n if spec is not None else None) or 128
        seed = spec.seed if spec is not None else 0
        records, description = self.records(model, spec, "calibration")
        x = _tensors(records, "calibration data", labelled=False).inputs
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        batches = [self.wrap(b) for b in torch.split(x[idx], 64)]
        return CalibrationData(batches, description=f"{len(idx)} samples of {description} (seed {seed})")

    def eval_data(self, model: nn.Module, data: Any = None, max_tokens: int | None = None,
                  split: str = "eval") -> EvalData:
        """Held-out inputs and labels (default: the eval split of the model's corpus)."""
        if isinstance(data, EvalData):
            return data
        records, description = self.records(model, data, split)
        found = _tensors(records, "evaluation data")
        return EvalData(self.kind, f"{description}, {len(found.labels)} samples", inputs=found.inputs,
                        labels=found.labels)

    def training_batches(self, model: nn.Module, spec: Any, batch_size: int, seq_len: int, steps: int,
                         seed: int) -> Callable[[int], Any]:
        """(inputs, labels) in a seeded order per epoch; a built-in corpus's augmentation applied per step."""
        records, description = self.records(model, spec, "train")
        found = _tensors(records, "training data")
        x, y = found.inputs, found.labels
        name = (DataSpec.parse(spec).source if spec is not None else self.corpus_name(model))
        augment = corpus(name).augment if isinstance(name, str) and is_builtin_name(name) else None
        perms: dict[int, torch.Tensor] = {}

        def batch(step: int) -> tuple[Any, torch.Tensor]:
            rows = epoch_rows(len(x), batch_size, step, seed, perms)
            inputs = x[rows]
            if augment is not None:
                inputs = augment(inputs, torch.Generator().manual_seed(seed * 7919 + step))
            return self.wrap(inputs), y[rows]

        return batch

    def calibration_metric(self, student: nn.Module, teacher: nn.Module, spec: Any,
                           seq_len: int) -> Callable[[nn.Module], dict]:
        """Accuracy on the calibration split (never the eval split)."""
        try:
            records, _ = self.records(student, None if spec is None or not is_builtin_name(DataSpec.parse(spec).source)
                                      else spec, "calibration")
            found = _tensors(records, "calibration data")
        except DataError:
            return lambda module: {}
        return lambda module: {"calib_accuracy": self.accuracy(student, found.inputs, found.labels)}

    def accuracy(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy of ``model`` on ``(inputs, labels)``."""
        return accuracy(model, inputs, labels)

    def latency_inputs(self, model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
        """The first 256 evaluation inputs."""
        if data.inputs is None:
            return super().latency_inputs(model, data)
        x = data.inputs[:CLASSIFIER_LATENCY_BATCH]
        return self.wrap(x), len(x), None

    def measure_quality(self, model: nn.Module, data: EvalData, reference: Any = None,
                        progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Top-1 accuracy on the evaluation data."""
        if data.inputs is None or data.labels is None:
            return {}, {}
        return {"accuracy": self.accuracy(model, data.inputs, data.labels)}, {}
