"""Latency budgets for ``slimkit auto``: how much of each structural group to remove, and which kernels
to run the rest with, so the model fits a measured fraction of its fp32 time.

Bytes are additive per layer; time is nearly so for the Linears, which hold most of an
encoder's or a decoder's work. So a latency budget is allocated like a size budget, with time
instead of bytes:

1. **Structural sensitivity.** Every group structured pruning finds (a layer's attention heads,
   an MLP's neurons, a conv's filters) is pruned alone at 25/50/75% of its units (L2 norm
   importance) on a copy, and the task's divergence of the output from the original's is
   measured on the calibration rows. The copy also says which Linears changed shape, and to
   what.
2. **Time per shape.** Every Linear shape the model has, and every shape a pruning option
   leaves, is timed in the runtime on each *mode* (fp32, and each int8 path of that runtime:
   ``probes.time_path``), at the rows the model feeds its Linears. A plan's expected time is
   the model's measured fp32 time with each Linear's fp32 time replaced by its time in the
   plan's mode at its new shape (``LatencyModel.expected_ms``): what advise's ``expected_ms``
   does, per layer. The rest of the measured time (convolutions, attention scores, norms)
   is taken to shrink with its FLOPs: each option's copy is FLOP-counted on the timing
   inputs (``rest_flops``), so pruning a CNN's filters or a layer's heads is seen too.
3. **Allocation.** For each mode, the exact multiple-choice knapsack (``plan.knapsack``) picks
   one ratio per group minimising the summed divergence with the groups' summed time within
   what the budget leaves them. Where two groups share a Linear (a plain MLP or CNN: one
   group's outputs are the next one's inputs) the time is a product, not a sum, and the
   additive allocation expects a little less time than the layer takes; the measurement
   catches it, and an overshooting plan is allocated once more, smaller by the overshoot.
   In a transformer the head and neuron groups share no Linear.
4. The plans (and the uniform ones beside them: each mode alone, and 25%/50% of every group)
   are built for real and their time is measured against fp32, interleaved
   (``LatencyJudge.ratio``): the budget is a ratio, and measuring it as one keeps the machine's
   drift out of it.

The rest's time is assumed proportional to its FLOPs, which element-wise work and the
runtime's fusions are not: the measurement decides, and a plan far from its expectation is
allocated again with its path's times rescaled (``plan._rescaled``).
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.auto.probes import ProbePath, time_path
from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.core.linear_like import as_linear, is_linear_like, linear_problem
from slimkit.core.measure import fastest_ms
from slimkit.factorization.allocation import predictions
from slimkit.pruning.group import OUT
from slimkit.pruning.structured import StructuredPrune, find_groups
from slimkit.recipe.steps import apply_step
from slimkit.tasks import task_of

#: the fractions of a group's units each option removes
RATIOS = (0.25, 0.5, 0.75)
#: the importance structured pruning ranks units by (the shipped MiniLM preset's)
IMPORTANCE = "l2"
Shape = tuple[int, int]


@dataclass
class GroupOption:
    """One group pruned alone at ``ratio``: the output divergence, and the Linears whose shape changed (to what)."""

    ratio: float
    divergence: float
    shapes: dict[str, Shape]
    rest_saved: float = 0.0  # FLOPs outside the Linears it removes (convolutions, attention over fewer heads)


@dataclass
class GroupSensitivity:
    """One structural group: its root, unit kind and count, its changing Linears' fp32 shapes, and its options."""

    root: str
    unit: str
    units: int
    outputs: tuple[str, ...] = ()  # the layers on its output side (what include names)
    shapes: dict[str, Shape] = field(default_factory=dict)
    options: dict[float, GroupOption] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"root": self.root, "unit": self.unit, "units": self.units,
                "divergence": {f"{r:g}": o.divergence for r, o in self.options.items()}}


def linear_shapes(model: nn.Module) -> dict[str, Shape]:
    """(out, in) of every Linear-like layer slimkit can quantize, by name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = (module.out_features, module.in_features)
        elif is_linear_like(module) and linear_problem(module) is None:
            out[name] = tuple(as_linear(module).weight.shape)
    return out


def rest_flops(model: nn.Module, inputs: Any) -> float:
    """FLOPs of one forward on ``inputs`` outside the Linear-like layers (convolutions, attention scores, ...).

    The Linears' share is taken out exactly: a forward hook counts the rows each one sees,
    and a Linear costs 2 · rows · out · in; the rest is ``count_flops``' total minus that.
    """
    from slimkit.core.measure import count_flops

    shapes = linear_shapes(model)
    rows: dict[str, int] = {}
    hooks = []
    for name in shapes:
        def count(_m: nn.Module, args: tuple, name: str = name) -> None:
            rows[name] = rows.get(name, 0) + args[0].numel() // shapes[name][1]
        hooks.append(model.get_submodule(name).register_forward_pre_hook(count))
    try:
        total = count_flops(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    linear = sum(2 * rows.get(n, 0) * o * i for n, (o, i) in shapes.items())
    return max(0.0, float(total - linear))


def prune_step(ratios: dict[str, float], outputs: dict[str, tuple[str, ...]],
               importance: str = IMPORTANCE) -> StructuredPrune:
    """StructuredPrune removing ``ratios[root]`` of each named group's units and nothing elsewhere.

    ``outputs[root]``: the layers on the group's output side; ``include`` names them exactly,
    so the step targets (and is checked to change) those layers alone. The map's ``default``
    covers no group: include selects only the named ones.
    """
    roots = sorted(ratios)
    include = tuple("re:" + re.escape(name) for root in roots for name in outputs[root])
    return StructuredPrune(ratio={**{k: float(ratios[k]) for k in roots}, "default": 0.0}, importance=importance,
                           scope="layer", include=include)


def structural_sensitivity(model: nn.Module, batches: list[Any], ratios: tuple[float, ...] = RATIOS,
                           importance: str = IMPORTANCE, timing_inputs: Any = None) -> list[GroupSensitivity]:
    """Each prunable group of ``model`` pruned alone at each ratio, on a copy: divergence and new shapes
    (and, given ``timing_inputs``, the FLOPs outside the Linears it removes on them: ``rest_flops``).

    A ratio the group cannot take (it would leave fewer units than ``min_units``) is skipped;
    a model with no prunable group is refused (a latency budget needs one).
    """
    task = task_of(model)
    groups, notes = find_groups(model, StructuredPrune(importance=importance))
    if not groups:
        raise UnsupportedError(f"a latency budget removes work by structured pruning, and {type(model).__name__} "
                               "has no group it can prune (" + ("; ".join(notes[:3]) or "no heads, neurons or "
                               "channels found") + "): use --budget size=F or bits=B")
    with torch.no_grad():
        reference = predictions(model, batches, task)
    before = linear_shapes(model)
    dense_rest = rest_flops(model, timing_inputs) if timing_inputs is not None else 0.0
    out = []
    for group in groups:
        outputs = tuple(dict.fromkeys(m.name for m in group.members if m.dim == OUT))
        sens = GroupSensitivity(group.root, group.unit, group.units, outputs)
        for ratio in ratios:
            work = copy.deepcopy(model)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    apply_step(work, prune_step({group.root: ratio}, {group.root: outputs}, importance))
            except (ConfigError, UnsupportedError):
                continue  # the group is too small for this ratio
            after = linear_shapes(work)
            changed = {n: s for n, s in after.items() if before.get(n) != s}
            with torch.no_grad():
                new = predictions(work, batches, task)
            divergence = sum(task.divergence(a, b) for a, b in zip(reference, new)) / len(batches)
            saved = dense_rest - rest_flops(work, timing_inputs) if timing_inputs is not None else 0.0
            sens.options[ratio] = GroupOption(ratio, float(divergence), changed, max(0.0, saved))
            sens.shapes.update({n: before[n] for n in changed})
        if sens.options:
            out.append(sens)
    return out


def merge_shapes(*changes: dict[str, Shape]) -> dict[str, Shape]:
    """The shapes after several groups are pruned together: each option shrinks one side of a Linear (its
    outputs, or its inputs when the group feeds it), so a Linear two groups share keeps the smaller of each side."""
    out: dict[str, Shape] = {}
    for change in changes:
        for name, (rows, cols) in change.items():
            old = out.get(name)
            out[name] = (rows, cols) if old is None else (min(old[0], rows), min(old[1], cols))
    return out


def possible_shapes(shapes: dict[str, Shape], groups: list[GroupSensitivity]) -> set[Shape]:
    """Every shape a Linear can take under any choice of ratios: each side's sizes, crossed (what to probe)."""
    out: set[Shape] = set()
    for name, (rows, cols) in shapes.items():
        outs, ins = {rows}, {cols}
        for g in groups:
            for o in g.options.values():
                if name in o.shapes:
                    outs.add(o.shapes[name][0])
                    ins.add(o.shapes[name][1])
        out.update((r, c) for r in outs for c in ins)
    return out


@dataclass
class LatencyModel:
    """Expected whole-model time in ``runtime`` from per-shape Linear times on each mode.

    ``base_ms``: the model's measured fp32 time; ``shapes``: every Linear's fp32 shape;
    ``times[mode][shape]``: the probed ms of one Linear of that shape on that mode
    (``fp32_mode`` among them).
    """

    runtime: str
    rows: int
    base_ms: float
    shapes: dict[str, Shape]
    fp32_mode: str
    times: dict[str, dict[Shape, float]] = field(default_factory=dict)
    rest_flops: float = 0.0  # FLOPs outside the Linears, dense (0: the rest is taken as fixed)

    @property
    def rest_ms(self) -> float:
        """The measured fp32 time the Linears' probes do not account for (convolutions, attention, norms)."""
        fp32 = self.times[self.fp32_mode]
        return max(0.0, self.base_ms - sum(fp32[s] for s in self.shapes.values()))

    def rest_saving_ms(self, saved_flops: float) -> float:
        """The rest's time saved by removing ``saved_flops`` of its FLOPs (taken as proportional)."""
        if self.rest_flops <= 0:
            return 0.0
        return self.rest_ms * min(1.0, saved_flops / self.rest_flops)

    def expected_ms(self, mode: str, changed: dict[str, Shape] | None = None, rest_saved: float = 0.0) -> float:
        """The model's time with every Linear on ``mode``, those in ``changed`` at their new shapes, and
        ``rest_saved`` FLOPs removed outside the Linears."""
        changed = changed or {}
        fp32, new = self.times[self.fp32_mode], self.times[mode]
        total = self.base_ms + sum(new[changed.get(n, s)] - fp32[s] for n, s in self.shapes.items())
        return max(total - self.rest_saving_ms(rest_saved), 0.0)

    def group_ms(self, mode: str, shapes: dict[str, Shape]) -> float:
        """The summed time of the Linears ``shapes`` (name → shape) on ``mode``."""
        return sum(self.times[mode][s] for s in shapes.values())


def probe_modes(paths: list[ProbePath], shapes: set[Shape], rows: int,
                progress: Any = None) -> tuple[dict[str, dict[Shape, float]], dict[str, str]]:
    """Time every path on every shape: (label → shape → ms, label → why it failed).

    A path failing on any shape is left out whole (no partial table); the caller says so.
    """
    say = progress or (lambda text: None)
    times: dict[str, dict[Shape, float]] = {}
    failed: dict[str, str] = {}
    for path in paths:
        say(f"probing {path.label} on {len(shapes)} shape(s)")
        try:
            times[path.label] = {s: time_path(path, s, rows) for s in sorted(shapes)}
        except Exception as exc:  # noqa: BLE001 - a mode that cannot run is not offered, and is reported
            failed[path.label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return times, failed


def allocate_latency(groups: list[GroupSensitivity], timing: LatencyModel, mode: str,
                     target_ms: float) -> tuple[dict[str, float], float, float]:
    """One ratio per group (absent: none removed) on ``mode`` whose expected time fits ``target_ms`` at least summed
    divergence; (ratios, expected ms, summed divergence). Raises ConfigError when even the largest ratios do not fit.
    """
    from slimkit.auto.plan import knapsack

    # a group's weight in the knapsack: its Linears' time, less the rest's time its option removes,
    # offset by the most that group can remove so no weight is negative
    offset = [max((timing.rest_saving_ms(o.rest_saved) for o in g.options.values()), default=0.0) for g in groups]
    fixed = timing.expected_ms(mode) - sum(timing.group_ms(mode, g.shapes) + c for g, c in zip(groups, offset))
    scale = 1000.0  # microseconds: the knapsack counts integer units
    dense = [math.ceil((timing.group_ms(mode, g.shapes) + c) * scale) for g, c in zip(groups, offset)]
    options = [[(math.ceil((timing.group_ms(mode, {**g.shapes, **o.shapes}) + c - timing.rest_saving_ms(o.rest_saved))
                           * scale), o.divergence) for o in g.options.values()] for g, c in zip(groups, offset)]
    room = target_ms - fixed
    # Exact when no Linear is shared between groups; otherwise the summed savings overstate a shared layer's
    # (its time is a product of both sides), so the true expectation is checked and the room narrowed.
    for _ in range(12):
        picked = knapsack(dense, options, max(0, math.floor(room * scale + 1e-6))) if room > 0 else None  # float fuzz
        if picked is None:
            break
        ratios, changes, cost, saved = {}, [], 0.0, 0.0
        for g, j in zip(groups, picked):
            if j is not None:
                option = list(g.options.values())[j]
                ratios[g.root] = option.ratio
                changes.append(option.shapes)
                cost += option.divergence
                saved += option.rest_saved
        expected = timing.expected_ms(mode, merge_shapes(*changes), saved)
        if expected <= target_ms + 1e-9:
            return ratios, expected, cost
        room -= (expected - target_ms) + 1.0 / scale
    fastest = timing.expected_ms(mode, merge_shapes(*(g.options[max(g.options)].shapes for g in groups)),
                                 sum(g.options[max(g.options)].rest_saved for g in groups))
    raise ConfigError(f"{mode}: the budget is {target_ms:.2f} ms, and removing {max(RATIOS):.0%} of every "
                      f"group is expected to take {fastest:.2f} ms: raise the budget")


def uniform_shapes(groups: list[GroupSensitivity], ratio: float) -> tuple[dict[str, float], dict[str, Shape], float]:
    """Every group that has ``ratio`` at it: (ratios, changed shapes, FLOPs removed outside the Linears)."""
    picked = [g for g in groups if ratio in g.options]
    return ({g.root: ratio for g in picked}, merge_shapes(*(g.options[ratio].shapes for g in picked)),
            sum(g.options[ratio].rest_saved for g in picked))


def recovery_features(model: nn.Module) -> dict[str, str]:
    """Hint pairs for a recovery: every repeated block against itself in the teacher (empty without blocks).

    Structured pruning keeps the residual width, so each block's output can be matched to the
    unpruned one's, layer by layer (the shipped MiniLM preset's recovery, CoFi-style).
    """
    from slimkit.core.calibration import find_blocks

    try:
        name, blocks = find_blocks(model)
    except Exception:  # noqa: BLE001 - no repeated blocks: the output loss alone
        return {}
    return {f"{name}.{i}": f"{name}.{i}" for i in range(len(blocks))}


class LatencyJudge:
    """Times a model against the fp32 one in ``runtime``, interleaved, on fixed inputs."""

    def __init__(self, model: nn.Module, runtime: str, data: Any, rounds: int = 3):
        """``data``: the task's eval data (auto passes the calibration split's) the timing inputs come from."""
        task = task_of(model)
        self.runtime, self.rounds = runtime, rounds
        self.generates = bool(task.generates)
        if self.generates:
            self.prompt = task.generation_prompt(model, data, 64)
            self.inputs, self.rows = None, 1
            self.flops_inputs = None  # decoding: the Linears' weights dominate; the rest is taken as fixed
            self.unit = "ms per decoded token (batch 1, KV cache)"
        else:
            self.inputs, batch, seq = task.latency_inputs(model, data)
            self.rows = batch * (seq or 1)
            self.flops_inputs = self.inputs  # what the rest's FLOPs are counted on
            self.unit = f"ms per batch of {batch}" + (f" × {seq} tokens" if seq else "")
        self._tmp = tempfile.TemporaryDirectory(prefix="slimkit-auto-time-")
        self.fp32 = self.runner(model, "fp32")

    def runner(self, model: nn.Module, tag: str) -> Any:
        """A no-argument callable running ``model`` once as the runtime would (ORT: exported, in a session)."""
        if self.generates:
            from slimkit.evaluation.generation import measure_generation

            return lambda: 1e3 / measure_generation(model, self.prompt, new_tokens=32, runs=1).decode_tokens_per_s
        if self.runtime == "onnxruntime":
            from slimkit.export.onnx import export_onnx
            from slimkit.export.ort import ort_session, run_onnx

            file = Path(self._tmp.name) / tag / "model.onnx"
            file.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(copy.deepcopy(model), file)
            session = ort_session(file, threads=torch.get_num_threads())
            feed = self.inputs if isinstance(self.inputs, dict) else {"input": self.inputs}
            return lambda: run_onnx(session, feed)
        from slimkit.core.calibration import run_model

        def forward() -> None:
            with torch.no_grad():
                run_model(model, self.inputs)
        return forward

    def _ms(self, run: Any) -> float:
        return run() if self.generates else fastest_ms(run, budget_s=1.0, runs=7)

    def base_ms(self) -> float:
        """The fp32 model's time."""
        return self._ms(self.fp32)

    def ratio(self, model: nn.Module, tag: str) -> tuple[float, float]:
        """(median over rounds of the model's time / fp32's measured beside it, the model's median ms)."""
        run = self.runner(model, tag)
        ratios, times = [], []
        for k in range(self.rounds):
            pair = (run, self.fp32) if k % 2 == 0 else (self.fp32, run)  # alternate who goes first
            first, second = (self._ms(f) for f in pair)
            mine, base = (first, second) if k % 2 == 0 else (second, first)
            ratios.append(mine / base)
            times.append(mine)
        return statistics.median(ratios), statistics.median(times)

    def close(self) -> None:
        """Delete the exported files."""
        self._tmp.cleanup()
