"""slimkit: make neural networks smaller and faster, and show what was gained.

Public verbs and configs only. Importing slimkit stays lean: torch-free helpers load
on first use, and transformers / onnx are imported only by the code that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from slimkit.core import plugins as _plugins
from slimkit.core.version import __version__


def _install_builtins() -> None:
    """Register the built-in providers core looks up: the zoo's models, corpora and task defaults,
    and pruning's checkpoint hooks (masks baked in on save, pruned shapes rebuilt on load)."""
    import slimkit.pruning.checkpoint_hooks  # noqa: F401  (registers on import)
    import slimkit.zoo  # noqa: F401  (registers on import)


_plugins.on_first_use(_install_builtins)

# public name -> module that defines it (loaded on first attribute access)
_EXPORTS = {
    "quantize_": "slimkit.api",
    "prune_": "slimkit.api",
    "factorize_": "slimkit.api",
    "SVD": "slimkit.factorization.svd",
    "FactorizedLinear": "slimkit.factorization.svd",
    "Tucker": "slimkit.factorization.conv",
    "CP": "slimkit.factorization.conv",
    "distill_": "slimkit.api",
    "Distill": "slimkit.distillation.distill",
    "Distiller": "slimkit.distillation.distiller",
    "MutualDistiller": "slimkit.distillation.distiller",
    "SelfDistiller": "slimkit.distillation.distiller",
    "KDLoss": "slimkit.distillation.losses",
    "TokenKDLoss": "slimkit.distillation.losses",
    "HintLoss": "slimkit.distillation.losses",
    "AttentionTransferLoss": "slimkit.distillation.losses",
    "RKDLoss": "slimkit.distillation.losses",
    "SimilarityLoss": "slimkit.distillation.losses",
    "CosineEmbeddingLoss": "slimkit.distillation.losses",
    "make_student": "slimkit.distillation.students",
    "drop_layers": "slimkit.distillation.students",
    "Trainer": "slimkit.distillation.trainer",
    "TrainSettings": "slimkit.distillation.trainer",
    "apply": "slimkit.api",
    "apply_recipe": "slimkit.api",
    "compress_checkpoint": "slimkit.api",
    "evaluate": "slimkit.api",
    "generate": "slimkit.api",
    "Sampling": "slimkit.tasks.generation",
    "GenerationResult": "slimkit.tasks.generation",
    "set_kernel_policy": "slimkit.quantization.kernels",
    "prepare_kernels": "slimkit.quantization.kernels",
    "load": "slimkit.core.io",
    "save": "slimkit.core.io",
    "tokenizer_of": "slimkit.core.io",
    "CalibrationData": "slimkit.core.calibration",
    "capture_inputs": "slimkit.core.calibration",
    "iterate_blocks": "slimkit.core.calibration",
    "Config": "slimkit.core.config",
    "SlimkitError": "slimkit.core.errors",
    "RTN": "slimkit.quantization.weight_only",
    "GPTQ": "slimkit.quantization.gptq",
    "AWQ": "slimkit.quantization.awq",
    "Magnitude": "slimkit.pruning.magnitude",
    "Gradual": "slimkit.pruning.schedules",
    "Iterative": "slimkit.pruning.schedules",
    "GradualPruner": "slimkit.pruning.schedules",
    "strip": "slimkit.core.masks",
    "sparsity_report": "slimkit.core.masks",
    "attach_masks_from_zeros": "slimkit.core.masks",
    "Wanda": "slimkit.pruning.wanda",
    "SparseGPT": "slimkit.pruning.sparsegpt",
    "DynamicQuant": "slimkit.quantization.ptq",
    "StaticQuant": "slimkit.quantization.ptq",
    "SmoothQuant": "slimkit.quantization.smoothquant",
    "LLMInt8": "slimkit.quantization.llm_int8",
    "CastPrecision": "slimkit.quantization.mixed",
    "QAT": "slimkit.quantization.qat",
    "QATTrain": "slimkit.quantization.qat",
    "fold_batchnorm": "slimkit.quantization.fold",
    "StructuredPrune": "slimkit.pruning.structured",
    "DependencyGraph": "slimkit.pruning.graph",
    "Group": "slimkit.pruning.group",
    "Recipe": "slimkit.recipe.schema",
    "CompressionReport": "slimkit.evaluation.report",
    "export_onnx": "slimkit.export.onnx",
    "Context": "slimkit.core.registry",
    "NothingCompressedError": "slimkit.core.errors",
    "BrokenModelError": "slimkit.core.errors",
    "task_of": "slimkit.tasks",
    "set_task": "slimkit.tasks",
    "GenericTask": "slimkit.tasks",
    "DataSpec": "slimkit.tasks",
    "read_source": "slimkit.tasks",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
