"""Run a recipe: build calibration data if a step needs it, then call the public verb of each step in order."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import DataError
from slimkit.core.io import model_info, tokenizer_of
from slimkit.core.registry import Context
from slimkit.recipe.schema import CalibrationSpec, Recipe


def calibration_from_spec(model: nn.Module, spec: CalibrationSpec) -> CalibrationData:
    """Calibration data from a built-in corpus's calibration split (never its eval split), shaped for ``model``."""
    kind = model_info(model)["kind"]
    if spec.corpus == "digits":
        import torch

        from slimkit.zoo.digits import load_digits_split

        x, _ = load_digits_split("calibration")
        g = torch.Generator().manual_seed(spec.seed)
        idx = torch.randperm(len(x), generator=g)[: spec.samples]
        return CalibrationData.from_tensors(x[idx], batch_size=64)
    # stdlib
    tokenizer = tokenizer_of(model)
    if tokenizer is None:
        raise DataError("calibration corpus 'stdlib' needs a model with a tokenizer; pass CalibrationData yourself")
    if kind == "encoder":
        from slimkit.zoo.minilm import sample_texts

        texts = sample_texts("calibration", n=spec.samples, seed=spec.seed)
        batches = []
        for i in range(0, len(texts), 16):
            enc = tokenizer(texts[i:i + 16], padding="max_length", truncation=True, max_length=spec.seq_len,
                            return_tensors="pt")
            batches.append(dict(enc))
        return CalibrationData(batches, description=f"{len(texts)} stdlib docstring sentences (calibration split)")
    from slimkit.zoo.corpus import load_split

    data = CalibrationData.from_texts(load_split("calibration"), tokenizer, seq_len=spec.seq_len, n=spec.samples,
                                      seed=spec.seed)
    data.description = f"stdlib calibration split, {data.description}"
    return data


def needs_data(recipe: Recipe) -> bool:
    """Whether any step of ``recipe`` needs calibration data."""
    return any(step.needs_data for step in recipe.steps)


def run_recipe(model: nn.Module, recipe: Recipe, data: CalibrationData | None = None,
               ctx: Context | None = None) -> Context:
    """Apply every step of ``recipe`` to ``model`` through the public verbs; returns the context (notes).

    Steps change the model in place, except a ``Distill`` step with a ``student``: it builds
    a new model from the current one and trains it, and later steps work on that model.
    ``ctx.model`` is the model the recipe ended with. A distillation step's teacher is the
    model as it was before the first step (an uncompressed copy, kept only when needed).
    """
    import copy

    from slimkit import api

    ctx = ctx or Context()
    if data is None and needs_data(recipe):
        data = calibration_from_spec(model, recipe.calibration or CalibrationSpec())
    if ctx.teacher is None and any(step.family == "distill" for step in recipe.steps):
        ctx.teacher = copy.deepcopy(model)
    verbs: dict[str, Any] = {"quantize": api.quantize_, "prune": api.prune_, "factorize": api.factorize_}
    for stage in recipe.stages:
        for step in stage.steps:
            if step.family == "distill":
                model = api.distill_(step.build_student(model), ctx.teacher, step, ctx=ctx)
                continue
            verb = verbs.get(step.family, api.apply)
            verb(model, step, data, ctx)
    ctx.model = model
    return ctx
