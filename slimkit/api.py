"""The public verbs: thin wrappers over one dispatcher (config type -> registered handler).

Every verb changes the model in place and returns it, records the applied config on
the model (it is saved with the checkpoint), and checks that the config belongs to the
verb's family so ``quantize_(model, Wanda(...))`` is refused rather than half-done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.io import load
from slimkit.core.registry import Context
from slimkit.recipe.steps import apply_step

Progress = Callable[[str, float], None]


def apply(model: nn.Module, config: Config, data: CalibrationData | None = None,
          ctx: Context | None = None) -> nn.Module:
    """Apply any registered technique ``config`` to ``model`` in place; returns the model.

    Never a silent success: a compression step that changes less than a tenth of the weight
    matrices it was asked to cover raises ``NothingCompressedError`` naming the layer types it
    left alone (unless ``ctx.allow_partial``), and after every step the model runs one forward
    on example inputs, so a step that breaks the model raises ``BrokenModelError`` at once
    (``slimkit.recipe.steps.apply_step``).
    """
    return apply_step(model, config, data, ctx)


def _verb(family: str, model: nn.Module, config: Config, data: CalibrationData | None, ctx: Context | None) -> nn.Module:
    if isinstance(config, Config) and config.family != family:
        raise ConfigError(f"{type(config).__name__} is a {config.family!r} technique, not {family!r}: "
                          f"use slimkit.{config.family}_ (or slimkit.apply)")
    return apply(model, config, data, ctx)


def quantize_(model: nn.Module, config: Config, data: CalibrationData | None = None,
              ctx: Context | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``config`` (e.g. ``RTN(bits=8)``); calibration ``data`` when it needs it."""
    return _verb("quantize", model, config, data, ctx)


def prune_(model: nn.Module, config: Config, data: CalibrationData | None = None,
           ctx: Context | None = None) -> nn.Module:
    """Prune ``model`` in place with ``config``; calibration ``data`` when it needs it."""
    return _verb("prune", model, config, data, ctx)


def factorize_(model: nn.Module, config: Config, data: CalibrationData | None = None,
               ctx: Context | None = None) -> nn.Module:
    """Factorize ``model``'s layers in place with ``config``; calibration ``data`` when it needs it."""
    return _verb("factorize", model, config, data, ctx)


def distill_(student: nn.Module, teacher: nn.Module, config: Config, data: Any = None,
             ctx: Context | None = None) -> nn.Module:
    """Train ``student`` in place to imitate the frozen ``teacher`` with ``config`` (a ``Distill``).

    ``data`` is training data: a callable ``step -> batch`` or an iterable of batches; by
    default batches from the train split of the model's built-in corpus. Returns the student.
    """
    ctx = ctx or Context()
    ctx.teacher = teacher
    ctx.data = data  # training data, never a recipe's calibration data left from an earlier step
    return _verb("distill", student, config, data, ctx)


def compress_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, config: Config,
                        data: CalibrationData, ctx: Context | None = None) -> Any:
    """Apply a blockwise ``config`` (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT) to a checkpoint too big for
    memory, one decoder block loaded at a time; writes a slimkit checkpoint to ``out_dir``."""
    from slimkit.core.streaming import compress_checkpoint as stream

    return stream(source, out_dir, config, data, ctx, apply=apply)


def apply_recipe(model: nn.Module | str, recipe: Any, data: CalibrationData | None = None,
                 ctx: Context | None = None) -> nn.Module:
    """Run every step of ``recipe`` (a Recipe, a YAML path or a shipped recipe name) on ``model`` in order.

    Calibration data is built from the recipe's ``calibration`` section when a step needs
    data and none is given. Returns the model (loaded first when given by name or path); a
    recipe whose ``Distill`` step builds a student returns that student, the model untouched.
    """
    from slimkit.recipe.runner import run_recipe
    from slimkit.recipe.schema import Recipe, resolve_recipe

    if not isinstance(recipe, Recipe):
        recipe = resolve_recipe(os.fspath(recipe))
    model = load(model)
    return run_recipe(model, recipe, data=data, ctx=ctx).model


def evaluate(model: nn.Module | str, baseline: nn.Module | str | None = None, data: Any = None,
             metrics: tuple[str, ...] | None = None) -> Any:
    """Measure ``model`` (size on disk, parameters, FLOPs, latency, quality); with ``baseline``, compare the two.

    ``data`` is evaluation data: a text file or folder path, a list of texts, or a prepared
    ``EvalData``; by default the held-out split of the model's built-in corpus. Returns a
    ``CompressionReport`` when a baseline is given, else a ``ModelMeasurement``.
    """
    from slimkit.evaluation.suite import compare, measure_model, resolve_eval_data

    model = load(model)
    eval_data = resolve_eval_data(model, data)
    if baseline is None:
        return measure_model(model, eval_data, metrics=metrics)
    return compare(load(baseline), model, eval_data, metrics=metrics)


def generate(model: nn.Module | str, prompt: Any, *, max_new_tokens: int = 64, sampling: Any = None,
             kv_cache: str | None = None) -> Any:
    """Generate text after ``prompt`` (a string or token ids) with a KV cache; returns a ``GenerationResult``.

    ``model``: a causal LM (module, zoo name or folder). ``sampling``: a ``Sampling``
    (greedy when None); ``kv_cache``: None, "int8" or "int4". The result holds the new
    tokens, their text, and the prefill seconds and decode tokens/s measured while generating.
    """
    from slimkit.evaluation.generation import generate as run
    from slimkit.tasks.generation import GREEDY

    return run(load(model), prompt, max_new_tokens=max_new_tokens, sampling=sampling or GREEDY, kv_cache=kv_cache)
