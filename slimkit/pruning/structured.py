"""StructuredPrune: remove whole filters, neurons or attention heads so layers physically shrink.

The flow (``apply_structured_prune``):

1. find the groups of coupled slices: the dependency graph (``graph.DependencyGraph``)
   for a plain nn.Module, traced on an example input; the head / neuron finders
   (``transformer_groups.find_groups``) for a transformers model; keep those selected by
   include / ignore;
2. score every unit of every group (``importance``: L1, L2, Taylor, BN scale, random;
   the mean over the group's members);
3. choose the units to keep: per layer, each group loses ``ceil(ratio · units)`` units
   (Torch-Pruning's count: it keeps ``int(units · (1 − ratio))``), or globally, one
   ranking of the scores divided by their group's mean, ``ratio`` of all units removed;
   ``round_to`` rounds each kept count down to a multiple (hardware-friendly widths);
   with ``target_macs`` the ratio is found by bisection so the model keeps that fraction
   of its dense multiply-accumulates. A setting that would leave a group fewer than
   ``min_units`` units is refused, naming the layer, before anything is modified;
4. slice every group's members at once (``group.prune_groups``), update a zoo model's
   architecture config, and note what was pruned.

With L1 importance, scope "layer" and the same ratio this selects the same channels as
Torch-Pruning 1.6's ``MagnitudePruner(importance=MagnitudeImportance(p=1),
pruning_ratio=ratio)`` (group reduction "mean" over conv, BN and next-layer slices).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, SlimkitError, UnsupportedError, closest
from slimkit.core.io import is_transformers_model
from slimkit.core.registry import Context, register
from slimkit.core.targets import check_layer_map, matches, value_for
from slimkit.pruning.group import OUT, Group, prune_groups
from slimkit.pruning.importance import Importance, importance_names, make_importance
from slimkit.tasks import Task, task_of
from slimkit.tasks.base import split_labels

SCOPES = ("layer", "global")
TARGETS = ("channels", "heads", "neurons")


def _ratio_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        return f"must be a number in [0, 1) (the fraction of units to remove), got {value!r}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredPrune(Config):
    """Structured pruning: remove the least important filters / neurons / heads, shrinking the layers.

    ratio: fraction of each group's units to remove, in [0, 1) (per layer: each group loses
    ceil(ratio·units); global: ratio of all units), or a per-layer map on the group root
    names such as ``{"features.0": 0.2, "default": 0.5}`` (scope "layer" only).
    importance: "l1" (Σ|w|), "l2" (Σw²), "taylor" (Σ|w·grad|; gradients from the
    calibration data: cross-entropy against the labels of dict batches with a "labels" key,
    else against the model's own predictions; next-token loss for a causal LM; or the
    ``.grad`` already on the weights), "bn_scale" (|gamma| of BatchNorm), "random" (seeded).
    scope: "layer" (every group loses the same fraction) or "global" (one ranking of
    mean-normalized scores across groups). round_to: every kept count is a multiple of it.
    min_units: the fewest units a group may keep (a per-layer ratio leaving fewer is refused).
    targets: what to prune, () = the model's default: ("channels",) for a plain nn.Module
    (conv filters and Linear neurons through the dependency graph), ("heads", "neurons")
    for a transformers model. include / ignore: name patterns on the groups' output layers.
    example_input_shape: the input shape for tracing a plain module, e.g. [1, 3, 32, 32]
    (zoo models and calibration data provide one). target_macs: instead of ``ratio``, the
    fraction of the dense MACs to keep (e.g. 0.5 for 2x fewer), found by bisection on the
    ratio. seed: for "random" importance. recalibrate_bn: after pruning, re-estimate every
    BatchNorm's running statistics on the calibration data (no labels, no weight change):
    removing channels shifts the statistics the next layers see, and re-estimating them
    recovers much of the accuracy lost before any fine-tuning (off by default, like
    Torch-Pruning).
    """

    family: ClassVar[str] = "prune"

    ratio: float | dict = 0.5
    importance: str = "l1"
    scope: str = "layer"
    round_to: int = 1
    min_units: int = 1
    targets: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    example_input_shape: tuple[int, ...] | None = None
    target_macs: float | None = None
    seed: int = 0
    recalibrate_bn: bool = False

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Taylor importance (gradients) and recalibrate_bn need calibration data; the rest is data-free."""
        return self.importance == "taylor" or self.recalibrate_bn

    def validate(self) -> None:
        """Check ratio, importance, scope, round_to, min_units, targets, shapes, target_macs and patterns."""
        if isinstance(self.ratio, dict):
            check_layer_map(self.ratio, "StructuredPrune.ratio", _ratio_problem)
            if self.scope == "global":
                self.fail("ratio", "a per-layer map needs scope 'layer'; scope 'global' takes one ratio")
        elif _ratio_problem(self.ratio):
            self.fail("ratio", _ratio_problem(self.ratio))
        if self.importance not in importance_names():
            hint = closest(str(self.importance), importance_names())
            self.fail("importance", f"unknown importance {self.importance!r}{hint}; choose one of "
                                    f"{', '.join(importance_names())}")
        if self.scope not in SCOPES:
            self.fail("scope", f"must be 'layer' or 'global', got {self.scope!r}")
        if not _is_int(self.round_to) or self.round_to < 1:
            self.fail("round_to", f"must be an integer >= 1 (1 = no rounding, 8 = widths in multiples of 8), "
                                  f"got {self.round_to!r}")
        if not _is_int(self.min_units) or self.min_units < 1:
            self.fail("min_units", f"must be an integer >= 1, got {self.min_units!r}")
        if not isinstance(self.targets, tuple) or any(t not in TARGETS for t in self.targets):
            self.fail("targets", f"must be a list drawn from {', '.join(TARGETS)} (or empty for the model's "
                                 f"default), got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            self.fail("targets", f"lists a target twice: {self.targets!r}")
        shape = self.example_input_shape
        if shape is not None and (not isinstance(shape, tuple) or not shape
                                  or not all(_is_int(s) and s > 0 for s in shape)):
            self.fail("example_input_shape", f"must be a list of positive ints such as [1, 3, 32, 32], got {shape!r}")
        if self.target_macs is not None:
            t = self.target_macs
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
                self.fail("target_macs", f"must be a fraction in (0, 1) of the dense MACs to keep (0.5 = 2x fewer), "
                                         f"got {t!r}")
            if isinstance(self.ratio, dict):
                self.fail("target_macs", "is found by bisection on one ratio: leave ratio a number")
        if not _is_int(self.seed):
            self.fail("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.recalibrate_bn, bool):
            self.fail("recalibrate_bn", f"must be true or false, got {self.recalibrate_bn!r}")
        self.check_name_patterns()


# -- finding groups -------------------------------------------------------------------------
def _on_device(batch: Any, model: nn.Module) -> Any:
    """``batch`` (a tensor or a dict of tensors) moved to the device of ``model``'s parameters."""
    ref = next(model.parameters(), None)
    if ref is None:
        return batch
    if isinstance(batch, dict):
        return {k: v.to(ref.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(ref.device) if isinstance(batch, torch.Tensor) else batch


def example_input(model: nn.Module, config: StructuredPrune, data: Any = None) -> Any:
    """The input a plain module is traced (and its MACs counted) on.

    ``config.example_input_shape`` (uniform random values), else the first two rows of the
    first calibration batch, else the example inputs the model's task knows (a declared input
    shape, a GenericTask's example); UnsupportedError otherwise.
    """
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if config.example_input_shape is not None:
        return torch.rand(config.example_input_shape, generator=torch.Generator().manual_seed(0)).to(**kw)
    if data is not None:
        batch, _ = split_labels(_on_device(next(iter(data)), model))
        return {k: v[:2] for k, v in batch.items()} if isinstance(batch, dict) else batch[:2]
    try:
        # batch 2: a batch of 1 could be confused with a size-1 channel dim when views are followed
        inputs = task_of(model).example_inputs(model, batch=2, seed=0)
    except SlimkitError:
        raise UnsupportedError(f"StructuredPrune needs the input shape of {type(model).__name__} to trace it: set "
                               "example_input_shape (e.g. [1, 3, 32, 32]) or pass calibration data") from None
    inputs = {k: v.to(**kw) if v.is_floating_point() else v.to(kw.get("device")) for k, v in inputs.items()}
    return inputs["input"] if list(inputs) == ["input"] else inputs


def find_groups(model: nn.Module, config: StructuredPrune, data: Any = None) -> tuple[list[Group], list[str]]:
    """Every group of ``model`` that ``config.targets`` covers, and notes on what could not be pruned."""
    if is_transformers_model(model):
        targets = config.targets or ("heads", "neurons")
        from slimkit.pruning.transformer_groups import find_groups as transformer_groups

        found = transformer_groups(model, tuple(targets))
        return list(found), [f"not pruned: {n}" for n in getattr(found, "notes", [])]
    targets = config.targets or ("channels",)
    if targets != ("channels",):
        raise UnsupportedError(f"StructuredPrune targets {list(targets)}: heads and neurons are found in "
                               f"transformers models; {type(model).__name__} is a plain nn.Module, use "
                               "targets ['channels']")
    from slimkit.pruning.graph import DependencyGraph

    graph = DependencyGraph(model, example_input(model, config, data))
    notes = [f"not pruned: {name}: {why}" for name, why in graph.dropped]
    notes += [f"boundary: {name}: {why}" for name, why in graph.boundaries
              if not any(name == d for d, _ in graph.dropped)]
    return graph.groups, notes


def _selected(groups: list[Group], config: StructuredPrune) -> list[bool]:
    """Which groups include / ignore keep: include matches the root or an output-side member; ignore any of those."""
    def names(g: Group) -> list[str]:
        return [g.root] + [m.name for m in g.members if m.dim == OUT]

    if config.include:
        unmatched = [p for p in config.include if not any(matches(n, p) for g in groups for n in names(g))]
        if unmatched:
            roots = ", ".join(g.root for g in groups[:8])
            raise ConfigError(f"StructuredPrune.include pattern(s) {unmatched} match no prunable group; "
                              f"group roots look like: {roots}")
    keep = []
    for g in groups:
        ok = not config.include or any(matches(n, p) for n in names(g) for p in config.include)
        ok = ok and not any(matches(n, p) for n in names(g) for p in config.ignore)
        keep.append(ok)
    return keep


# -- gradients for Taylor ------------------------------------------------------------------
def _loss(model: nn.Module, batch: Any, task: Task) -> torch.Tensor:
    """The loss Taylor importance differentiates, for one calibration batch (the model's task defines it)."""
    return task.loss(model, _on_device(batch, model))


def _fill_gradients(model: nn.Module, groups: list[Group], data: Any) -> list[tuple[nn.Parameter, Any, bool]]:
    """Compute gradients for Taylor importance unless every member weight already has one.

    Returns ``(parameter, previous .grad, previous requires_grad)`` for every parameter this
    call changed; ``_restore`` puts them back once the scores are taken.
    """
    weights = {id(m.module.weight): m.module.weight for g in groups for m in g.members
               if getattr(m.module, "weight", None) is not None}
    if all(w.grad is not None for w in weights.values()):
        return []  # the user's own gradients
    task = task_of(model)
    if not task.has_loss:
        task.loss(model, None)  # raises: this kind has no loss of its own (it says what to do instead)
    if data is None:
        raise DataError("taylor importance needs calibration data to compute gradients (or .grad already "
                        "filled by your own backward pass); pass data= or use importance 'l1'")
    params = [p for p in model.parameters() if p.requires_grad or id(p) in weights]
    saved = [(p, p.grad, p.requires_grad) for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    was_training = model.training
    model.eval()  # dropout off, BatchNorm statistics untouched
    try:
        with torch.enable_grad():
            for batch in data:
                _loss(model, batch, task).backward()
    except Exception:
        _restore(saved)
        raise
    finally:
        model.train(was_training)
    return saved


def _restore(saved: list[tuple[nn.Parameter, Any, bool]]) -> None:
    """Give parameters back the gradients and requires_grad flags they had before ``_fill_gradients``."""
    for p, grad, requires_grad in saved:
        p.grad = grad
        p.requires_grad_(requires_grad)


# -- choosing units --------------------------------------------------------------------------
def _n_removed(units: int, ratio: float) -> int:
    """Units a per-layer ``ratio`` removes: Torch-Pruning keeps int(units · (1 − ratio)).

    The 1e-9 keeps float noise (10 · (1 − 0.9) = 0.99999...) from removing one unit more.
    """
    return units - int(units * (1.0 - ratio) + 1e-9)


def _floor(config: StructuredPrune) -> int:
    """The fewest units a pruned group may keep: min_units rounded up to a multiple of round_to."""
    return math.ceil(config.min_units / config.round_to) * config.round_to


def _refuse(group: Group, keep: int, config: StructuredPrune, why: str) -> None:
    raise ConfigError(f"StructuredPrune would leave {group.root!r} with {keep} of its {group.units} {group.unit}s "
                      f"({why}); lower the ratio for it (ratio: {{{group.root!r}: ..., default: ...}}), "
                      f"ignore it (ignore: [{group.root!r}]), or lower round_to / min_units. Nothing was pruned.")


def choose_keep(groups: list[Group], scores: list[torch.Tensor], config: StructuredPrune,
                ratio: float | dict | None = None) -> list[torch.Tensor]:
    """The unit indices each group keeps under ``config`` (``ratio`` overrides config.ratio).

    Refuses (ConfigError naming the layer) a setting that leaves a group fewer than
    ``min_units`` units; nothing is modified.
    """
    ratio = config.ratio if ratio is None else ratio
    floor = _floor(config)
    order = [torch.sort(s, stable=True).indices for s in scores]  # ascending: the first go first
    removed = [0] * len(groups)
    if config.scope == "layer":
        for i, g in enumerate(groups):
            n = _n_removed(g.units, float(value_for(g.root, ratio)))
            if n == 0:
                continue
            keep = g.units - n
            keep -= keep % config.round_to
            if keep < floor:
                why = f"ratio {value_for(g.root, ratio)}" + (f" with round_to={config.round_to}"
                                                              if config.round_to > 1 else "")
                _refuse(g, keep, config, why + (f"; min_units={config.min_units}" if config.min_units > 1 else ""))
            removed[i] = g.units - keep
    else:
        total = sum(g.units for g in groups)
        budget = _n_removed(total, float(ratio))
        # One ranking of scores normalized by their group's mean (Torch-Pruning's "mean" normalizer),
        # so groups of different magnitudes compete fairly.
        entries = []
        for i, s in enumerate(scores):
            mean = float(s.mean())
            norm = s / mean if mean > 0 else s
            entries += [(float(norm[u]), i, int(u)) for u in order[i]]
        entries.sort(key=lambda e: e[0])
        caps = [max(g.units - floor, 0) for g in groups]
        for _, i, _ in entries:
            if budget == 0:
                break
            if removed[i] < caps[i]:
                removed[i] += 1
                budget -= 1
        for i, g in enumerate(groups):
            if removed[i]:
                keep = g.units - removed[i]
                removed[i] = g.units - (keep - keep % config.round_to)
    return [torch.sort(order[i][removed[i]:]).values for i in range(len(groups))]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Any) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``data``; returns how many were reset.

    Each BN averages the statistics over all batches (momentum None); every other module
    stays in eval mode (no dropout), and the model's mode is restored.
    """
    from slimkit.core.calibration import run_model

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    saved = [(bn, bn.momentum) for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    try:
        for batch in data:
            run_model(model, split_labels(_on_device(batch, model))[0])
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        model.train(was_training)
    return len(bns)


# -- the handler -----------------------------------------------------------------------------
def _score(groups: list[Group], importance: Importance) -> list[torch.Tensor]:
    scores = []
    for g in groups:
        s = importance(g).detach().cpu()
        if s.shape != (g.units,):
            raise RuntimeError(f"importance {importance!r} gave {tuple(s.shape)} scores for {g.units} units")
        if not torch.isfinite(s).all():
            raise DataError(f"group {g.root!r} has NaN or inf importance scores (NaN/inf weights or gradients?); "
                            f"fix the model or ignore it (ignore: [{g.root!r}])")
        scores.append(s)
    return scores


def _count_inputs(model: nn.Module, config: StructuredPrune, data: Any) -> Any:
    """Inputs to count MACs on for ``target_macs``."""
    if not is_transformers_model(model):
        return example_input(model, config, data)
    if data is not None:
        batch, _ = split_labels(_on_device(next(iter(data)), model))
        return {k: v[:1] for k, v in batch.items()} if isinstance(batch, dict) else batch[:1]
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if not vocab:
        raise UnsupportedError("target_macs needs calibration data to count the MACs of this model")
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    return _on_device({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, model)


def _ratio_for_macs(model: nn.Module, config: StructuredPrune, all_groups: list[Group], scores: list[torch.Tensor],
                    roots: list[str], data: Any) -> tuple[float, int, int]:
    """The smallest ratio whose pruned model keeps <= target_macs of the dense MACs: (ratio, dense, pruned)."""
    from slimkit.core.measure import count_macs

    inputs = _count_inputs(model, config, data)
    dense = count_macs(model, inputs)
    goal = config.target_macs * dense

    def macs_at(ratio: float) -> int | None:
        if all(not g.on_prune for g in all_groups):
            # One deepcopy of (model, groups) maps every member onto the copy's modules.
            trial, groups = copy.deepcopy((model, all_groups))
        else:
            # on_prune callbacks close over the original modules: find the copy's own groups.
            trial = copy.deepcopy(model)
            groups, _ = find_groups(trial, config, data)
        picked = [g for g, ok in zip(groups, _selected(groups, config)) if ok]
        if [g.root for g in picked] != roots:
            raise RuntimeError("the groups of a copy of the model differ from the model's")
        try:
            keeps = choose_keep(picked, scores, config, ratio)
        except ConfigError:
            return None  # this ratio empties a layer: too high
        keep_of = {id(g): k for g, k in zip(picked, keeps)}
        prune_groups(groups, [keep_of.get(id(g), torch.arange(g.units)) for g in groups])
        return count_macs(trial, inputs)

    lo, hi, best = 0.0, 0.995, None
    for _ in range(12):  # 0.995 / 2**12: the ratio to within 2.5e-4, finer than one unit of a 4000-wide layer
        mid = (lo + hi) / 2
        macs = macs_at(mid)
        if macs is not None and macs <= goal:
            best, hi = (mid, macs), mid
        elif macs is None:
            hi = mid
        else:
            lo = mid
    if best is None:
        raise ConfigError(f"StructuredPrune.target_macs {config.target_macs} cannot be reached by pruning the "
                          f"selected groups (dense: {dense} MACs); raise target_macs or prune more layers")
    return best[0], dense, best[1]


@register(StructuredPrune)
def apply_structured_prune(model: nn.Module, config: StructuredPrune, ctx: Context) -> None:
    """Prune whole units of ``model`` in place (see the module docstring); every check runs before any change."""
    from slimkit.core.measure import count_parameters
    from slimkit.pruning.resize import sync_arch_config

    groups, graph_notes = find_groups(model, config, ctx.data)
    if not groups:
        raise UnsupportedError(f"StructuredPrune found nothing to prune in {type(model).__name__}: "
                               + ("; ".join(graph_notes[:4]) or "no prunable layers"))
    selected = _selected(groups, config)
    picked = [g for g, ok in zip(groups, selected) if ok]
    if not picked:
        raise ConfigError(f"StructuredPrune: include/ignore leave no group to prune (groups: "
                          f"{', '.join(g.root for g in groups[:8])})")

    if config.recalibrate_bn and ctx.data is None:
        raise DataError("StructuredPrune.recalibrate_bn needs calibration data (the BatchNorm statistics are "
                        "re-estimated on it): pass data=, or set recalibrate_bn: false")
    importance = make_importance(config.importance, config.seed)
    saved: list = []
    if importance.needs_gradients:
        saved = _fill_gradients(model, picked, ctx.data)
    try:
        scores = _score(picked, importance)
    finally:
        _restore(saved)

    ratio: float | dict = config.ratio
    macs_note = ""
    if config.target_macs is not None:
        ratio, dense, pruned = _ratio_for_macs(model, config, groups, scores, [g.root for g in picked],
                                               ctx.data)
        macs_note = (f"; ratio {ratio:.4f} for target_macs {config.target_macs}: MACs {pruned / dense:.3f}x of dense "
                     f"({dense} -> {pruned} on the example input)")
    keeps = choose_keep(picked, scores, config, ratio)  # raises before any change

    before = count_parameters(model).total
    widths = [(g.root, g.units, int(k.numel()), g.unit) for g, k in zip(picked, keeps)]
    # Every group goes to prune_groups (unselected ones keep all units) so shared modules renumber consistently.
    keep_of = {id(g): k for g, k in zip(picked, keeps)}
    prune_groups(groups, [keep_of.get(id(g), torch.arange(g.units)) for g in groups])
    sync_arch_config(model)
    after = count_parameters(model).total
    if config.recalibrate_bn:
        n = recalibrate_batchnorm(model, ctx.data)
        macs_note += f"; BatchNorm statistics of {n} layer(s) re-estimated on {ctx.data.description}" \
            if hasattr(ctx.data, "description") else f"; {n} BatchNorm layer(s) re-estimated"

    changed = [(r, a, b, u) for r, a, b, u in widths if a != b]
    shown = ", ".join(f"{r} {a}->{b}" for r, a, b, _ in changed[:6]) + (" ..." if len(changed) > 6 else "")
    ctx.note(f"StructuredPrune ({config.importance}, {config.scope}): pruned {len(changed)} of {len(groups)} "
             f"group(s), parameters {before} -> {after} ({after / max(before, 1):.3f}x){macs_note}"
             + (f"; {shown}" if shown else ""))
    for line in graph_notes:
        ctx.note(f"StructuredPrune: {line}")
    if is_transformers_model(model):
        from slimkit.pruning.transformer_groups import sync_config

        for line in sync_config(model):  # which config fields now describe the pruned sizes
            ctx.note(f"StructuredPrune: {line}")
