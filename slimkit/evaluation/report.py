"""The measured report that ends every compression run.

A ``CompressionReport`` holds two ``ModelMeasurement``s (baseline and compressed), the
recipe steps applied, notes (e.g. layers skipped and why), the environment it was
measured in and, for a recipe of several stages, the model measured after each stage
(``StageMeasurement``s, shown as an "After each stage" table and a size-vs-quality path). It renders to a rich table (terminal), Markdown, JSON and one self-contained
HTML file with plots. A figure that was not measured is shown as "n/a": no number is
ever invented, and derived ratios are None when an input is missing.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from slimkit.core.atomic import atomic_write_text
from slimkit.core.errors import DataError, closest
from slimkit.core.machine import cpu_isa, cpu_model
from slimkit.core.measure import LatencyStats, load_average

QUALITY_DIRECTIONS = {
    "perplexity": "lower",
    "nll": "lower",
    "accuracy": "higher",
    "mean_cosine": "higher",
    "min_cosine": "higher",
    "top1_agreement": "higher",
}

REPORT_FORMAT_VERSION = 2  # 2: "stages" (the model measured after each stage)
READABLE_FORMAT_VERSIONS = (1, 2)  # a version-1 report (no "stages") still loads
NA = "n/a"


def _check_keys(kind: str, data: dict[str, Any], allowed: list[str], required: list[str]) -> None:
    """Refuse unknown or missing keys, naming them (and the closest valid key)."""
    if not isinstance(data, dict):
        raise DataError(f"{kind}: expected a dict, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise DataError(f"{kind}: unknown key {key!r}{closest(key, allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise DataError(f"{kind}: missing key(s) {missing}")


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelMeasurement:
    """Everything measured about one model; None means "not measured"."""

    name: str
    kind: str  # "causal-lm", "encoder", "classifier", ...
    size_bytes: int | None
    params_total: int
    params_nonzero: int
    flops: int | None = None
    latency: LatencyStats | None = None
    quality: dict[str, float] = dataclasses.field(default_factory=dict)
    layer_sparsity: dict[str, float] = dataclasses.field(default_factory=dict)
    layer_bits: dict[str, float] = dataclasses.field(default_factory=dict)  # bits per weight
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # str -> str | number
    generation: dict[str, Any] | None = None  # causal LMs: evaluation.generation.GenerationStats.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_dict`` rebuilds an equal object."""
        return {
            "name": self.name,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "params_total": self.params_total,
            "params_nonzero": self.params_nonzero,
            "flops": self.flops,
            "latency": None if self.latency is None else self.latency.to_dict(),
            "quality": dict(self.quality),
            "layer_sparsity": dict(self.layer_sparsity),
            "layer_bits": dict(self.layer_bits),
            "details": dict(self.details),
            "generation": None if self.generation is None else dict(self.generation),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeasurement:
        """Rebuild from ``to_dict`` output; unknown or missing keys are a DataError."""
        fields = [f.name for f in dataclasses.fields(cls)]
        _check_keys("ModelMeasurement", data, fields, ["name", "kind", "size_bytes", "params_total", "params_nonzero"])
        values = dict(data)
        if values.get("latency") is not None:
            values["latency"] = LatencyStats.from_dict(values["latency"])
        for key in ("quality", "layer_sparsity", "layer_bits", "details"):
            values[key] = dict(values.get(key) or {})
        return cls(**values)


@dataclasses.dataclass
class StageMeasurement:
    """The model measured after one stage of a recipe (the last stage's is the compressed model's)."""

    stage: str
    measurement: ModelMeasurement

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_dict`` rebuilds an equal object."""
        return {"stage": self.stage, "measurement": self.measurement.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageMeasurement:
        """Rebuild from ``to_dict`` output; unknown or missing keys are a DataError."""
        _check_keys("StageMeasurement", data, ["stage", "measurement"], ["stage", "measurement"])
        if not isinstance(data["stage"], str):
            raise DataError(f"StageMeasurement: 'stage' must be a string, got {type(data['stage']).__name__}")
        return cls(stage=data["stage"], measurement=ModelMeasurement.from_dict(data["measurement"]))


def environment_info() -> dict[str, Any]:
    """Where a measurement ran: slimkit/torch/python versions, platform, CPUs, torch threads, load average, date."""
    from slimkit.core.version import __version__ as version

    return {
        "slimkit": version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "load_average_1min": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or the denominator is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def _generation(m: ModelMeasurement, key: str) -> float | None:
    return None if m.generation is None else m.generation.get(key)


def _median(m: ModelMeasurement) -> float | None:
    return None if m.latency is None else m.latency.median_ms


def _throughput(m: ModelMeasurement) -> float | None:
    return None if m.latency is None else m.latency.throughput


# ---------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (thousands separated when large), or n/a."""
    if x is None:
        return NA
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _fmt_int(x: int | None) -> str:
    return NA if x is None else f"{x:,}"


def _setting(lat: LatencyStats) -> str:
    """The measurement setting of a latency, e.g. 'threads=2, batch=32, seq=128'."""
    parts = [f"threads={lat.threads}"]
    if lat.batch_size is not None:
        parts.append(f"batch={lat.batch_size}")
    if lat.seq_len is not None:
        parts.append(f"seq={lat.seq_len}")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class _Row:
    """One table row, already formatted; ``verdict`` is 'better', 'worse', 'same' or ''."""

    label: str
    baseline: str
    compressed: str
    change: str
    verdict: str


def _verdict(delta: float, direction: str | None) -> str:
    if direction is None:
        return ""
    if delta == 0:
        return "same"
    return "better" if (delta < 0) == (direction == "lower") else "worse"


def _ratio_row(label: str, base: float | None, comp: float | None, direction: str, fmt=_fmt) -> _Row:
    """A row whose change is compressed/baseline as 'N.NNx'."""
    r = _ratio(comp, base)
    if r is None:
        change = NA
    else:  # two decimals ("0.27x") unless that would round a real change down to 0.00x
        change = f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"
    verdict = "" if r is None else _verdict(r - 1.0, direction)
    return _Row(label, fmt(base), fmt(comp), change, verdict)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompressionReport:
    """Baseline vs compressed measurements, the steps applied, notes, and the environment."""

    baseline: ModelMeasurement
    compressed: ModelMeasurement
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    environment: dict[str, Any] = dataclasses.field(default_factory=environment_info)
    stages: list[StageMeasurement] = dataclasses.field(default_factory=list)  # after each stage, in order

    # --- derived figures (None when an input is missing) ---------------------------------

    @property
    def compression_ratio(self) -> float | None:
        """Baseline size on disk / compressed size on disk (4.0 means 4x smaller)."""
        return _ratio(self.baseline.size_bytes, self.compressed.size_bytes)

    @property
    def param_ratio(self) -> float | None:
        """Baseline parameters / compressed parameters (totals; 2.0 means half as many)."""
        return _ratio(self.baseline.params_total, self.compressed.params_total)

    @property
    def speedup(self) -> float | None:
        """Baseline median latency / compressed median latency (2.0 means twice as fast)."""
        return _ratio(_median(self.baseline), _median(self.compressed))

    @property
    def quality_deltas(self) -> dict[str, float]:
        """Compressed − baseline for each quality metric measured on both (baseline's order)."""
        b, c = self.baseline.quality, self.compressed.quality
        return {k: c[k] - b[k] for k in b if k in c and b[k] is not None and c[k] is not None}

    # --- table ---------------------------------------------------------------------------

    def _latency_label(self) -> str:
        lb, lc = self.baseline.latency, self.compressed.latency
        settings = [_setting(x) for x in (lb, lc) if x is not None]
        if not settings:
            return "Latency median (ms)"
        if len(set(settings)) == 1:
            return f"Latency median (ms) [{settings[0]}]"
        # Different settings make the ratio questionable; show both rather than hide it.
        return f"Latency median (ms) [baseline {_setting(lb)}; compressed {_setting(lc)}]"

    def _rows(self) -> list[_Row]:
        b, c = self.baseline, self.compressed
        mb = lambda m: None if m.size_bytes is None else m.size_bytes / 1e6  # noqa: E731
        gflops = lambda m: None if m.flops is None else m.flops / 1e9  # noqa: E731
        rows = [
            _ratio_row("Size on disk (MB)", mb(b), mb(c), "lower"),
            _ratio_row("Parameters", b.params_total, c.params_total, "lower", _fmt_int),
            _ratio_row("Nonzero parameters", b.params_nonzero, c.params_nonzero, "lower", _fmt_int),
            _ratio_row("Bits per weight (weight layers)", b.details.get("bits per weight"),
                       c.details.get("bits per weight"), "lower"),
            _ratio_row("GFLOPs", gflops(b), gflops(c), "lower"),
            _ratio_row(self._latency_label(), _median(b), _median(c), "lower"),
            _ratio_row("Throughput (items/s)", _throughput(b), _throughput(c), "higher"),
        ]
        if b.generation or c.generation:
            g = c.generation or b.generation
            setting = (f"batch 1, KV cache, {g['new_tokens']} new after a {g['prompt_tokens']}-token prompt, "
                       f"threads={g['threads']}, {g['isa']}")
            rows += [
                _ratio_row(f"Decode tokens/s [{setting}]", _generation(b, "decode_tokens_per_s"),
                           _generation(c, "decode_tokens_per_s"), "higher"),
                _ratio_row("Memory while generating (MB) [tensors + peak RSS growth]", _generation(b, "memory_mb"),
                           _generation(c, "memory_mb"), "lower"),
            ]
        quantized = c.details.get("bits per weight (quantized layers)")
        if quantized is not None:
            rows.insert(3, _Row("Bits per weight (quantized layers)", _fmt(b.details.get(
                "bits per weight (quantized layers)")), _fmt(quantized), NA, ""))
        names = list(b.quality) + [k for k in c.quality if k not in b.quality]
        deltas = self.quality_deltas
        for name in names:
            direction = QUALITY_DIRECTIONS.get(name)
            if name in deltas:
                d = deltas[name]
                verdict = _verdict(d, direction)
                change = f"{d:+.3g}" + (f" ({verdict})" if verdict else "")
            else:
                change, verdict = NA, ""
            rows.append(_Row(name, _fmt(b.quality.get(name), 5), _fmt(c.quality.get(name), 5), change, verdict))
        return rows

    def to_rich_table(self):
        """A ``rich.table.Table``: metric, baseline, compressed, change (ratio or signed delta)."""
        from rich.table import Table
        from rich.text import Text

        styles = {"better": "green", "worse": "red", "same": "", "": ""}
        table = Table(
            title=f"{self.baseline.name} -> {self.compressed.name}",
            caption="change: compressed/baseline ratio for size, params, FLOPs, latency, throughput; "
            "compressed − baseline for quality",
        )
        table.add_column("metric")
        table.add_column(f"baseline ({self.baseline.name})", justify="right")
        table.add_column(f"compressed ({self.compressed.name})", justify="right")
        table.add_column("change", justify="right")
        for row in self._rows():
            # Text objects keep values like '[threads=2]' from being read as rich markup.
            table.add_row(
                Text(row.label), Text(row.baseline), Text(row.compressed), Text(row.change, style=styles[row.verdict])
            )
        return table

    # --- after each stage -----------------------------------------------------------------

    def _quality_names(self) -> list[str]:
        names = list(self.baseline.quality)
        for m in [s.measurement for s in self.stages] + [self.compressed]:
            names += [k for k in m.quality if k not in names]
        return names

    def _stage_table(self) -> tuple[list[str], list[list[str]]]:
        """The "After each stage" table, formatted: (header, rows), the baseline first, then each stage.

        A cell is the value then its change vs the baseline (ratio for size, parameters and
        latency; signed difference for quality). Columns nobody measured are left out."""
        if not self.stages:
            return [], []
        b = self.baseline
        sparsity = lambda m: None if not m.params_total else 1.0 - m.params_nonzero / m.params_total  # noqa: E731
        columns: list[tuple[str, Any, str]] = [  # (header, getter, change kind)
            ("Size on disk (MB)", lambda m: None if m.size_bytes is None else m.size_bytes / 1e6, "ratio"),
            ("Parameters", lambda m: m.params_total, "ratio"),
            ("Sparsity", sparsity, "none"),
            ("Latency median (ms)", _median, "ratio"),
        ]
        columns += [(name, lambda m, name=name: m.quality.get(name), "delta") for name in self._quality_names()]
        models = [("baseline", b)] + [(s.stage, s.measurement) for s in self.stages]
        columns = [c for c in columns if any(c[1](m) is not None for _, m in models)]
        if not any(m.layer_sparsity for _, m in models) and all(not sparsity(m) for _, m in models):
            columns = [c for c in columns if c[0] != "Sparsity"]  # nothing pruned, sparsity not measured
        header = ["Stage"] + [c[0] for c in columns]
        rows = []
        for label, m in models:
            cells = [label]
            for name, get, kind in columns:
                value, base = get(m), get(b)
                if name == "Parameters":
                    text = _fmt_int(value)
                elif name == "Sparsity":
                    text = NA if value is None else f"{value:.1%}"
                else:
                    text = _fmt(value, 5 if kind == "delta" else 4)
                if m is not b and value is not None and base is not None:
                    if kind == "ratio" and base:
                        text += f" ({value / base:.2f}x)" if value / base >= 0.1 else f" ({value / base:.2g}x)"
                    elif kind == "delta":
                        text += f" ({value - base:+.3g})"
                cells.append(text)
            rows.append(cells)
        return header, rows

    def stage_notes(self) -> list[str]:
        """Which stage cost most: one note per stage that made a quality figure worse than the stage
        before it by more than the whole recipe changed it (either way; so a later stage won part of it
        back) and by more than 1% of its value (not noise)."""
        notes = []
        chain = [("baseline", self.baseline)] + [(s.stage, s.measurement) for s in self.stages]
        for metric in self._quality_names():
            direction = QUALITY_DIRECTIONS.get(metric)
            values = [(label, m.quality.get(metric)) for label, m in chain]
            if direction is None or any(v is None for _, v in values) or len(values) < 3:
                continue
            sign = 1.0 if direction == "lower" else -1.0  # positive = worse
            total = sign * (values[-1][1] - values[0][1])
            for (_, before), (label, after) in zip(values, values[1:]):
                cost = sign * (after - before)
                if cost > abs(total) and cost > 0.01 * abs(before):
                    notes.append(f"stage {label!r} made {metric} worse by {after - before:+.3g} (vs the stage before), "
                                 f"more than the whole recipe's {values[-1][1] - values[0][1]:+.3g}: "
                                 "the other stages won part of it back")
        return notes

    def to_rich_stage_table(self):
        """A ``rich.table.Table`` of the "After each stage" table, or None without stage measurements."""
        from rich.table import Table
        from rich.text import Text

        header, rows = self._stage_table()
        if not rows:
            return None
        table = Table(title="After each stage",
                      caption="(change vs baseline: ratio for size, parameters, latency; difference for quality)")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        return table

    def _stage_markdown(self) -> list[str]:
        header, rows = self._stage_table()
        if not rows:
            return []
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        out = ["", "## After each stage", "", "| " + " | ".join(header) + " |",
               "|---|" + "---:|" * (len(header) - 1)]
        out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
        out += ["", "In parentheses: the change vs the baseline (ratio for size, parameters and latency; "
                "difference for quality)."]
        out += [f"- {note}" for note in self.stage_notes()]
        return out

    # --- markdown ------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """GitHub Markdown: the table, per-layer figures, steps, notes, details and environment."""
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        b, c = self.baseline, self.compressed
        out = [f"# Compression report: {b.name} → {c.name}", ""]
        out += [
            f"| Metric | Baseline ({esc(b.name)}) | Compressed ({esc(c.name)}) | Change |",
            "|---|---:|---:|---:|",
        ]
        for row in self._rows():
            out.append(f"| {esc(row.label)} | {esc(row.baseline)} | {esc(row.compressed)} | {esc(row.change)} |")
        out += [
            "",
            "Change: compressed/baseline ratio for size, parameters, FLOPs, latency and throughput; "
            "compressed − baseline for quality metrics.",
        ]
        out += self._stage_markdown()

        layers = self._layer_names()
        if layers:
            out += ["", "## Per-layer", ""]
            out += [
                "| Layer | Sparsity (baseline) | Sparsity (compressed) | Bits/weight (baseline) | Bits/weight (compressed) |",
                "|---|---:|---:|---:|---:|",
            ]
            for name in layers:
                cells = [
                    _fmt(b.layer_sparsity.get(name)),
                    _fmt(c.layer_sparsity.get(name)),
                    _fmt(b.layer_bits.get(name)),
                    _fmt(c.layer_bits.get(name)),
                ]
                out.append(f"| {esc(name or '(root)')} | " + " | ".join(cells) + " |")

        out += ["", "## Steps", ""]
        out += [f"{i}. `{json.dumps(step, sort_keys=False)}`" for i, step in enumerate(self.steps, 1)] or ["(none)"]
        out += ["", "## Notes", ""]
        out += [f"- {note}" for note in self.notes] or ["(none)"]
        for label, m in (("Baseline", b), ("Compressed", c)):
            if m.details:
                out += ["", f"## {label} details ({m.name}, {m.kind})", ""]
                out += [f"- {k}: {v}" for k, v in m.details.items()]
        out += ["", "## Environment", ""]
        out += [f"- {k}: {v}" for k, v in self.environment.items()]
        return "\n".join(out) + "\n"

    def _layer_names(self) -> list[str]:
        """Every layer with sparsity or bits in either model, in first-seen order."""
        names: dict[str, None] = {}
        for m in (self.baseline, self.compressed):
            names.update(dict.fromkeys(m.layer_sparsity))
            names.update(dict.fromkeys(m.layer_bits))
        return list(names)

    # --- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a format version; ``from_dict`` rebuilds an equal report."""
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "baseline": self.baseline.to_dict(),
            "compressed": self.compressed.to_dict(),
            "steps": [dict(s) for s in self.steps],
            "notes": list(self.notes),
            "environment": dict(self.environment),
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """Rebuild from ``to_dict`` output (or a version-1 report); unknown keys or a newer format are a DataError."""
        version = data.get("format_version", REPORT_FORMAT_VERSION) if isinstance(data, dict) else None
        allowed = ["format_version", "baseline", "compressed", "steps", "notes", "environment"]
        if version != 1:
            allowed.append("stages")
        _check_keys("CompressionReport", data, allowed, ["baseline", "compressed"])
        if version not in READABLE_FORMAT_VERSIONS:
            raise DataError(f"CompressionReport: format_version {version} is not supported "
                            f"(expected one of {list(READABLE_FORMAT_VERSIONS)})")
        stages = data.get("stages", [])
        if not isinstance(stages, list):
            raise DataError(f"CompressionReport: 'stages' must be a list, got {type(stages).__name__}")
        return cls(
            baseline=ModelMeasurement.from_dict(data["baseline"]),
            compressed=ModelMeasurement.from_dict(data["compressed"]),
            steps=[dict(s) for s in data.get("steps", [])],
            notes=list(data.get("notes", [])),
            environment=dict(data.get("environment", {})),
            stages=[StageMeasurement.from_dict(s) for s in stages],
        )

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> CompressionReport:
        """Rebuild a report from ``to_json`` text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"report JSON cannot be parsed: {exc}") from None
        return cls.from_dict(data)

    # --- HTML ----------------------------------------------------------------------------

    def _size_quality_plot(self) -> str | None:
        """PNG (base64) of size vs each quality metric, or None when no point can be drawn."""
        b, c = self.baseline, self.compressed
        metrics = list(b.quality) + [k for k in c.quality if k not in b.quality]
        points = {
            k: [
                (m.size_bytes / 1e6, m.quality[k], label, m.name)
                for m, label in ((b, "baseline"), (c, "compressed"))
                if m.size_bytes is not None and m.quality.get(k) is not None
            ]
            for k in metrics
        }
        points = {k: v for k, v in points.items() if v}
        if not points:
            return None
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.2 * len(points), 3.4), layout="constrained")
        axes = fig.subplots(1, len(points), squeeze=False)[0]
        colors = {"baseline": "tab:blue", "compressed": "tab:orange"}
        # One x range from 0 for every panel, so the size gap reads the same everywhere.
        x_max = max(x for pts in points.values() for x, *_ in pts) * 1.2 or 1.0
        for ax, (metric, pts) in zip(axes, points.items()):
            for x, y, label, name in pts:
                ax.scatter([x], [y], s=60, color=colors[label], label=f"{label}: {name}", zorder=3)
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
            direction = QUALITY_DIRECTIONS.get(metric)
            ax.set_xlabel("size on disk (MB)")
            ax.set_ylabel(metric + (f" ({direction} is better)" if direction else ""))
            ax.ticklabel_format(axis="y", useOffset=False)  # show real values, not "+2.88e2" offsets
            ax.margins(y=0.25)
            ax.set_xlim(0, x_max)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return _png(fig)

    def _stage_plot(self) -> str | None:
        """PNG (base64) of size vs each quality metric after every stage, the points joined in stage order
        from the baseline (marked), or None without stage measurements or a plottable point."""
        chain = [("baseline", self.baseline)] + [(s.stage, s.measurement) for s in self.stages]
        if not self.stages:
            return None
        points = {
            k: [(m.size_bytes / 1e6, m.quality[k], label) for label, m in chain
                if m.size_bytes is not None and m.quality.get(k) is not None]
            for k in self._quality_names()
        }
        points = {k: v for k, v in points.items() if len(v) > 1 or (v and v[0][2] != "baseline")}
        if not points:
            return None
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.2 * len(points), 3.4), layout="constrained")
        axes = fig.subplots(1, len(points), squeeze=False)[0]
        x_max = max(x for pts in points.values() for x, *_ in pts) * 1.2 or 1.0
        for ax, (metric, pts) in zip(axes, points.items()):
            ax.plot([x for x, *_ in pts], [y for _, y, _ in pts], "-o", color="tab:orange", zorder=2,
                    label="after each stage")
            for i, (x, y, label) in enumerate(pts):
                if label == "baseline" and i == 0:
                    ax.scatter([x], [y], s=120, marker="*", color="tab:blue", zorder=3, label="baseline")
                ax.annotate(label if label == "baseline" else f"{i}. {label}", (x, y), textcoords="offset points",
                            xytext=(6, 6), fontsize=8)
            direction = QUALITY_DIRECTIONS.get(metric)
            ax.set_xlabel("size on disk (MB)")
            ax.set_ylabel(metric + (f" ({direction} is better)" if direction else ""))
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.margins(y=0.25)
            ax.set_xlim(0, x_max)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return _png(fig)

    def _layer_plot(self) -> str | None:
        """PNG (base64) of per-layer sparsity and/or bits-per-weight bars, or None when no data."""
        b, c = self.baseline, self.compressed
        panels = [
            (attr, title)
            for attr, title in (("layer_sparsity", "sparsity (fraction of zeros)"), ("layer_bits", "bits per weight"))
            if getattr(b, attr) or getattr(c, attr)
        ]
        if not panels:
            return None
        from matplotlib.figure import Figure

        height = min(0.3 * len(self._layer_names()) + 1.5, 60)  # inches; capped for huge models
        fig = Figure(figsize=(5.0 * len(panels), height), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (attr, title) in zip(axes, panels):
            names = list(dict.fromkeys([*getattr(b, attr), *getattr(c, attr)]))
            ys = range(len(names))
            for offset, (m, label, color) in zip((-0.2, 0.2), ((b, "baseline", "tab:blue"), (c, "compressed", "tab:orange"))):
                values = getattr(m, attr)
                # A layer missing from one model gets no bar (not a zero-length one posing as 0).
                idx = [i for i, n in enumerate(names) if n in values]
                if not idx:  # no empty series in the legend
                    continue
                ax.barh([i + offset for i in idx], [values[names[i]] for i in idx], height=0.4, color=color, label=f"{label}: {m.name}")
            ax.set_yticks(list(ys), [n or "(root)" for n in names], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(title)
            ax.grid(axis="x", alpha=0.3)
            ax.legend(fontsize=7)
        return _png(fig)

    def to_html(self) -> str:
        """One self-contained HTML page: table, plots (inline PNG), steps, notes, environment."""
        e = html.escape
        b, c = self.baseline, self.compressed
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>slimkit report: {e(b.name)} → {e(c.name)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
            "td.num{text-align:right}.better{color:#1a7f37}.worse{color:#cf222e}"
            "img{max-width:100%}code{background:#f4f4f4}</style></head><body>",
            f"<h1>Compression report: {e(b.name)} → {e(c.name)}</h1>",
            "<table><thead><tr><th>metric</th>"
            f"<th>baseline ({e(b.name)})</th><th>compressed ({e(c.name)})</th><th>change</th></tr></thead><tbody>",
        ]
        for row in self._rows():
            cls = f' class="num {row.verdict}"' if row.verdict in ("better", "worse") else ' class="num"'
            parts.append(
                f"<tr><td>{e(row.label)}</td><td class=\"num\">{e(row.baseline)}</td>"
                f"<td class=\"num\">{e(row.compressed)}</td><td{cls}>{e(row.change)}</td></tr>"
            )
        parts.append(
            "</tbody></table><p>Change: compressed/baseline ratio for size, parameters, FLOPs, latency and "
            "throughput; compressed − baseline for quality metrics.</p>"
        )

        header, rows = self._stage_table()
        if rows:
            parts.append('<h2 id="after-each-stage">After each stage</h2><table id="stage-table"><thead><tr>'
                         + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
            for row in rows:
                parts.append(f"<tr><td>{e(row[0])}</td>" + "".join(f'<td class="num">{e(c)}</td>' for c in row[1:])
                             + "</tr>")
            parts.append("</tbody></table><p>In parentheses: the change vs the baseline (ratio for size, parameters "
                         "and latency; difference for quality).</p>")
            notes = self.stage_notes()
            if notes:
                parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
            stage_plot = self._stage_plot()
            if stage_plot is not None:
                parts.append(f'<img id="stage-plot" alt="size on disk vs quality after each stage" '
                             f'src="data:image/png;base64,{stage_plot}">')

        plot = self._size_quality_plot()
        parts.append("<h2>Size vs quality</h2>")
        if plot is None:
            parts.append("<p>n/a: size on disk or quality was not measured.</p>")
        else:
            parts.append(f'<img id="size-quality-plot" alt="size on disk vs quality" src="data:image/png;base64,{plot}">')
        layer_plot = self._layer_plot()
        if layer_plot is not None:
            parts.append("<h2>Per-layer</h2>")
            parts.append(
                f'<img id="per-layer-plot" alt="per-layer sparsity and bits per weight" src="data:image/png;base64,{layer_plot}">'
            )

        parts.append("<h2>Steps</h2>")
        if self.steps:
            parts.append("<ol>" + "".join(f"<li><code>{e(json.dumps(s))}</code></li>" for s in self.steps) + "</ol>")
        else:
            parts.append("<p>(none)</p>")
        parts.append("<h2>Notes</h2>")
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in self.notes) + "</ul>" if self.notes else "<p>(none)</p>")
        for label, m in (("Baseline", b), ("Compressed", c)):
            if m.details:
                parts.append(f"<h2>{label} details ({e(m.name)}, {e(m.kind)})</h2>")
                parts.append("<ul>" + "".join(f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in m.details.items()) + "</ul>")
        parts.append("<h2>Environment</h2>")
        parts.append("<ul>" + "".join(f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in self.environment.items()) + "</ul>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    # --- files ---------------------------------------------------------------------------

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write report.md, report.json and report.html into ``out_dir`` (each atomically).

        Returns ``{"markdown": path, "json": path, "html": path}``.
        """
        out = Path(out_dir)
        paths = {"markdown": out / "report.md", "json": out / "report.json", "html": out / "report.html"}
        # Render everything first so a rendering error leaves no partial set of files.
        texts = {"markdown": self.to_markdown(), "json": self.to_json() + "\n", "html": self.to_html()}
        for key, path in paths.items():
            atomic_write_text(path, texts[key])
        return paths


def _png(fig) -> str:
    """Render a matplotlib Figure with the Agg canvas to base64 PNG text (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No PNG metadata: the default one embeds a matplotlib URL, and the file need not say it.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")
