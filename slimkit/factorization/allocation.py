"""Rank allocation under a global parameter budget, driven by each layer's measured sensitivity.

Every candidate layer is tried alone at a few parameter ratios (its other layers dense): the
*sensitivity* of a try is how far the model's output moves from the original's on a few
calibration batches (1 − cosine of the sentence embedding for an encoder, KL(original ‖
new) of the output distribution otherwise). Treating those costs as additive, the ranks are
then chosen to minimise their sum with the selected layers' parameters under the budget:
a multiple-choice knapsack, solved greedily along each layer's lower convex hull of
(parameters, cost) — the cheapest loss per parameter saved first, as in ASVD's
sensitivity-based rank search. On convex curves this greedy is optimal for the total it
lands on (tested against brute force).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import _model_device, _to, find_blocks, run_model, trim_padding
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.registry import Context
from slimkit.core.targets import set_submodule
from slimkit.tasks import Task, task_of

# --- pure functions ------------------------------------------------------------------------


def lower_hull(points: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of ``points`` (params, cost) on the lower convex hull, from most to fewest params.

    Point 0 must be the dense layer (the most parameters). A point above the hull is never
    worth choosing at any budget (another pair of points beats it).
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    hull: list[int] = []
    for i in order:
        if hull and points[i][0] == points[hull[-1]][0]:
            continue  # same size, higher cost (sorted by cost within a size)
        while len(hull) >= 2:
            (p0, c0), (p1, c1), (p2, c2) = points[hull[-2]], points[hull[-1]], points[i]
            # slope (cost per parameter saved) must not fall: drop the middle point if it does
            if (c1 - c0) * (p1 - p2) >= (c2 - c1) * (p0 - p1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate_budget(dense_params: Sequence[int], options: Sequence[Sequence[tuple[int, float]]],
                    budget: int) -> list[int | None]:
    """For each layer, the index into its ``options`` (params, cost) to use, or None to keep it dense.

    Minimises the summed cost with Σ params ≤ ``budget`` (the dense layers count their
    ``dense_params``), greedily: the move along any layer's lower hull that costs least per
    parameter saved, until the budget is met. ConfigError when even every layer's smallest
    option does not fit.
    """
    if len(dense_params) != len(options):
        raise ValueError("one list of options per layer is needed")
    hulls, points, origins = [], [], []
    for dense, opts in zip(dense_params, options):
        kept = [i for i, (p, _) in enumerate(opts) if p < dense]  # an option no smaller than dense never helps
        pts = [(int(dense), 0.0)] + [(int(opts[i][0]), float(opts[i][1])) for i in kept]
        points.append(pts)
        origins.append([None, *kept])  # point index -> option index (None: the dense layer)
        hulls.append(lower_hull(pts))
    position = [0] * len(hulls)  # index into each hull
    total = sum(int(d) for d in dense_params)
    smallest = sum(pts[h[-1]][0] for pts, h in zip(points, hulls))
    if smallest > budget:
        raise ConfigError(f"a parameter budget of {budget:,} cannot be met: the smallest ranks tried still hold "
                          f"{smallest:,}; lower the smallest sensitivity_grid ratio or raise the budget")

    def move(layer: int) -> tuple[float, int, int] | None:
        hull, pts = hulls[layer], points[layer]
        k = position[layer]
        if k + 1 >= len(hull):
            return None
        (p0, c0), (p1, c1) = pts[hull[k]], pts[hull[k + 1]]
        return (c1 - c0) / (p0 - p1), layer, k

    heap = [m for m in (move(i) for i in range(len(hulls))) if m is not None]
    heapq.heapify(heap)
    while total > budget:
        _, layer, k = heapq.heappop(heap)
        pts, hull = points[layer], hulls[layer]
        total -= pts[hull[k]][0] - pts[hull[k + 1]][0]
        position[layer] = k + 1
        nxt = move(layer)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return [origin[hull[k]] for origin, hull, k in zip(origins, hulls, position)]


# --- measuring sensitivity -----------------------------------------------------------------


@dataclass
class LayerChoices:
    """One candidate layer for the budget: its dense size and the factorized versions to try.

    ``options`` are ``(rank, params, build)``: ``build()`` returns the replacement module.
    """

    name: str
    dense_params: int
    options: list[tuple[Any, int, Callable[[], nn.Module]]]


def predictions(model: nn.Module, batches: list[Any], task: Task) -> list[torch.Tensor]:
    """What ``task`` compares of ``model``'s output (logits, a pooled embedding), one tensor per batch."""
    out = []
    for batch in batches:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        out.append(task.prediction(model, run_model(model, batch), mask))
    return out


class _Replay(nn.Module):
    """Stands in for an unchanged block: returns what it returned on the same batch in the reference pass."""

    def __init__(self, outputs: list[Any], batch: list[int]):
        super().__init__()
        self.outputs, self.batch = outputs, batch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.batch[0]]


def _block_outputs(model: nn.Module) -> tuple[str, nn.ModuleList, list[list[Any]]] | None:
    """The model's repeated blocks and a list per block to record its outputs in (None without blocks)."""
    try:
        name, blocks = find_blocks(model)
    except UnsupportedError:
        return None
    return name, blocks, [[] for _ in blocks]


@torch.no_grad()
def measure_sensitivity(model: nn.Module, layers: Sequence[LayerChoices], batches: list[Any]) -> list[list[float]]:
    """The output divergence of ``model`` with only one layer replaced by each of its options in turn.

    In a model with repeated blocks, the blocks before the one holding the layer are not
    run again: they replay their recorded outputs (they cannot have changed).
    """
    task = task_of(model)  # what is compared (logits, a sentence embedding) and how far apart they are
    found = _block_outputs(model)
    was_training = model.training
    model.eval()
    handles = []
    if found is not None:
        _, blocks, recorded = found
        handles = [b.register_forward_hook(lambda _m, _a, out, i=i: recorded[i].append(out))
                   for i, b in enumerate(blocks)]
    try:
        reference = predictions(model, batches, task)
    finally:
        for h in handles:
            h.remove()
    current = [0]

    def run(layer_name: str) -> list[torch.Tensor]:
        if found is None:
            return predictions(model, batches, task)
        blocks_name, blocks, recorded = found
        prefix = blocks_name + "."
        first = int(layer_name[len(prefix):].split(".")[0]) if layer_name.startswith(prefix) else 0
        originals = list(blocks)
        for i in range(first):
            blocks[i] = _Replay(recorded[i], current)
        try:
            out = []
            for k, batch in enumerate(batches):
                current[0] = k
                out.extend(predictions(model, [batch], task))
            return out
        finally:
            for i in range(first):
                blocks[i] = originals[i]

    try:
        costs = []
        for layer in layers:
            original = model.get_submodule(layer.name)
            row = []
            for _, _, build in layer.options:
                set_submodule(model, layer.name, build())
                try:
                    new = run(layer.name)
                finally:
                    set_submodule(model, layer.name, original)
                row.append(sum(task.divergence(r, n) for r, n in zip(reference, new)) / len(batches))
            costs.append(row)
    finally:
        model.train(was_training)
    return costs


def choose_by_budget(model: nn.Module, layers: Sequence[LayerChoices], budget: float, data: Any,
                     batches: int, ctx: Context, label: str) -> dict[str, Any]:
    """Layer name -> the option's rank for layers to factorize, keeping ``budget`` of their parameters.

    Layers left out of the answer stay dense (the budget was met without them).
    """
    if data is None:
        raise DataError(f"{label} with a budget needs calibration data: each layer's sensitivity is measured "
                        "on it (data=CalibrationData..., or a recipe 'calibration' section)")
    if not layers:
        return {}
    start = time.perf_counter()
    device = _model_device(model)
    sample = [trim_padding(_to(b, device)) for _, b in zip(range(batches), data)]  # padding costs time, changes nothing
    costs = measure_sensitivity(model, layers, sample)
    dense = [layer.dense_params for layer in layers]
    target = int(budget * sum(dense))
    chosen = allocate_budget(dense, [[(p, c) for (_, p, _), c in zip(layer.options, row)]
                                     for layer, row in zip(layers, costs)], target)
    most = sorted(zip(layers, costs), key=lambda lc: -max(lc[1]))[:3]
    ctx.note(f"{label}: ranks allocated under a budget of {budget:g} of {sum(dense):,} parameters by per-layer "
             f"sensitivity ({len(layers)} layers x {len(layers[0].options)} tries on {len(sample)} calibration "
             f"batch(es), {time.perf_counter() - start:.1f} s); most sensitive: "
             + ", ".join(f"{lc[0].name} ({max(lc[1]):.2g})" for lc in most))
    return {layer.name: layer.options[i][0] for layer, i in zip(layers, chosen) if i is not None}
