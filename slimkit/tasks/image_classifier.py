"""Image classifiers from Hugging Face (``...ForImageClassification``: ViT, ConvNeXt, ResNet, ...).

The whole kind in one file: a classifier whose inputs are ``pixel_values`` (N, C, H, W),
sized by its config (``num_channels``, ``image_size``), fed from a folder of images with
one sub-folder per class, and measured by top-1 and top-5 accuracy.

Images are fed as the model was trained on them: read in [0, 1] (the image processor's
``rescale``), resized to the configured size, then normalized with the ``image_mean`` /
``image_std`` of the ``preprocessor_config.json`` beside the model (recorded with the model on
first use, so its checkpoints keep them). Class sub-folders named like the model's labels
(``config.label2id``, e.g. "tabby cat") take those label ids; otherwise (random-init models,
generic "LABEL_0" names) the sorted folder order gives the ids.

    model = sk.load("my-vit-folder")                  # ViTForImageClassification
    sk.quantize_(model, sk.DynamicQuant(), data=sk.task_of(model).calibration(model, "photos/"))
    sk.evaluate(model, baseline="my-vit-folder", data="photos-heldout/")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import run_model
from slimkit.core.errors import DataError
from slimkit.core.io import attach_info, is_transformers_model, model_info
from slimkit.tasks.base import EvalData, Progress, Records, first_tensor, register_task
from slimkit.tasks.classifier import ClassifierTask
from slimkit.tasks.sources import TensorRecords

PREPROCESSOR_FILE = "preprocessor_config.json"


def _size(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


@register_task
class ImageClassifierTask(ClassifierTask):
    """A transformers image classifier called as ``model(pixel_values=...)``."""

    kind = "image-classifier"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """transformers classes named ``...ForImageClassification``."""
        return is_transformers_model(model) and type(model).__name__.endswith("ForImageClassification")

    def input_shape(self, model: nn.Module) -> tuple[int, ...] | None:
        """(channels, height, width) from the model's config, else what was declared for it."""
        config = getattr(model, "config", None)
        size = getattr(config, "image_size", None)
        if size is not None:
            return (int(getattr(config, "num_channels", 3)), *_size(size))
        return super().input_shape(model)

    def wrap(self, inputs: torch.Tensor) -> Any:
        """Images go in as ``pixel_values``."""
        return {"pixel_values": inputs}

    def normalization(self, model: nn.Module) -> tuple[list[float], list[float]] | None:
        """(image_mean, image_std) the model expects, or None: recorded with the model, else read from the
        ``preprocessor_config.json`` of the folder it was loaded from (and then recorded)."""
        defaults = model_info(model).get("defaults", {})
        if "image_mean" in defaults:
            mean, std = defaults["image_mean"], defaults["image_std"]
            return (mean, std) if mean is not None else None
        source = model_info(model).get("source")
        file = Path(source) / PREPROCESSOR_FILE if isinstance(source, str) else None
        if file is None or not file.is_file():
            return None
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{file} is not valid JSON ({exc})") from None
        mean, std = config.get("image_mean"), config.get("image_std")
        if not config.get("do_normalize", True) or mean is None or std is None:
            mean = std = None
        else:
            channels = (self.input_shape(model) or (3,))[0]
            mean, std = _per_channel(mean, channels), _per_channel(std, channels)
        attach_info(model, defaults={"image_mean": mean, "image_std": std})  # saved with later checkpoints
        return (mean, std) if mean is not None else None

    def records(self, model: nn.Module, spec: Any, split: str, n: int | None = None) -> tuple[Records, str]:
        """Images normalized as the model's image processor does, labelled by the model's class names."""
        found, description = super().records(model, spec, split, n)
        if not isinstance(found, TensorRecords):
            return found, description
        inputs, labels = found.inputs, _label_ids(model, found)
        norm = self.normalization(model)
        if norm is not None and inputs.dim() == 4:
            mean, std = (torch.tensor(v, dtype=inputs.dtype).view(1, -1, 1, 1) for v in norm)
            inputs = (inputs - mean) / std
            description += f", normalized by mean {_short(norm[0])} / std {_short(norm[1])}"
        return dataclasses.replace(found, inputs=inputs, labels=labels), description

    def example_inputs(self, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """Uniform [0, 1) images of the configured size (seeded)."""
        shape = self.input_shape(model)
        if shape is None:
            raise DataError(f"{type(model).__name__} declares no image size (config.image_size); pass example=")
        return {"pixel_values": torch.rand((batch, *shape), generator=torch.Generator().manual_seed(seed))}

    def latency_inputs(self, model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
        """Up to 32 evaluation images (images are large: a batch of 256 would time memory, not compute)."""
        x = data.inputs[:32] if data.inputs is not None else self.example_inputs(model, batch=32)["pixel_values"]
        return self.wrap(x), len(x), None

    @torch.no_grad()
    def accuracy(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy, the model called with ``pixel_values``."""
        return self._topk(model, inputs, labels, 1)

    def _topk(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
        was_training = model.training
        model.eval()
        hits = 0
        try:
            with torch.no_grad():
                for i in range(0, len(inputs), 64):
                    logits = first_tensor(run_model(model, self.wrap(inputs[i:i + 64])), "the model output")
                    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices.cpu()
                    hits += int((top == labels[i:i + 64].view(-1, 1)).any(-1).sum())
        finally:
            model.train(was_training)
        return hits / len(inputs)

    def measure_quality(self, model: nn.Module, data: EvalData, reference: Any = None,
                        progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Top-1 and top-5 accuracy on the evaluation images."""
        if data.inputs is None or data.labels is None:
            return {}, {}
        return ({"accuracy": self._topk(model, data.inputs, data.labels, 1),
                 "top5_accuracy": self._topk(model, data.inputs, data.labels, 5)}, {})


def _per_channel(value: Any, channels: int) -> list[float]:
    """A processor's mean/std (one number, or one per channel) as one number per channel."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise DataError(f"the image processor's mean/std {value!r} does not have one value per channel ({channels})")
    return values


def _short(values: list[float]) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def _label_ids(model: nn.Module, found: TensorRecords) -> torch.Tensor | None:
    """Labels of an image folder in the model's label ids when its class folders carry the model's label names.

    Sorted folder order is kept when no folder name is one of the model's labels (a random-init
    model's "LABEL_0"...); a partial match is refused, since it would score against wrong ids.
    """
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if found.classes is None or found.labels is None or not label2id:
        return found.labels
    ids = {str(name).lower(): int(i) for name, i in label2id.items()}
    matched = [c for c in found.classes if c.lower() in ids]
    if not matched:
        return found.labels
    missing = [c for c in found.classes if c.lower() not in ids]
    if missing:
        raise DataError(f"class folder(s) {', '.join(map(repr, missing))} are not labels of this model, while "
                        f"{', '.join(map(repr, matched))} are: name every folder after one of its labels "
                        f"(config.id2label), or none of them to use the sorted folder order")
    remap = torch.tensor([ids[c.lower()] for c in found.classes], dtype=torch.long)
    return remap[found.labels]
