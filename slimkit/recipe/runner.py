"""Run a recipe: build calibration data if a step needs it, then call the public verb of each step in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.registry import Context
from slimkit.recipe.schema import Recipe
from slimkit.core.errors import RecipeError
from slimkit.core.io import model_info
from slimkit.recipe.steps import apply_step, order_problem
from slimkit.tasks import task_of


def calibration_from_spec(model: nn.Module, spec: Any = None) -> CalibrationData:
    """Calibration data for ``model`` from a data spec (a built-in corpus's calibration split by default), from its task."""
    return task_of(model).calibration(model, spec)


def needs_data(recipe: Recipe) -> bool:
    """Whether any step of ``recipe`` needs calibration data."""
    return any(step.needs_data for step in recipe.steps)


def check_order(model: nn.Module, recipe: Recipe) -> None:
    """Refuse, before any step runs, a recipe whose order cannot be honoured (``steps.order_problem``),
    counting the steps the model already went through."""
    done: list = [step.get("type") for step in model_info(model).get("steps", [])]
    for stage in recipe.stages:
        for step in stage.steps:
            problem = order_problem(done, step)
            if problem:
                raise RecipeError(f"stage {stage.name!r}: {problem}")
            done.append(step)


AfterStage = Callable[[str, nn.Module, Context], None]  # (stage name, the model after it, the run's context)


def run_recipe(model: nn.Module, recipe: Recipe, data: CalibrationData | None = None,
               ctx: Context | None = None, after_stage: AfterStage | None = None) -> Context:
    """Apply every step of ``recipe`` to ``model`` through the public verbs; returns the context (notes).

    Every step goes through ``steps.apply_step`` (the verbs' dispatcher, with its checks). Steps change the
    model in place, except a ``Distill`` step with a ``student``: it builds
    a new model from the current one and trains it, and later steps work on that model.
    ``ctx.model`` is the model the recipe ended with. A distillation step's teacher is the
    model as it was before the first step (an uncompressed copy, kept only when needed).
    ``after_stage(stage_name, model, ctx)``, when given, is called after each stage's last step
    with the model as it is then (a distillation stage's student), e.g. to measure every stage.
    """
    import copy

    check_order(model, recipe)
    ctx = ctx or Context()
    ctx.allow_partial = ctx.allow_partial or recipe.allow_partial
    if data is None and needs_data(recipe):
        data = calibration_from_spec(model, recipe.calibration)
        ctx.data_description = data.description
    if ctx.teacher is None and any(step.family == "distill" for step in recipe.steps):
        ctx.teacher = copy.deepcopy(model)
    for stage in recipe.stages:
        for step in stage.steps:
            if step.family == "distill":
                ctx.data = None  # training data comes from the step (train_data), never the calibration set
                model = apply_step(step.build_student(model), step, None, ctx)
                continue
            apply_step(model, step, data, ctx)
        if after_stage is not None:
            after_stage(stage.name, model, ctx)
    ctx.model = model
    return ctx
