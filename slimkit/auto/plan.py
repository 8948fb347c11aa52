"""``slimkit auto``: one budget, per-layer choices across families, a measured Pareto front, a recipe.

1. Every Linear (and embedding table) is tried alone at each setting of each family
   (``sensitivity.layer_sensitivity``): a (bytes, output divergence) point per option.
2. For each set of families allowed (quantize; quantize + prune; quantize + factorize; all
   three), one option per layer is chosen under the budget, treating the divergences as
   additive: an exact multiple-choice knapsack by dynamic programming over the bytes
   (``knapsack``; ``allocation.allocate_budget``'s lower-hull greedy is optimal only at the
   totals it lands on, and can leave a budget partly unused).
3. Each allocation becomes a plan: one step per (family, setting) group with the layers' exact
   names (factorize, then prune, then quantize: the order steps compose in). The uniform
   single-family plans (int8 and int4 of every layer, 50% of every layer pruned, half of every
   layer's rank) are measured beside them.
4. Every plan runs for real on a copy: bytes of the saved folder, the task's headline quality
   on the calibration split (the eval split stays unseen). A plan whose folder overshoots the
   budget is allocated again at a budget smaller by the overshoot, once.
5. The winner is the best-quality plan within the budget (and ``max_drop``); the front is the
   Pareto set of (bytes, quality) over every measured plan.

Budgets: ``size=F`` (the saved folder at most F × the fp32 folder), ``bits=B`` (the measured
layers' stored bits per weight at most B, scales included) or ``latency=F`` (at most F × the
fp32 model's time in the runtime: structured ratios per group and int8 kernels, allocated
from measured time per Linear shape; see ``auto.latency``).

Trials (the plans' measurements) run in this process, in ``jobs`` forked processes, or as
Ray tasks (``auto.trials``); times are measured afterwards, one plan at a time. With
``recover_steps``, the winning plan, when it prunes or factorizes, is run once more with a
distillation recovery of that many steps between its pruning and its quantization, and
replaces the winner when it still fits.
"""

from __future__ import annotations

import base64
import copy
import io
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.auto.advise import headline, relative_drop
from slimkit.auto.latency import (
    RATIOS,
    GroupSensitivity,
    LatencyJudge,
    LatencyModel,
    allocate_latency,
    linear_shapes,
    possible_shapes,
    probe_modes,
    prune_step,
    recovery_features,
    rest_flops,
    structural_sensitivity,
    uniform_shapes,
)
from slimkit.auto.probes import ProbePath
from slimkit.auto.sensitivity import (
    MAX_ROWS,
    Sensitivity,
    batch_rows,
    first_rows,
    layer_sensitivity,
    sensitivity_group,
)
from slimkit.auto.trials import TrialSetup, run_trials
from slimkit.core.calibration import trim_padding
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.io import save
from slimkit.core.measure import size_on_disk
from slimkit.distillation.distill import Distill
from slimkit.evaluation.report import QUALITY_DIRECTIONS
from slimkit.factorization.svd import SVD
from slimkit.pruning.magnitude import Magnitude
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.schema import Recipe, Stage
from slimkit.tasks import task_of

BUDGET_KINDS = ("size", "bits", "latency")
FAMILY_SETS: tuple[tuple[str, ...], ...] = (("quantize",), ("quantize", "prune"), ("quantize", "factorize"),
                                            ("quantize", "prune", "factorize"))
#: single-family plans measured beside the allocated ones: (label, family, setting for every layer)
UNIFORM = (("int8 every layer", "quantize", 8), ("int4 every layer", "quantize", 4),
           ("50% of every layer pruned", "prune", 0.5), ("every layer at half its rank", "factorize", 0.5))
STAGE_ORDER = ("factorize", "prune", "distill", "quantize")


@dataclass(frozen=True)
class Budget:
    """What a plan must fit: ``size`` (fraction of the fp32 folder's bytes) or ``bits`` (per weight)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"size=0.25"``, ``"bits=4.5"`` or ``"latency=0.5"``."""
        kind, sep, value = str(text).partition("=")
        kind = kind.strip()
        if not sep or kind not in BUDGET_KINDS:
            raise ConfigError(f"budget {text!r}: write size=F (a fraction of the fp32 size on disk, e.g. size=0.25), "
                              "bits=B (stored bits per weight, e.g. bits=4.5) or latency=F (a fraction of the fp32 "
                              "model's time, e.g. latency=0.5)")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"budget {text!r}: {value!r} is not a number") from None
        if kind == "size" and not 0 < number < 1:
            raise ConfigError(f"budget {text!r}: a size budget is a fraction in (0, 1) of the fp32 size")
        if kind == "latency" and not 0 < number < 1:
            raise ConfigError(f"budget {text!r}: a latency budget is a fraction in (0, 1) of the fp32 model's time")
        if kind == "bits" and not 1 <= number < 32:
            raise ConfigError(f"budget {text!r}: a bits budget is in [1, 32) bits per weight")
        return cls(kind, number)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass
class Plan:
    """One per-layer assignment, its steps, and what it measured."""

    name: str
    choices: dict[str, tuple[str, float]]  # layer -> (family, setting); a layer absent stays fp32
    steps: tuple[Config, ...]
    allocated: bool  # from the budget allocation (False: a uniform single-family plan)
    expected_bytes: int = 0
    expected_divergence: float = 0.0
    size_bytes: int | None = None
    bits: float | None = None
    quality: float | None = None
    drop: float | None = None
    seconds: float | None = None
    error: str | None = None
    on_front: bool = False
    note: str = ""
    mode: str = ""  # latency budgets: how the Linears run (fp32 or an int8 path of the runtime)
    expected_ms: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None  # measured time / fp32's, interleaved

    def recipe(self, model: str | None) -> Recipe:
        """The plan as a recipe: one stage per family, in the order steps compose."""
        stages = []
        for family in STAGE_ORDER:
            steps = tuple(s for s in self.steps if s.family == family)
            if steps:
                stages.append(Stage(family, steps))
        return Recipe(stages=tuple(stages), model=model)

    def to_dict(self, model: str | None = None) -> dict[str, Any]:
        """JSON-ready, with the recipe as YAML text."""
        counts: dict[str, int] = {}
        for fam, k in self.choices.values():  # a layer (or, latency budgets, a structural group) per entry
            key = f"{fam} {k:g}"
            counts[key] = counts.get(key, 0) + 1
        return {"name": self.name, "allocated": self.allocated, "layers_by_choice": counts,
                "expected_bytes": self.expected_bytes, "expected_divergence": self.expected_divergence,
                "size_bytes": self.size_bytes, "bits_per_weight": self.bits, "quality": self.quality,
                "drop": self.drop, "seconds": self.seconds, "error": self.error, "on_front": self.on_front,
                "note": self.note, "mode": self.mode or None, "expected_ms": self.expected_ms,
                "latency_ms": self.latency_ms, "latency_ratio": self.latency_ratio,
                "recipe": self.recipe(model).to_yaml() if self.steps else None}


def _exact(name: str) -> str:
    return "re:" + re.escape(name)


def plan_steps(model: nn.Module, choices: dict[str, tuple[str, float]]) -> tuple[Config, ...]:
    """One step per (family, setting) group with exact layer names, factorize → prune → quantize.

    Quantized Linears and embedding rows use the sensitivity measurement's group rule (128,
    else 32, else per channel), so what was measured is what runs.
    """
    groups: dict[tuple, list[str]] = {}
    for name, (family, setting) in choices.items():
        module = model.get_submodule(name)
        if family == "quantize":
            is_table = isinstance(module, nn.Embedding)
            width = module.weight.shape[1]
            key: tuple = (family, int(setting), sensitivity_group(width), is_table)
        else:
            key = (family, float(setting))
        groups.setdefault(key, []).append(name)
    steps: list[Config] = []
    for family in STAGE_ORDER:
        for key in sorted((k for k in groups if k[0] == family), key=str):
            include = tuple(_exact(n) for n in sorted(groups[key]))
            if family == "factorize":
                steps.append(SVD(param_ratio=key[1], include=include))
            elif family == "prune":
                steps.append(Magnitude(sparsity=key[1], scope="layer", keep_masks=False, include=include))
            else:
                _, bits, group, is_table = key
                steps.append(RTN(bits=bits, group_size=group, symmetric=True, embeddings=is_table, include=include))
    return tuple(steps)


def knapsack(dense: list[int], options: list[list[tuple[int, float]]], budget: int,
             resolution: int = 20000) -> list[int | None] | None:
    """Exact multiple-choice knapsack: per layer an option index (None: dense) minimising the summed cost
    with summed bytes ≤ ``budget``; None when nothing fits.

    Bytes are counted in units of ⌈budget / resolution⌉, each option's rounded *up*, so every
    answer truly fits; it is optimal among the choices that still fit after that rounding (exact
    for budgets under ``resolution`` bytes). Dynamic programming over the units, O(layers ×
    options × resolution) with numpy.
    """
    import numpy as np

    unit = max(1, math.ceil(budget / resolution))
    cap = budget // unit
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = []
    for d, opts in zip(dense, options):
        choices = [(math.ceil(d / unit), 0.0, None)] + [(math.ceil(b / unit), float(c), i) for i, (b, c) in enumerate(opts)]
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -2, dtype=np.int64)  # -2: unreachable, -1: dense, i: option i
        for w, c, i in choices:
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[:cap + 1 - w] + c
            better = cand < new
            new[better] = cand[better]
            pick[better] = -1 if i is None else i
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))
    out: list[int | None] = []
    for d, opts, pick in zip(reversed(dense), reversed(options), reversed(picks)):
        i = int(pick[c])
        out.append(None if i == -1 else i)
        c -= math.ceil((d if i == -1 else opts[i][0]) / unit)
    return out[::-1]


def allocate(sens: Sensitivity, target_bytes: int, families: tuple[str, ...]) -> tuple[dict[str, tuple[str, float]], int, float]:
    """The per-layer choices (among ``families``) whose measured layers fit ``target_bytes`` at least summed divergence.

    An exact knapsack (``knapsack``) over each layer's options and its dense form. Returns
    (choices, bytes of the measured layers, summed divergence).
    """
    dense = [s.dense_bytes for s in sens.layers]
    options: list[list[tuple[int, float]]] = []
    labels: list[list[tuple[str, float]]] = []
    for s in sens.layers:
        opts, labs = [], []
        for fam in families:
            for k, (nbytes, cost) in s.curves.get(fam, {}).items():
                opts.append((nbytes, cost))
                labs.append((fam, k))
        options.append(opts)
        labels.append(labs)
    picked = knapsack(dense, options, max(0, int(target_bytes)))
    if picked is None:
        smallest = sum(min([d] + [b for b, _ in o]) for d, o in zip(dense, options))
        raise ConfigError(f"the budget leaves {int(target_bytes):,} bytes for the compressible layers; with "
                          f"{' + '.join(families)} they take at least {smallest:,}: raise the budget")
    choices = {s.name: labels[i][j] for i, (s, j) in enumerate(zip(sens.layers, picked)) if j is not None}
    nbytes = sum(options[i][j][0] if j is not None else dense[i] for i, j in enumerate(picked))
    cost = sum(options[i][j][1] for i, j in enumerate(picked) if j is not None)
    return choices, nbytes, cost


def uniform_choices(sens: Sensitivity, family: str, setting: float) -> dict[str, tuple[str, float]]:
    """Every measured layer that has ``family`` at ``setting`` (embedding rows only quantize)."""
    return {s.name: (family, setting) for s in sens.layers if setting in s.curves.get(family, {})}


@dataclass
class AutoResult:
    """The budget, every measured plan (ranked: the winner first), the front and the sensitivity measured."""

    budget: Budget
    plans: list[Plan]
    winner: Plan | None
    sensitivity: Sensitivity | None  # per layer (size and bits budgets)
    fp32_bytes: int
    baseline_quality: float
    metric: str
    limit_bytes: int | None
    max_drop: float | None = None
    model_name: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    groups: list[GroupSensitivity] = field(default_factory=list)  # per structural group (latency budgets)
    runtime: str | None = None
    fp32_ms: float | None = None
    time_unit: str = ""

    @property
    def by_latency(self) -> bool:
        """Whether plans are judged by their measured time (a latency budget) rather than their bytes."""
        return self.budget.kind == "latency"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"budget": str(self.budget), "max_drop": self.max_drop, "fp32_bytes": self.fp32_bytes,
                "limit_bytes": self.limit_bytes, "metric": self.metric, "baseline_quality": self.baseline_quality,
                "runtime": self.runtime, "fp32_ms": self.fp32_ms, "time_unit": self.time_unit or None,
                "winner": None if self.winner is None else self.winner.name, "seconds": round(self.seconds, 1),
                "plans": [p.to_dict(self.model_name) for p in self.plans], "notes": self.notes,
                "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
                "group_sensitivity": [g.to_dict() for g in self.groups]}

    def to_markdown(self) -> str:
        """The plans as a table (the winner first), the budget and the front."""
        head = (f"fp32: {self.fp32_bytes / 1e6:.2f} MB on disk, {self.metric} {self.baseline_quality:.5g} on the "
                "calibration split")
        if self.by_latency:
            head += (f", {self.fp32_ms:.2f} {self.time_unit} in {self.runtime}; budget {self.budget.value:g}× that "
                     "time, measured as a ratio to fp32 timed beside each plan.")
        else:
            head += (f"; budget {self.limit_bytes / 1e6:.2f} MB." if self.limit_bytes else ".")
        time_cols = "| mode | expected × fp32 time | measured × fp32 time | ms " if self.by_latency else ""
        lines = [f"# slimkit auto: {self.model_name or 'model'} at {self.budget}", "", head, "",
                 (f"| plan | allocated {time_cols}| size on disk | × fp32 | bits/weight (layers) | "
                  f"{self.metric} (calibration) | drop | Pareto front | notes |"),
                 "|:---|:---" + ("|:---|---:|---:|---:" if self.by_latency else "") + "|---:|---:|---:|---:|---:|:---|:---|"]
        for p in self.plans:
            size = "" if p.size_bytes is None else f"{p.size_bytes / 1e6:.2f} MB"
            ratio = "" if p.size_bytes is None else f"{p.size_bytes / self.fp32_bytes:.3f}×"
            timing = ""
            if self.by_latency:
                expected = "" if p.expected_ms is None or not self.fp32_ms else f"{p.expected_ms / self.fp32_ms:.3f}×"
                timing = (f"| {p.mode} | {expected} | {'' if p.latency_ratio is None else f'{p.latency_ratio:.3f}×'} "
                          f"| {'' if p.latency_ms is None else f'{p.latency_ms:.2f}'} ")
            lines.append(f"| {p.name}{' (winner)' if p is self.winner else ''} | {'yes' if p.allocated else 'uniform'} "
                         f"{timing}| {size} | {ratio} | {'' if p.bits is None else f'{p.bits:.2f}'} | "
                         f"{'' if p.quality is None else f'{p.quality:.5g}'} | "
                         f"{'' if p.drop is None else f'{p.drop:.2%}'} | {'yes' if p.on_front else ''} | "
                         f"{p.error or p.note} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        if self.groups:
            lines += ["", ("Structural sensitivity (output divergence with one group pruned alone, calibration "
                      "split):"), "", "| group | units | " + " | ".join(f"{r:.0%} removed" for r in RATIOS) + " |",
                      "|:---|---:|" + "---:|" * len(RATIOS)]
            for g in self.groups:
                cells = " | ".join("" if r not in g.options else f"{g.options[r].divergence:.4g}" for r in RATIOS)
                lines.append(f"| {g.root} | {g.units} {g.unit}s | {cells} |")
        return "\n".join(lines) + "\n"

    def _cost(self, p: Plan) -> float | None:
        if self.by_latency:
            return p.latency_ratio
        return None if p.size_bytes is None else p.size_bytes / 1e6

    def front_png(self) -> str:
        """PNG (base64): size (or time) vs quality of every plan, allocated and uniform apart, the front joined, the budget."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2))
        ax = fig.subplots()
        for allocated, marker, label in ((True, "o", "allocated per layer"), (False, "s", "uniform")):
            pts = [(self._cost(p), p.quality, p.name) for p in self.plans
                   if p.allocated == allocated and p.quality is not None and self._cost(p) is not None]
            if pts:
                ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker, label=label)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = sorted((self._cost(p), p.quality) for p in self.plans if p.on_front)
        if front:
            ax.plot([x for x, _ in front], [y for _, y in front], "k--", lw=0.8, label="Pareto front")
        limit = self.budget.value if self.by_latency else (self.limit_bytes or 0) / 1e6
        if limit:
            ax.axvline(limit, color="r", lw=0.8, label=f"budget {self.budget}")
        ax.set_xlabel(f"time × fp32 ({self.runtime}, measured)" if self.by_latency else "size on disk (MB)")
        ax.set_ylabel(f"{self.metric} (calibration split)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def to_html(self) -> str:
        """One self-contained page: the table, the front plot and the sensitivity plot."""
        import html

        axis = "time" if self.by_latency else "size"
        page = ("<!doctype html><meta charset='utf-8'><title>slimkit auto</title>"
                "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}pre{white-space:pre-wrap}</style>"
                f"<pre>{html.escape(self.to_markdown())}</pre>"
                f'<h2>Plans: {axis} vs quality</h2><img id="front-plot" alt="Pareto front" '
                f'src="data:image/png;base64,{self.front_png()}">')
        if self.sensitivity is not None:
            page += (f'<h2>Per-layer sensitivity</h2><img id="sensitivity-plot" alt="per-layer sensitivity" '
                     f'src="data:image/png;base64,{self.sensitivity.plot_png()}">')
        return page + "\n"


def _same_as(plan: Plan, label: str) -> Plan:
    """A copy of ``plan`` under another family mix's name (its allocation chose the same options)."""
    twin = copy.copy(plan)
    twin.name = label
    twin.note = f"the same choices as {plan.name}: the added families won no layer"
    return twin


def _pareto(plans: list[Plan], lower_better: bool, cost: Any) -> None:
    """Mark the plans no other plan beats on both ``cost(plan)`` (lower) and quality."""
    better = (lambda a, b: a < b) if lower_better else (lambda a, b: a > b)
    done = [p for p in plans if cost(p) is not None and p.quality is not None]
    for p in done:
        p.on_front = not any(q is not p and cost(q) <= cost(p) and not better(p.quality, q.quality)
                             and (cost(q) < cost(p) or better(q.quality, p.quality)) for q in done)


def _size_plans(sens: Sensitivity, model: nn.Module, target: int) -> tuple[list[Plan], list[str]]:
    """One allocated plan per family mix (the same allocation listed once, measured once) and the uniform ones."""
    plans: list[Plan] = []
    notes: list[str] = []
    for families in FAMILY_SETS:
        label = "allocated: " + " + ".join(families)
        try:
            choices, nbytes, cost = allocate(sens, target, families)
        except ConfigError as exc:
            notes.append(f"{label}: {exc}")
            continue
        same = next((p for p in plans if p.allocated and p.choices == choices), None)
        plan = Plan(label, choices, plan_steps(model, choices), True, nbytes, cost)
        if same is not None:
            plan.note = f"same as {same.name}"  # resolved after measuring
        plans.append(plan)
    for label, family, setting in UNIFORM:
        choices = uniform_choices(sens, family, setting)
        if choices:
            plans.append(Plan(label, choices, plan_steps(model, choices), False,
                              sum(s.curves[family][setting][0] if s.name in choices else s.dense_bytes
                                  for s in sens.layers),
                              sum(s.curves[family][setting][1] for s in sens.layers if s.name in choices)))
    return plans, notes


def default_runtime(model: nn.Module) -> str:
    """Where a latency budget is timed by default: ONNX Runtime for a model that does not generate, when installed."""
    import importlib.util

    generates = bool(task_of(model).generates)
    return "onnxruntime" if not generates and importlib.util.find_spec("onnxruntime") else "torch"


def _latency_modes(model: nn.Module, runtime: str, batches: list[Any]) -> tuple[str, list[ProbePath], dict[str, Config]]:
    """(fp32 label, the probe paths of ``runtime`` worth timing, the quantize step each non-fp32 path's plans use).

    The paths and steps are advise's: its probe for a label times exactly the layer its
    candidate of that label builds.
    """
    from slimkit.auto.advise import ORT_FP32, TORCH_FP32, build_candidates, probe_paths
    from slimkit.auto.facts import machine_facts, model_facts

    facts = model_facts(model, batches)
    machine = machine_facts()
    if runtime not in machine.runtimes:
        raise ConfigError(f"runtime {runtime!r} is not installed here (installed: {', '.join(machine.runtimes)})")
    if runtime == "onnxruntime" and facts.generates:
        raise ConfigError("a model that generates is timed decoding token by token in torch: use --runtime torch")
    fp32 = ORT_FP32 if runtime == "onnxruntime" else TORCH_FP32
    steps = {c.path: c.steps[0] for c in build_candidates(facts, machine, keep_architecture=True)
             if c.runtime == runtime and len(c.steps) == 1}
    paths = [p for p in probe_paths(facts, machine)
             if p.runtime == runtime and p.shape_change is None and (p.label == fp32 or p.label in steps)]
    return fp32, paths, steps


def _latency_plan(name: str, ratios: dict[str, float], allocated: bool, expected: float, cost: float, mode: str,
                  quant: Config | None, outputs: dict[str, tuple[str, ...]]) -> Plan:
    """A plan removing ``ratios`` of the named groups' units, its Linears then run on ``mode`` (``quant``'s step)."""
    steps = ((prune_step(ratios, outputs),) if ratios else ()) + ((quant,) if quant is not None else ())
    return Plan(name, {r: ("structured", k) for r, k in ratios.items()}, steps, allocated,
                expected_divergence=cost, mode=mode, expected_ms=expected)


def _latency_plans(groups: list[GroupSensitivity], timing: LatencyModel, steps: dict[str, Config],
                   target_ms: float) -> tuple[list[Plan], list[str]]:
    """Per mode (fp32 and each int8 path expected faster than fp32): the allocated plan, the mode alone, and
    25% / 50% of every group removed."""
    plans: list[Plan] = []
    notes: list[str] = []
    fp32_total = timing.expected_ms(timing.fp32_mode)
    outputs = {g.root: g.outputs for g in groups}
    for mode in timing.times:
        quant = steps.get(mode)
        if mode != timing.fp32_mode and timing.expected_ms(mode) >= fp32_total:
            notes.append(f"{mode}: not planned; the probes expect it slower than fp32 "
                         f"({timing.expected_ms(mode):.2f} vs {fp32_total:.2f} ms)")
            continue
        try:
            ratios, expected, cost = allocate_latency(groups, timing, mode, target_ms)
            plans.append(_latency_plan(f"allocated: structured + {mode}", ratios, True, expected, cost, mode, quant,
                                       outputs))
        except ConfigError as exc:
            notes.append(f"allocated on {mode}: {exc}")
        if quant is not None:
            plans.append(_latency_plan(f"{mode} alone", {}, False, timing.expected_ms(mode), 0.0, mode, quant, outputs))
        for r in (0.25, 0.5):
            ratios, changed, saved = uniform_shapes(groups, r)
            cost = sum(g.options[r].divergence for g in groups if r in g.options)
            plans.append(_latency_plan(f"{r:.0%} of every group + {mode}", ratios, False,
                                       timing.expected_ms(mode, changed, saved), cost, mode, quant, outputs))
    return plans, notes


def _with_recovery(plan: Plan, model: nn.Module, steps: int, calib: Any) -> Plan:
    """``plan`` with a distillation recovery of ``steps`` steps after its pruning / factorization, before quantizing.

    16 sequences a step for the built-in tasks (the shipped presets' recovery); a generic
    task trains on its own calibration batches, whose row count is fixed.
    """
    rows = batch_rows(calib.batches[0]) if task_of(model).kind == "module" and calib.batches else 16
    recovery = Distill(student="", steps=steps, lr=5e-4, warmup_steps=min(30, steps // 10), batch_size=rows,
                       eval_every=max(1, steps // 3), features=tuple(recovery_features(model).items()),
                       feature_loss="hint", feature_weight=1.0)
    twin = copy.copy(plan)
    twin.name = f"{plan.name} + {steps}-step recovery"
    twin.steps = plan.steps + (recovery,)  # Plan.recipe orders the stages: the recovery lands before quantize
    twin.note = f"{plan.name} (the winner before recovery) trained against the original; figures after training"
    for attr in ("size_bytes", "bits", "quality", "drop", "seconds", "error", "latency_ms", "latency_ratio"):
        setattr(twin, attr, None)
    twin.on_front = False
    return twin


def _ordered(steps: tuple[Config, ...]) -> tuple[Config, ...]:
    return tuple(s for family in STAGE_ORDER for s in steps if s.family == family)


def _rescaled(plans: list[Plan], groups: list[GroupSensitivity], timing: LatencyModel, fraction: float,
              quant_steps: dict[str, Config], measure: Any, notes: list[str]) -> list[Plan]:
    """Second allocations for latency plans whose measured time missed the budget either way.

    The probes time Linears alone; the model's other work (attention scores over pruned heads,
    the runtime's fusions) changes too, so an allocated plan can land well under or over its
    expected time. Its measured / expected ratio rescales the time model for its kernel path,
    and the group ratios are allocated once more against that (a secant step toward the budget,
    kept beside the first plan: both are measured, the better one that fits wins).
    """
    outputs = {g.root: g.outputs for g in groups}
    again = []
    for p in plans:
        if not p.allocated or p.error or p.latency_ratio is None or not p.expected_ms:
            continue
        if 0.9 * fraction <= p.latency_ratio <= fraction:
            continue  # close enough under the budget
        scale = p.latency_ratio * timing.base_ms / p.expected_ms  # measured / expected
        try:
            ratios, expected, cost = allocate_latency(groups, timing, p.mode, fraction * timing.base_ms / scale)
        except ConfigError as exc:
            notes.append(f"{p.name}, allocated again with its time model rescaled ×{scale:.2f}: {exc}")
            continue
        if {k: v for k, (_, v) in p.choices.items()} == ratios:
            continue
        twin = _latency_plan(f"{p.name} (time model ×{scale:.2f})", ratios, True, expected * scale, cost, p.mode,
                             quant_steps.get(p.mode), outputs)
        twin.note = (f"allocated again: {p.name} measured {p.latency_ratio:.3f}× against an expected "
                     f"{p.expected_ms / timing.base_ms:.3f}×, so its path's times were rescaled by that")
        again.append(twin)
    measure(again)
    return again


def auto(model: nn.Module, budget: Budget | str, max_drop: float | None = None, *, calibration: Any = None,
         model_name: str | None = None, progress: Any = None, runtime: str | None = None, recover_steps: int = 0,
         jobs: int = 1, ray_address: str | None = None) -> AutoResult:
    """Allocate per-layer bits, sparsity and rank (or, for a latency budget, per-group structured ratios and
    int8 kernels) under ``budget``, measure the plans, return them ranked.

    ``model`` is not modified. ``max_drop``: the winner's headline quality may fall at most this
    fraction (0.01 = 1%) on the calibration split. ``runtime``: where a latency budget is timed
    ("onnxruntime" or "torch"; default: ONNX Runtime for a model that does not generate).
    ``recover_steps``: distillation steps for the winner when it prunes or factorizes (0: none).
    ``jobs`` / ``ray_address``: where trials run (``auto.trials``). See the module docstring.
    """
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if max_drop is not None and not 0 <= max_drop < 1:
        raise ConfigError(f"max_drop {max_drop!r} must be a fraction in [0, 1), e.g. 0.01 for 1%")
    if not isinstance(recover_steps, int) or recover_steps < 0:
        raise ConfigError(f"recover_steps {recover_steps!r}: distillation steps for the winner, an integer >= 0")
    if runtime is not None and runtime not in ("torch", "onnxruntime"):
        raise ConfigError(f"runtime {runtime!r}: choose torch or onnxruntime")
    if runtime is not None and budget.kind != "latency":
        raise ConfigError(f"runtime {runtime!r} is where a latency budget is timed; a {budget.kind} budget needs none")
    say = progress or (lambda text: None)
    start = time.perf_counter()
    model.eval()
    task = task_of(model)
    calib = task.calibration(model, calibration)
    data = task.eval_data(model, calibration, max_tokens=8192, split="calibration")
    reference = task.reference(model, data)
    base = headline(task.measure_quality(model, data, reference)[0])
    if base is None:
        raise ConfigError(f"auto compares plans by quality, and a {task.kind} model's task measures none; attach a "
                          "task with a metric (GenericTask(metric=...))")
    metric, base_value = base
    lower_better = QUALITY_DIRECTIONS[metric] == "lower"
    with tempfile.TemporaryDirectory(prefix="slimkit-auto-") as tmp:
        fp32_bytes = size_on_disk(save(model, Path(tmp) / "fp32"))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    sens: Sensitivity | None = None
    groups: list[GroupSensitivity] = []
    judge: LatencyJudge | None = None
    limit: int | None = None
    notes: list[str] = []
    sample = [trim_padding(b) for b in first_rows(calib.batches, MAX_ROWS)]
    if budget.kind == "latency":
        runtime = runtime or default_runtime(model)
        fp32_label, paths, quant_steps = _latency_modes(model, runtime, sample)
        say(f"fp32 time in {runtime}")
        judge = LatencyJudge(model, runtime, data)
        say("structural sensitivity")
        groups = structural_sensitivity(model, sample, timing_inputs=judge.flops_inputs)
        shapes = linear_shapes(model)
        times, failed = probe_modes(paths, possible_shapes(shapes, groups), judge.rows, say)
        notes = [f"{label}: not planned; its probe failed ({why})" for label, why in failed.items()]
        if fp32_label not in times:
            raise ConfigError(f"{fp32_label}: the fp32 probe failed, so no plan can be timed in {runtime}")
        timing = LatencyModel(runtime, judge.rows, judge.base_ms(), shapes, fp32_label, times,
                              rest_flops=0.0 if judge.flops_inputs is None else rest_flops(model, judge.flops_inputs))
        plans, more = _latency_plans(groups, timing, quant_steps, budget.value * timing.base_ms)
        notes += more
        names = list(shapes)
        n_weights = sum(math.prod(s) for s in shapes.values())
    else:
        say("per-layer sensitivity")
        sens = layer_sensitivity(model, calib.batches[:4],
                                 data_description=f"{min(4, len(calib.batches))} batch(es) of {calib.description}")
        names = [s.name for s in sens.layers]
        n_weights = sum(math.prod(s.shape) for s in sens.layers)
        layer_bytes = sum(s.dense_bytes for s in sens.layers)
        if budget.kind == "size":
            limit = int(budget.value * fp32_bytes)
            target = limit - (fp32_bytes - layer_bytes)  # everything else (norms, biases, files) stays as it is
        else:
            target = int(budget.value / 8 * n_weights)
        plans, notes = _size_plans(sens, model, target)
    setup = TrialSetup(model, calib, data, reference, metric, names, n_weights, keep_model=judge is not None)

    def fits(p: Plan) -> bool:
        if p.error or p.size_bytes is None:
            return False
        if budget.kind == "latency":
            return p.latency_ratio is not None and p.latency_ratio <= budget.value
        return p.size_bytes <= limit if limit is not None else (p.bits is not None and p.bits <= budget.value)

    def measure(batch: list[Plan]) -> None:
        todo = [p for p in batch if not p.note.startswith("same as ")]
        results = run_trials(setup, [_ordered(p.steps) for p in todo], jobs=jobs, ray_address=ray_address,
                             progress=say)
        for p, r in zip(todo, results):
            p.size_bytes, p.bits, p.quality, p.error, p.seconds = (r["size_bytes"], r["bits"], r["quality"],
                                                                   r["error"], r["seconds"])
            if p.quality is not None:
                p.drop = relative_drop(metric, base_value, p.quality)
            if judge is not None and r["model"] is not None:  # timed here, one plan at a time
                say(f"timing: {p.name}")
                try:
                    p.latency_ratio, p.latency_ms = judge.ratio(r["model"], f"plan{id(p)}")
                except Exception as exc:  # noqa: BLE001 - a plan its runtime cannot run is reported
                    p.error = f"timing in {judge.runtime} failed: {type(exc).__name__}: {str(exc)[:160]}"
        for i, p in enumerate(batch):
            if p.note.startswith("same as "):  # the extra families won no layer: the same plan, measured once
                twin = next(q for q in batch if q.name == p.note[len("same as "):])
                batch[i] = _same_as(twin, p.name)

    try:
        measure(plans)
        if budget.kind == "latency":
            plans += _rescaled(plans, groups, timing, budget.value, quant_steps, measure, notes)
        else:  # an allocated plan whose folder overshot (scales, files): once more, smaller by the overshoot
            redo = []
            for i, p in enumerate(plans):
                if not p.allocated or p.error or fits(p) or p.size_bytes is None \
                        or p.note.startswith("the same choices"):
                    continue
                over = (p.size_bytes - limit) if limit is not None else (p.bits - budget.value) / 8 * n_weights
                families = next(f for f in FAMILY_SETS if "allocated: " + " + ".join(f) == p.name)
                try:
                    choices, nbytes, cost = allocate(sens, int(target - over * 1.02), families)
                    redo.append((i, Plan(p.name, choices, plan_steps(model, choices), True, nbytes, cost)))
                except ConfigError as exc:
                    notes.append(f"{p.name}: {exc}")
            measure([p for _, p in redo])
            for i, p in redo:
                p.note = (p.note + "; " if p.note else "") + "allocated again: the first allocation overshot the budget"
                plans[i] = p
        _pareto(plans, lower_better, (lambda p: p.latency_ratio) if budget.kind == "latency" else
                (lambda p: p.size_bytes))
        ok = [p for p in plans if fits(p) and p.quality is not None and (max_drop is None or p.drop <= max_drop)]
        winner = min(ok, key=lambda p: (p.quality if lower_better else -p.quality)) if ok else None
        if winner is not None and recover_steps and any(s.family in ("prune", "factorize") for s in winner.steps):
            say(f"recovery: {recover_steps} distillation steps for {winner.name}")
            recovered = _with_recovery(winner, model, recover_steps, calib)
            measure([recovered])
            plans.append(recovered)
            if fits(recovered) and (max_drop is None or recovered.drop <= max_drop) and \
                    (recovered.quality < winner.quality if lower_better else recovered.quality > winner.quality):
                winner = recovered
            else:
                notes.append(f"the recovery did not give a better plan within the budget: {recovered.name} "
                             f"measured {recovered.quality} ({recovered.error or 'see the table'})")
    finally:
        if judge is not None:
            judge.close()
    if winner is None:
        notes.append("No plan fits the budget" + ("" if max_drop is None else " within max_drop") + ": raise it.")
    order = sorted(plans, key=lambda p: (p is not winner, not fits(p),
                                         math.inf if p.quality is None else (p.quality if lower_better else -p.quality)))
    result = AutoResult(budget, order, winner, sens, fp32_bytes, base_value, metric, limit, max_drop, model_name,
                        notes=notes, groups=groups, runtime=runtime, fp32_ms=None if judge is None else timing.base_ms,
                        time_unit="" if judge is None else judge.unit)
    result.seconds = time.perf_counter() - start
    return result
