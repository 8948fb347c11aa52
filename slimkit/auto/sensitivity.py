"""Per-layer sensitivity for every family: how far the model's output moves when one layer alone is
quantized, pruned or factorized, on calibration data (never the eval split).

For each Linear-like layer and each setting of each family, the layer is replaced by its
compressed version while every other layer stays as it was, and the task's divergence of the
output from the original's is measured (KL of the next-token distribution for a causal LM,
1 − cosine of the sentence embedding for an encoder: ``Task.divergence``), averaged over the
calibration batches. ``factorization.allocation.measure_sensitivity`` does the running (the
blocks before the changed one replay their recorded outputs).

The replacements are the simplest member of each family, so the curves compare layers rather
than algorithms: round-to-nearest symmetric codes (groups of 128 inputs where the row splits
into them, else 32, else per channel), magnitude pruning inside the layer, and plain truncated
SVD at a parameter ratio. Each option also carries the bytes the layer would take stored that
way, so the curves are (bytes, divergence) points an allocator can trade along.
"""

from __future__ import annotations

import base64
import copy
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import trim_padding
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.linear_like import (
    as_linear,
    embedding_problem,
    is_linear_like,
    linear_problem,
)
from slimkit.factorization.allocation import LayerChoices, measure_sensitivity
from slimkit.factorization.svd import (
    FactorizedLinear,
    rank_for_param_ratio,
    truncated_svd,
)
from slimkit.quantization.modules import QuantEmbedding, QuantLinear

FAMILIES = ("quantize", "prune", "factorize")
#: the settings tried per family: weight bits, fraction of weights pruned, fraction of parameters kept
DEFAULT_GRID: dict[str, tuple[float, ...]] = {"quantize": (8, 4, 3, 2), "prune": (0.25, 0.5, 0.75),
                                              "factorize": (0.75, 0.5, 0.25)}


@dataclass
class LayerSensitivity:
    """One layer's curve per family: setting -> (bytes stored, output divergence)."""

    name: str
    shape: tuple[int, int]
    dense_bytes: int
    curves: dict[str, dict[float, tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Sensitivity:
    """Every layer's curves, the data they were measured on, and what each setting means."""

    layers: list[LayerSensitivity]
    data: str
    metric: str  # what the divergence is

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per layer, per family, per setting: bytes and divergence."""
        return {"data": self.data, "metric": self.metric, "settings": {
            "quantize": "weight bits (round to nearest, symmetric)", "prune": "fraction of weights pruned (magnitude)",
            "factorize": "fraction of the layer's parameters kept (truncated SVD)"},
            "layers": [{"name": s.name, "shape": list(s.shape), "dense_bytes": s.dense_bytes,
                        "curves": {fam: {str(k): {"bytes": b, "divergence": d} for k, (b, d) in curve.items()}
                                   for fam, curve in s.curves.items()}} for s in self.layers]}

    def most_sensitive(self, family: str, setting: float, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` layers whose output moves most at ``setting`` of ``family``."""
        got = [(s.name, s.curves[family][setting][1]) for s in self.layers
               if family in s.curves and setting in s.curves[family]]
        return sorted(got, key=lambda x: -x[1])[:n]

    def plot_png(self) -> str:
        """PNG (base64) with one panel per family: divergence (log scale) per layer, one line per setting."""
        from matplotlib.figure import Figure

        families = [f for f in FAMILIES if any(f in s.curves for s in self.layers)]
        fig = Figure(figsize=(max(6.0, 0.18 * len(self.layers) + 3), 2.6 * len(families)))
        axes = fig.subplots(len(families), 1, squeeze=False)[:, 0]
        x = list(range(len(self.layers)))
        for ax, fam in zip(axes, families):
            settings = sorted({k for s in self.layers for k in s.curves.get(fam, {})}, reverse=fam != "prune")
            for k in settings:
                ys = [s.curves.get(fam, {}).get(k, (0, math.nan))[1] for s in self.layers]
                ax.plot(x, [max(y, 1e-9) for y in ys], marker=".", label=_setting_label(fam, k))
            ax.set_yscale("log")
            ax.set_ylabel(f"{fam}\n{self.metric}")
            ax.legend(fontsize=7, ncol=len(settings), loc="upper left")
            ax.grid(alpha=0.3)
        axes[-1].set_xticks(x)
        axes[-1].set_xticklabels([s.name for s in self.layers], rotation=90, fontsize=6)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def to_markdown(self) -> str:
        """A table: one row per layer, one column per (family, setting)."""
        cols = [(f, k) for f in FAMILIES for k in DEFAULT_GRID[f]
                if any(k in s.curves.get(f, {}) for s in self.layers)]
        head = "| layer | shape | " + " | ".join(_setting_label(f, k) for f, k in cols) + " |"
        lines = [f"Per-layer sensitivity ({self.metric}, one layer changed at a time) on {self.data}.", "", head,
                 "|:---|:---|" + "---:|" * len(cols)]
        for s in self.layers:
            cells = [f"{s.curves[f][k][1]:.3g}" if k in s.curves.get(f, {}) else "" for f, k in cols]
            lines.append(f"| {s.name} | {s.shape[0]}×{s.shape[1]} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _setting_label(family: str, k: float) -> str:
    return {"quantize": f"int{int(k)}", "prune": f"prune {k:.0%}", "factorize": f"rank keeps {k:.0%}"}[family]


# --- the replacements (pure functions of the layer) ----------------------------------------


def sensitivity_group(in_features: int) -> int | None:
    """The group size the quantize curves use: 128 inputs where the row splits into them, else 32, else per channel."""
    return next((g for g in (128, 32) if in_features % g == 0), None)


def quantized_bytes(out_f: int, in_f: int, bits: int, group: int | None) -> int:
    """Bytes of an (out, in) weight as ``bits``-bit codes with one fp32 scale per row or per group."""
    groups = 1 if group is None else math.ceil(in_f / group)
    return math.ceil(out_f * in_f * bits / 8) + 4 * out_f * groups


def pruned_bytes(out_f: int, in_f: int, fraction: float) -> int:
    """Bytes of an (out, in) weight with ``fraction`` pruned, stored as a bitmask plus the kept fp32 values."""
    n = out_f * in_f
    return math.ceil(n / 8) + 4 * (n - round(n * fraction))


def magnitude_pruned(linear: nn.Linear, fraction: float) -> nn.Linear:
    """A copy of ``linear`` with the ``fraction`` of its weights smallest in magnitude set to 0 (ties: lowest index)."""
    new = copy.deepcopy(linear)
    w = new.weight.detach()
    k = round(w.numel() * fraction)
    if k:
        order = torch.argsort(w.abs().flatten(), stable=True)[:k]
        with torch.no_grad():
            w.view(-1)[order] = 0
    return new


def _options(linear: nn.Linear, grid: dict[str, Sequence[float]]) -> list[tuple[str, float, int, Callable[[], nn.Module]]]:
    out_f, in_f = linear.out_features, linear.in_features
    bias = None if linear.bias is None else linear.bias.detach()
    opts = []
    for bits in grid.get("quantize", ()):
        g = sensitivity_group(in_f)
        opts.append(("quantize", bits, quantized_bytes(out_f, in_f, int(bits), g),
                     lambda b=int(bits), g=g: QuantLinear.from_linear(linear, b, g, True)))
    for frac in grid.get("prune", ()):
        opts.append(("prune", frac, pruned_bytes(out_f, in_f, frac), lambda f=frac: magnitude_pruned(linear, f)))
    for keep in grid.get("factorize", ()):
        r = rank_for_param_ratio(out_f, in_f, keep)
        opts.append(("factorize", keep, 4 * r * (out_f + in_f),
                     lambda r=r: FactorizedLinear.from_factors(truncated_svd(linear.weight.detach().float(), r), bias)))
    return opts


#: sequences (or samples) every option is measured on: 4 × 256 tokens for a causal LM (about 0.3 s
#: per option on 2 cores for stdlib-coder, whose ~440 options then take ~2 minutes)
MAX_ROWS = 4


def batch_rows(batch: Any) -> int:
    """The rows (samples, sequences) of a tensor, tuple or dict batch, batch first."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


def _head(batch: Any, n: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:n] if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)
    return batch[:n]


def first_rows(batches: Sequence[Any], max_rows: int) -> list[Any]:
    """The first ``max_rows`` rows of ``batches`` (tensor, tuple or dict batches, batch first), the last one cut."""
    out, left = [], max_rows
    for batch in batches:
        if left <= 0:
            break
        n = batch_rows(batch)
        out.append(batch if n <= left else _head(batch, left))
        left -= min(n, left)
    return out


#: the code widths QuantEmbedding stores (its rows are looked up, never multiplied: no 3-bit path)
EMBEDDING_BITS = (8, 4, 2)


def _embedding_options(emb: nn.Embedding, grid: dict[str, Sequence[float]]) -> list[tuple[str, float, int, Callable[[], nn.Module]]]:
    rows, dim = emb.weight.shape
    g = sensitivity_group(dim)
    return [("quantize", bits, quantized_bytes(rows, dim, int(bits), g),
             lambda b=int(bits): QuantEmbedding.from_embedding(emb, b, g, True))
            for bits in grid.get("quantize", ()) if int(bits) in EMBEDDING_BITS]


def layer_sensitivity(model: nn.Module, batches: list[Any], families: Sequence[str] = FAMILIES,
                      grid: dict[str, Sequence[float]] | None = None, layers: Sequence[str] | None = None,
                      data_description: str = "calibration data", embeddings: bool = True,
                      max_rows: int = MAX_ROWS) -> Sensitivity:
    """Measure every (layer, family, setting) of ``model`` on calibration ``batches``.

    ``layers``: names of Linear-like layers (or embeddings) to try (default: every one a
    quantizer would take). ``grid``: settings per family (default ``DEFAULT_GRID``).
    ``embeddings``: also try each embedding table's rows as 8/4/2-bit codes (quantize family
    only; a table tied to an output layer is changed on the input side alone). ``max_rows``:
    the sequences (or samples) used, from the first batches: each of the ~10 options per layer
    runs them once, so they are what the measurement costs.
    """
    from slimkit.tasks import task_of

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    if not batches:
        raise DataError("per-layer sensitivity needs calibration batches (at least one)")
    grid = {f: tuple((grid or DEFAULT_GRID).get(f, DEFAULT_GRID[f])) for f in families}
    found = {n: m for n, m in model.named_modules() if is_linear_like(m) and linear_problem(m) is None}
    tables = {n: m for n, m in model.named_modules()
              if isinstance(m, nn.Embedding) and embedding_problem(m) is None and m.max_norm is None}
    if layers is None:
        names = list(found) + (list(tables) if embeddings and "quantize" in grid else [])
    else:
        names = list(layers)
    missing = [n for n in names if n not in found and n not in tables]
    if missing:
        raise ConfigError(f"{missing[0]!r} is not a Linear-like layer or embedding of this model")
    if not names:
        raise ConfigError("the model has no Linear-like layer to measure")
    choices, meta = [], []
    for name in names:
        if name in found:
            module = as_linear(found[name])
            opts = _options(module, grid)
        else:
            module = tables[name]
            opts = _embedding_options(module, grid)
        if not opts:
            continue
        choices.append(LayerChoices(name, module.weight.numel(), [(k, b, build) for _, k, b, build in opts]))
        meta.append((name, module, opts))
    sample = [trim_padding(b) for b in first_rows(batches, max_rows)]
    costs = measure_sensitivity(model, choices, sample)
    out = []
    for (name, module, opts), row in zip(meta, costs):
        s = LayerSensitivity(name, tuple(module.weight.shape), 4 * module.weight.numel())
        for (fam, k, nbytes, _), cost in zip(opts, row):
            s.curves.setdefault(fam, {})[k] = (nbytes, float(cost))
        out.append(s)
    return Sensitivity(out, data_description, task_of(model).divergence_name)
