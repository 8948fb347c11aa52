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

Budgets: ``size=F`` (the saved folder at most F × the fp32 folder) or ``bits=B`` (the measured
layers' stored bits per weight at most B, scales included).
"""

from __future__ import annotations

import base64
import copy
import io
import math
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.auto.advise import headline, relative_drop
from slimkit.auto.sensitivity import Sensitivity, layer_sensitivity, sensitivity_group
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.io import save
from slimkit.core.measure import size_on_disk
from slimkit.evaluation.report import QUALITY_DIRECTIONS
from slimkit.factorization.svd import SVD
from slimkit.pruning.magnitude import Magnitude
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.schema import Recipe, Stage
from slimkit.recipe.steps import apply_step
from slimkit.tasks import task_of

BUDGET_KINDS = ("size", "bits")
FAMILY_SETS: tuple[tuple[str, ...], ...] = (("quantize",), ("quantize", "prune"), ("quantize", "factorize"),
                                            ("quantize", "prune", "factorize"))
#: single-family plans measured beside the allocated ones: (label, family, setting for every layer)
UNIFORM = (("int8 every layer", "quantize", 8), ("int4 every layer", "quantize", 4),
           ("50% of every layer pruned", "prune", 0.5), ("every layer at half its rank", "factorize", 0.5))
STAGE_ORDER = ("factorize", "prune", "quantize")


@dataclass(frozen=True)
class Budget:
    """What a plan must fit: ``size`` (fraction of the fp32 folder's bytes) or ``bits`` (per weight)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"size=0.25"`` or ``"bits=4.5"``."""
        kind, sep, value = str(text).partition("=")
        kind = kind.strip()
        if not sep or kind not in BUDGET_KINDS:
            raise ConfigError(f"budget {text!r}: write size=F (a fraction of the fp32 size on disk, e.g. size=0.25) "
                              "or bits=B (stored bits per weight, e.g. bits=4.5)")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"budget {text!r}: {value!r} is not a number") from None
        if kind == "size" and not 0 < number < 1:
            raise ConfigError(f"budget {text!r}: a size budget is a fraction in (0, 1) of the fp32 size")
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
        for fam, k in self.choices.values():
            key = f"{fam} {k:g}"
            counts[key] = counts.get(key, 0) + 1
        return {"name": self.name, "allocated": self.allocated, "layers_by_choice": counts,
                "expected_bytes": self.expected_bytes, "expected_divergence": self.expected_divergence,
                "size_bytes": self.size_bytes, "bits_per_weight": self.bits, "quality": self.quality,
                "drop": self.drop, "seconds": self.seconds, "error": self.error, "on_front": self.on_front,
                "note": self.note,
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
    """The budget, every measured plan (ranked: the winner first), the front and the sensitivity."""

    budget: Budget
    plans: list[Plan]
    winner: Plan | None
    sensitivity: Sensitivity
    fp32_bytes: int
    baseline_quality: float
    metric: str
    limit_bytes: int | None
    max_drop: float | None = None
    model_name: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"budget": str(self.budget), "max_drop": self.max_drop, "fp32_bytes": self.fp32_bytes,
                "limit_bytes": self.limit_bytes, "metric": self.metric, "baseline_quality": self.baseline_quality,
                "winner": None if self.winner is None else self.winner.name, "seconds": round(self.seconds, 1),
                "plans": [p.to_dict(self.model_name) for p in self.plans], "notes": self.notes,
                "sensitivity": self.sensitivity.to_dict()}

    def to_markdown(self) -> str:
        """The plans as a table (the winner first), the budget and the front."""
        lines = [f"# slimkit auto: {self.model_name or 'model'} at {self.budget}", "",
                 f"fp32: {self.fp32_bytes / 1e6:.2f} MB on disk, {self.metric} {self.baseline_quality:.5g} on the "
                 "calibration split" + (f"; budget {self.limit_bytes / 1e6:.2f} MB" if self.limit_bytes else "") + ".",
                 "", ("| plan | allocated | size on disk | × fp32 | bits/weight (layers) | "
                 f"{self.metric} (calibration) | drop | Pareto front | notes |"),
                 "|:---|:---|---:|---:|---:|---:|---:|:---|:---|"]
        for p in self.plans:
            size = "" if p.size_bytes is None else f"{p.size_bytes / 1e6:.2f} MB"
            ratio = "" if p.size_bytes is None else f"{p.size_bytes / self.fp32_bytes:.3f}×"
            lines.append(f"| {p.name}{' (winner)' if p is self.winner else ''} | {'yes' if p.allocated else 'uniform'} "
                         f"| {size} | {ratio} | {'' if p.bits is None else f'{p.bits:.2f}'} | "
                         f"{'' if p.quality is None else f'{p.quality:.5g}'} | "
                         f"{'' if p.drop is None else f'{p.drop:.2%}'} | {'yes' if p.on_front else ''} | "
                         f"{p.error or p.note} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def front_png(self) -> str:
        """PNG (base64): size vs quality of every plan, allocated and uniform apart, the front joined, the budget."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2))
        ax = fig.subplots()
        for allocated, marker, label in ((True, "o", "allocated per layer"), (False, "s", "uniform, one family")):
            pts = [(p.size_bytes / 1e6, p.quality, p.name) for p in self.plans
                   if p.allocated == allocated and p.quality is not None and p.size_bytes]
            if pts:
                ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker, label=label)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = sorted((p.size_bytes / 1e6, p.quality) for p in self.plans if p.on_front)
        if front:
            ax.plot([x for x, _ in front], [y for _, y in front], "k--", lw=0.8, label="Pareto front")
        if self.limit_bytes:
            ax.axvline(self.limit_bytes / 1e6, color="r", lw=0.8, label=f"budget {self.budget}")
        ax.set_xlabel("size on disk (MB)")
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

        return ("<!doctype html><meta charset='utf-8'><title>slimkit auto</title>"
                "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}pre{white-space:pre-wrap}</style>"
                f"<pre>{html.escape(self.to_markdown())}</pre>"
                f'<h2>Plans: size vs quality</h2><img id="front-plot" alt="Pareto front" '
                f'src="data:image/png;base64,{self.front_png()}">'
                f'<h2>Per-layer sensitivity</h2><img id="sensitivity-plot" alt="per-layer sensitivity" '
                f'src="data:image/png;base64,{self.sensitivity.plot_png()}">\n')


def _measured_layer_bits(names: list[str], weights: int, folder: Path) -> float:
    """Stored bits per weight of layers ``names`` (``weights`` in all) in the saved file: every entry under their names."""
    from safetensors import safe_open

    owners = set(names)
    nbytes = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
            owner = key.split(".__")[0].rsplit(".", 1)[0]
            if owner in owners or owner.rsplit(".", 1)[0] in owners:  # FactorizedLinear: first/second
                view = f.get_slice(key)
                nbytes += math.prod(view.get_shape()) * _itemsize(view.get_dtype())
    return nbytes * 8 / max(weights, 1)


def _itemsize(dtype: str) -> int:
    from slimkit.core.sparse_storage import SAFETENSORS_DTYPES

    return SAFETENSORS_DTYPES[dtype].itemsize


def _same_as(plan: Plan, label: str) -> Plan:
    """A copy of ``plan`` under another family mix's name (its allocation chose the same options)."""
    twin = copy.copy(plan)
    twin.name = label
    twin.note = f"the same choices as {plan.name}: the added families won no layer"
    return twin


def _pareto(plans: list[Plan], lower_better: bool) -> None:
    done = [p for p in plans if p.size_bytes is not None and p.quality is not None]
    for p in done:
        better = (lambda a, b: a < b) if lower_better else (lambda a, b: a > b)
        p.on_front = not any(q is not p and q.size_bytes <= p.size_bytes and not better(p.quality, q.quality)
                             and (q.size_bytes < p.size_bytes or better(q.quality, p.quality)) for q in done)


def auto(model: nn.Module, budget: Budget | str, max_drop: float | None = None, *, calibration: Any = None,
         model_name: str | None = None, progress: Any = None) -> AutoResult:
    """Allocate per-layer bits, sparsity and rank under ``budget``, measure the plans, return them ranked.

    ``model`` is not modified. ``max_drop``: the winner's headline quality may fall at most this
    fraction (0.01 = 1%) on the calibration split. See the module docstring for the method.
    """
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if max_drop is not None and not 0 <= max_drop < 1:
        raise ConfigError(f"max_drop {max_drop!r} must be a fraction in [0, 1), e.g. 0.01 for 1%")
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
    say("per-layer sensitivity")
    sens = layer_sensitivity(model, calib.batches[:4],
                             data_description=f"{min(4, len(calib.batches))} batch(es) of {calib.description}")
    names = [s.name for s in sens.layers]
    n_weights = sum(math.prod(s.shape) for s in sens.layers)
    with tempfile.TemporaryDirectory(prefix="slimkit-auto-") as tmp:
        fp32_bytes = size_on_disk(save(model, Path(tmp) / "fp32"))
    layer_bytes = sum(s.dense_bytes for s in sens.layers)
    if budget.kind == "size":
        limit = int(budget.value * fp32_bytes)
        target = limit - (fp32_bytes - layer_bytes)  # everything else (norms, biases, files) stays as it is
    else:
        limit = None
        target = int(budget.value / 8 * n_weights)

    def fits(p: Plan) -> bool:
        if p.error or p.size_bytes is None:
            return False
        return p.size_bytes <= limit if limit is not None else (p.bits is not None and p.bits <= budget.value)

    def measure(p: Plan) -> None:
        say(f"plan: {p.name}")
        t = time.perf_counter()
        work = copy.deepcopy(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for step in p.steps:
                    apply_step(work, step, data=calib)
            with tempfile.TemporaryDirectory(prefix="slimkit-auto-") as tmp:
                folder = save(work, Path(tmp) / "m")
                p.size_bytes = size_on_disk(folder)
                p.bits = _measured_layer_bits(names, n_weights, folder)
            value = float(task.measure_quality(work, data, reference)[0][metric])
            p.quality = value
            p.drop = relative_drop(metric, base_value, value)
        except Exception as exc:  # noqa: BLE001 - a plan that cannot run is reported, the others still count
            p.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
        p.seconds = time.perf_counter() - t

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
        if same is not None:  # the extra families won no layer: the same plan, measured once
            plans.append(_same_as(same, label))
            continue
        plan = Plan(label, choices, plan_steps(model, choices), True, nbytes, cost)
        measure(plan)
        if not plan.error and not fits(plan):  # the folder overshot (scales, files): once more, smaller by it
            over = (plan.size_bytes - limit) if limit is not None else (plan.bits - budget.value) / 8 * n_weights
            try:
                choices, nbytes, cost = allocate(sens, int(target - over * 1.02), families)
                plan = Plan(label, choices, plan_steps(model, choices), True, nbytes, cost)
                measure(plan)
            except ConfigError as exc:
                notes.append(f"{label}: {exc}")
        plans.append(plan)
    for label, family, setting in UNIFORM:
        choices = uniform_choices(sens, family, setting)
        if choices:
            plan = Plan(label, choices, plan_steps(model, choices), False,
                        sum(s.curves[family][setting][0] if s.name in choices else s.dense_bytes for s in sens.layers),
                        sum(s.curves[family][setting][1] for s in sens.layers if s.name in choices))
            measure(plan)
            plans.append(plan)
    _pareto(plans, lower_better)
    ok = [p for p in plans if fits(p) and p.quality is not None and (max_drop is None or p.drop <= max_drop)]
    winner = min(ok, key=lambda p: (p.quality if lower_better else -p.quality)) if ok else None
    if winner is None:
        notes.append("No plan fits the budget" + ("" if max_drop is None else " within max_drop") + ": raise it.")
    order = sorted(plans, key=lambda p: (p is not winner, not fits(p),
                                         math.inf if p.quality is None else (p.quality if lower_better else -p.quality)))
    result = AutoResult(budget, order, winner, sens, fp32_bytes, base_value, metric, limit, max_drop, model_name,
                        notes=notes)
    result.seconds = time.perf_counter() - start
    return result
