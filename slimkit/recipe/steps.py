"""One step of a recipe (or one call of a public verb): dispatch to the handler, then check the result.

``apply_step`` is the single dispatcher the verbs (``slimkit.api``) and the recipe runner
share. It looks the handler up in the registry, records the step on the model, and refuses
to succeed silently:

- a compression step that changed less than ``MIN_COVERAGE`` of the weight matrices it was
  asked to cover (``core.coverage``) raises ``NothingCompressedError`` naming the layer types
  it left alone, unless ``ctx.allow_partial`` (then a note says so);
- after the step the model runs one forward on two rows of the first calibration batch, or
  its task's example inputs, and must return finite values (``BrokenModelError`` otherwise),
  so a step that breaks the model fails there, never after an artifact was saved.

It also carries one step's state into the next, so techniques compose without manual steps:

- a step that edits float weights (pruning, factorization) after one that packed them into
  integer codes is refused before anything runs, naming both steps and the order that works
  (``order_problem``, also checked on a whole recipe before its first step);
- pruning masks (``Magnitude(keep_masks=True)``) are baked into the weights before a step
  that replaces layers (quantization, factorization), with a note;
- a step that fills in the zeros an earlier pruning step left says so in a note, with the
  layer's sparsity before and after (GPTQ keeps them by default; SVD cannot).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData, run_model
from slimkit.core.config import Config
from slimkit.core.coverage import coverage, snapshot
from slimkit.core.errors import BrokenModelError, ConfigError, NothingCompressedError, SlimkitError
from slimkit.core.io import attach_info, model_info
from slimkit.core.linear_like import LinearLike
from slimkit.core.masks import masked_modules, strip
from slimkit.core.registry import Context, config_types, handler_for
from slimkit.tasks import task_of
from slimkit.tasks.base import first_tensor, split_labels

MIN_COVERAGE = 0.1  # a step must change at least this share of the weights it was asked to cover
SPARSE_LAYER = 0.1  # a layer with at least this share of exact zeros was pruned (a dense one has next to none)
NOTE_COVERAGE = 0.5  # below this share the report says what was left alone
_CHANGED_IN_PLACE = " (the model was changed in place: reload it before trying another step)"


def apply_step(model: nn.Module, config: Config, data: CalibrationData | None = None,
               ctx: Context | None = None) -> nn.Module:
    """Apply any registered technique ``config`` to ``model`` in place, checked (see the module docstring)."""
    if not isinstance(config, Config):
        raise ConfigError(f"expected a slimkit config (e.g. slimkit.RTN(bits=8)), got {type(config).__name__}")
    handler = handler_for(config)
    ctx = ctx or Context()
    problem = order_problem([step.get("type") for step in model_info(model).get("steps", [])], config)
    if problem:
        raise ConfigError(problem)
    if data is not None:
        ctx.data = data if config.family == "distill" else as_calibration(model, data)
    checked = config.family != "distill" and ctx.stream is None  # training changes everything; a stream is on meta
    replaces_layers = config.family in ("quantize", "factorize")
    if replaces_layers and ctx.stream is None and masked_modules(model):
        count = len(masked_modules(model))
        strip(model)
        ctx.note(f"{type(config).__name__}: baked the pruning masks of {count} layer(s) into their weights first "
                 "(their zeros stay zeros)")
    sparse_before = sparse_layers(model) if replaces_layers and checked else {}
    before = snapshot(model) if checked else None
    notes_before = len(ctx.notes)
    handler(model, config, ctx)
    if checked:  # before the step is recorded: a refused step is not part of the model's history
        _check_coverage(model, config, before, ctx, ctx.notes[notes_before:])
        _check_runs(model, config, ctx.data)
        _note_lost_sparsity(model, config, sparse_before, ctx)
    info = model_info(model)
    attach_info(model, steps=[*info.get("steps", []), config.to_dict()])
    return model


def order_problem(earlier: list[Any], config: Config) -> str | None:
    """Why ``config`` cannot follow the steps ``earlier`` (config classes, instances or recorded type
    names), or None: editing float weights (pruning, factorization) after they were packed into codes."""
    if config.family not in ("prune", "factorize"):
        return None
    types = config_types()
    for step in earlier:
        cls = types.get(step) if isinstance(step, str) else (step if isinstance(step, type) else type(step))
        if cls is not None and getattr(cls, "packs_weights", False):
            name, packer = type(config).__name__, cls.__name__
            return (f"{name} cannot run after {packer}: {packer} packed the float weights into integer codes, and "
                    f"{name} edits float weights. Put {name} before {packer} (prune or factorize first, then "
                    "quantize: the quantizer keeps the zeros)")
    return None


def sparse_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (exact zeros, weights)}`` of the Linear-like layers that are at least SPARSE_LAYER zeros."""
    found = {}
    for name, module in model.named_modules():
        weight = _logical_weight(module)
        if weight is None or weight.device.type == "meta" or not weight.numel():
            continue
        zeros = int((weight == 0).sum())
        if zeros >= SPARSE_LAYER * weight.numel():
            found[name] = (zeros, weight.numel())
    return found


def _logical_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight a layer applies (dequantized for a quantized one), or None for other modules."""
    with torch.no_grad():
        if hasattr(module, "dense_weight") and hasattr(module, "qweight"):
            return module.dense_weight()
        if isinstance(module, LinearLike) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return module.weight.detach()
    return None


def _note_lost_sparsity(model: nn.Module, config: Config, before: dict[str, tuple[int, int]], ctx: Context) -> None:
    """A note when the step left fewer exact zeros in layers an earlier step had pruned."""
    if not before:
        return
    modules = dict(model.named_modules())
    lost = []
    for name, (zeros, numel) in before.items():
        weight = _logical_weight(modules[name]) if name in modules else None
        if weight is None or weight.numel() != numel:
            lost.append((name, zeros / numel, None))  # replaced by something else (e.g. low-rank factors)
            continue
        now = int((weight == 0).sum())
        if now < zeros:
            lost.append((name, zeros / numel, now / numel))
    if lost:
        name, was, now = lost[0]
        example = f"{name}: {100 * was:.1f}% zeros before, " + ("no longer one dense weight" if now is None
                                                                 else f"{100 * now:.1f}% after")
        ctx.note(f"{type(config).__name__} did not keep the zeros of {len(lost)} of the {len(before)} layer(s) an "
                 f"earlier step pruned ({example}); prune after it, or use a quantizer that keeps zeros "
                 "(GPTQ keep_zeros, RTN, AWQ)")


def as_calibration(model: nn.Module, data: Any) -> CalibrationData:
    """``data`` as CalibrationData: as is, a data spec (a path, ``PATH?field=...``, a mapping, a DataSpec)
    read by the model's task, or any iterable of batches (a DataLoader; ``(inputs, labels)`` keeps the inputs)."""
    from slimkit.tasks.sources import DataSpec

    if isinstance(data, CalibrationData):
        return data
    if isinstance(data, (str, dict, DataSpec)) or hasattr(data, "__fspath__"):
        return task_of(model).calibration(model, data)
    try:
        iter(data)
    except TypeError:
        raise ConfigError(f"data must be CalibrationData, a data spec (a path, 'file.jsonl?field=text') or an "
                          f"iterable of batches such as a DataLoader, got {type(data).__name__}") from None
    return CalibrationData.from_loader(data)


def _check_coverage(model: nn.Module, config: Config, before: dict, ctx: Context, step_notes: list[str]) -> None:
    found = coverage(before, model, config)
    said = f" ({'; '.join(step_notes)})" if step_notes else ""  # the step's own notes say why it skipped
    name = type(config).__name__
    if found.asked == 0:
        raise NothingCompressedError(f"{name} was asked to cover no weight matrix of {type(model).__name__}: "
                                     f"check its include/ignore patterns{said}")
    if found.fraction >= NOTE_COVERAGE:
        return
    if found.fraction >= MIN_COVERAGE:
        ctx.note(f"{name} changed {100 * found.fraction:.0f}% of the weights it was asked to cover; left unchanged: "
                 f"{found.describe_untouched()}")
        return
    message = (f"{name} changed {found.changed:,} of the {found.asked:,} weights it was asked to cover "
               f"({100 * found.fraction:.1f}%); left unchanged: {found.describe_untouched()}{said}")
    if ctx.allow_partial:
        ctx.note(message + " (allowed by allow_partial)")
        return
    raise NothingCompressedError(message + ". Use a technique that handles those layers, narrow it with "
                                 "include/ignore, or set allow_partial: true to accept it" + _CHANGED_IN_PLACE)


def _check_runs(model: nn.Module, config: Config, data: Any) -> None:
    """One forward on two rows of the first calibration batch (or the task's example inputs); finite output."""
    if isinstance(data, CalibrationData) and len(data):
        batch, _ = split_labels(next(iter(data)))
        batch = {k: v[:2] for k, v in batch.items()} if isinstance(batch, dict) else batch[:2]
    else:
        try:
            inputs = task_of(model).example_inputs(model)
        except SlimkitError:
            return  # inputs unknown (a user's module without a GenericTask): nothing to run it on
        batch = inputs["input"] if list(inputs) == ["input"] else inputs
    device = next((p.device for p in model.parameters()), None)
    if device is not None and device.type == "meta":
        return
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = first_tensor(run_model(model, batch), "the model output")
    except SlimkitError:
        raise
    except Exception as exc:
        raise BrokenModelError(f"after {type(config).__name__}, {type(model).__name__} no longer runs: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}{_CHANGED_IN_PLACE}") from exc
    finally:
        model.train(was_training)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise BrokenModelError(f"after {type(config).__name__}, {type(model).__name__} returns NaN or inf on "
                               f"example inputs{_CHANGED_IN_PLACE}")


