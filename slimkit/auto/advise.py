"""``slimkit advise``: which compression to use for this model on this machine, ranked by measurement.

The decision tree (each answer comes from a fact or a probe, and is printed with the advice):

1. Does the model generate token by token? Then decoding multiplies one row per token by
   every weight: memory-bandwidth bound, so weight bits decide speed and quantizing the
   activations cannot help (W8A8 pays a quantize per row for nothing). Otherwise the
   Linears see batch × sequence rows: compute bound, where integer GEMMs (W8A8) can win.
2. Is there int8 dot-product hardware (AVX-512 VNNI, AVX-VNNI, AMX)? Without it (AVX2)
   an int8 GEMM widens through 16-bit multiply-adds and ONNX Runtime's u8s8 path needs
   7-bit weights to stay exact, so its gain over fp32 is small and only a probe says
   whether it exists; with it, W8A8 is expected to win for batched inputs.
3. Are there activation outliers (a Linear input channel ≥ 20× the median one)? Then
   static int8 activations get SmoothQuant's scale migration.
4. Which runtimes are installed (torch always; ONNX Runtime; llama.cpp for GGUF)?
5. May the architecture change (``keep_architecture=False``: structured pruning and
   low-rank factorization, with a distillation recovery)? They cut work on every ISA.
6. The target orders the candidates: ``latency`` by the expected time from the probes,
   ``size`` by the expected bytes, ``memory`` by the expected bytes the runtime holds.

The expected time of a candidate is the model's measured fp32 time in its runtime with each
Linear's fp32 time replaced by the probed time of that Linear shape on the candidate's path
(``probes.expected_ms``). Sizes are computed from the parameter counts and the format's bits.
With ``max_drop``, each candidate's steps also run on a copy of the model (training steps
left out) and its headline quality figure is measured on the *calibration* split; a candidate
whose relative drop exceeds ``max_drop`` is not recommended. A candidate with a recovery step
is measured before recovery (the figure is pessimistic) and says so.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.auto.facts import MachineFacts, ModelFacts, machine_facts, model_facts
from slimkit.auto.probes import ProbePath, ShapeTimes, expected_ms, probe_shapes
from slimkit.auto.sensitivity import Sensitivity, layer_sensitivity
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.measure import model_latency
from slimkit.distillation.distill import Distill
from slimkit.evaluation.report import QUALITY_DIRECTIONS
from slimkit.factorization.svd import SVD
from slimkit.pruning.structured import StructuredPrune
from slimkit.quantization.gptq import GPTQ
from slimkit.quantization.ptq import DynamicQuant, StaticQuant
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.schema import Recipe, Stage
from slimkit.tasks import task_of

TARGETS = ("latency", "size", "memory")
#: the shapes probed: the fewest, most-weights-first, holding this share of the Linear weights
PROBE_COVERAGE = 0.9
RECOVERY_STEPS = 300
#: a compression must be expected below this fraction of fp32's time to rank above no compression
#: (one-layer probes predict whole-model times to within about ±20% on a 2-core VM: A3 in BENCHMARKS.md)
NO_GAIN = 0.95


@dataclass
class Candidate:
    """One recipe advise can recommend, with what is expected of it and why."""

    name: str
    runtime: str  # where it runs fastest: "torch" or "onnxruntime"
    steps: tuple[Config, ...]
    risk: str  # "low", "medium", "high": how much quality such a step usually costs
    path: str  # the probe label its Linears run on
    shrink: tuple[str, str] | None = None  # (float, smaller) torch labels when its layers get smaller
    reason: str = ""
    expected_bytes: int = 0
    expected_memory: int = 0
    expected_ms: float | None = None
    quality: dict[str, Any] | None = None  # measured with max_drop: metric, baseline, value, drop
    excluded: str | None = None  # why it is not recommended (a path failed, over max_drop)

    @property
    def uncompressed(self) -> bool:
        """Whether this is the model as it is (fp32 in its runtime): the choice compression must beat."""
        return not self.steps

    @property
    def needs_training(self) -> bool:
        """Whether the recipe trains (a recovery step)."""
        return any(isinstance(s, Distill) for s in self.steps)

    def recipe(self, model: str | None) -> Recipe:
        """The candidate as a recipe ``slimkit compress`` runs (one stage per step)."""
        stages = tuple(Stage(type(s).__name__.lower() if i else "compress", (s,)) for i, s in enumerate(self.steps))
        names = [st.name for st in stages]
        stages = tuple(Stage(f"{st.name}-{i}" if names.count(st.name) > 1 else st.name, st.steps)
                       for i, st in enumerate(stages))
        return Recipe(stages=stages, model=model)

    def to_dict(self, model: str | None = None) -> dict[str, Any]:
        """JSON-ready summary, the recipe as YAML text included."""
        return {"name": self.name, "runtime": self.runtime, "risk": self.risk, "reason": self.reason,
                "expected_bytes": self.expected_bytes, "expected_memory_bytes": self.expected_memory,
                "expected_ms": None if self.expected_ms is None else round(self.expected_ms, 3),
                "needs_training": self.needs_training, "quality": self.quality, "excluded": self.excluded,
                "recipe": None if self.uncompressed else self.recipe(model).to_yaml()}


@dataclass
class Advice:
    """The facts, the decision tree's answers, the probes and the ranked candidates."""

    machine: MachineFacts
    model: ModelFacts
    target: str
    max_drop: float | None
    tree: list[tuple[str, str]]  # (question, answer and consequence)
    baselines_ms: dict[str, float]  # runtime -> measured fp32 time (ms per call or per token)
    unit: str  # what a time is: "ms per decoded token" or "ms per batch of ..."
    probes: list[ShapeTimes]
    candidates: list[Candidate]  # ranked: the first is the recommendation
    model_name: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    sensitivity: Sensitivity | None = None

    @property
    def best(self) -> Candidate | None:
        """The recommendation: the first candidate that is not excluded."""
        return next((c for c in self.candidates if c.excluded is None), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"target": self.target, "max_drop": self.max_drop, "machine": self.machine.to_dict(),
                "model": self.model.to_dict(), "decision_tree": [{"question": q, "answer": a} for q, a in self.tree],
                "baselines_ms": {k: round(v, 3) for k, v in self.baselines_ms.items()}, "time_unit": self.unit,
                "probes": [{"shape": list(p.shape), "layers": p.layers, "rows": p.rows,
                            "ms": {k: None if v is None else round(v, 4) for k, v in p.ms.items()},
                            "failures": p.failures} for p in self.probes],
                "candidates": [c.to_dict(self.model_name) for c in self.candidates],
                "recommendation": None if self.best is None else self.best.name,
                "seconds": round(self.seconds, 1), "notes": self.notes,
                "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict()}

    def to_markdown(self) -> str:
        """The advice as Markdown: the machine, the tree, the ranked table, the recommendation."""
        m = self.machine
        lines = [f"# slimkit advise: {self.model_name or self.model.kind} for {self.target}", "",
                 f"Machine: {m.cpu}, {m.isa}, {m.cores} cores ({m.threads} torch threads), "
                 f"{m.memory_gib} GiB; runtimes: " + ", ".join(f"{k} {v}" for k, v in m.runtimes.items()) + ".",
                 (f"Model: {self.model.kind}, {self.model.params:,} parameters ({self.model.fp32_bytes / 1e6:.2f} MB "
                 f"fp32), {self.model.linear_layers} Linear layers holding {self.model.linear_params:,}."), "",
                 "## Decision tree", ""]
        lines += [f"{i}. **{q}** {a}" for i, (q, a) in enumerate(self.tree, 1)]
        lines += ["", f"## Candidates (ranked by expected {self.target}; times in {self.unit})", "",
                  ("| # | candidate | runtime | expected time | × fp32 (same runtime) | expected size | risk | "
                  "quality (calibration split) | why |"), "|---:|:---|:---|---:|---:|---:|:---|:---|:---|"]
        for i, c in enumerate(self.candidates, 1):
            base = self.baselines_ms.get(c.runtime)
            ratio = "" if c.expected_ms is None or not base else f"{c.expected_ms / base:.2f}×"
            ms = "" if c.expected_ms is None else f"{c.expected_ms:.2f}"
            q = "" if c.quality is None else _quality_text(c.quality)
            why = c.reason + (f" — **not recommended: {c.excluded}**" if c.excluded else "")
            lines.append(f"| {i} | {c.name} | {c.runtime} | {ms} | {ratio} | {c.expected_bytes / 1e6:.2f} MB | "
                         f"{c.risk} | {q} | {why} |")
        best = self.best
        lines += ["", ("**Recommendation:** " + best.name + f" ({best.reason})") if best else
                  "**No recommendation:** every candidate was excluded (see the table)."]
        lines += [f"- {n}" for n in self.notes]
        if self.sensitivity is not None:
            lines += ["", "## Per-layer sensitivity", "", self.sensitivity.to_markdown()]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """One self-contained page: the advice as Markdown text and, when measured, the sensitivity plot."""
        import html

        parts = ["<!doctype html><meta charset='utf-8'><title>slimkit advise</title>",
                 "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}pre{white-space:pre-wrap}</style>",
                 f"<pre>{html.escape(self.to_markdown())}</pre>"]
        if self.sensitivity is not None:
            parts.append('<h2>Per-layer sensitivity</h2><img id="sensitivity-plot" alt="per-layer sensitivity" '
                         f'src="data:image/png;base64,{self.sensitivity.plot_png()}">')
        return "\n".join(parts) + "\n"


def _quality_text(q: dict[str, Any]) -> str:
    text = f"{q['metric']} {q['value']:.4g} (drop {q['drop'] * 100:.2f}%)"
    return text + (" before recovery" if q.get("before_recovery") else "")


# ---------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------


def _linear_scale_bytes(facts: ModelFacts, group: int | None, scale_bytes: int = 4) -> int:
    """Bytes of the scales of every Linear: one per output row (per channel) or per group of inputs."""
    return sum(n * out * (1 if group is None else math.ceil(inp / group)) * scale_bytes
               for (out, inp), n in facts.shapes)


def expected_bytes(facts: ModelFacts, linear_bits: float, group: int | None = None, embedding_bits: int = 32,
                   keep: float = 1.0, scale_bytes: int = 4) -> int:
    """Bytes of the weights after a step: Linears at ``linear_bits`` (× ``keep`` of them), embeddings at
    ``embedding_bits`` (8: one fp32 scale per row too), convolutions and the rest in fp32."""
    linear = facts.linear_params * keep * linear_bits / 8
    if linear_bits < 32:
        linear += _linear_scale_bytes(facts, group, scale_bytes) * keep
    emb = facts.embedding_params * embedding_bits / 8
    if embedding_bits == 8:  # one fp32 scale per row
        emb += 4 * facts.embedding_rows
    elif embedding_bits < 8:  # one fp32 scale per group of a row (RTN's group_size, 32 here)
        emb += 4 * facts.embedding_params / 32
    return int(linear + emb + 4 * (facts.conv_params + facts.other_params))


# ---------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------

TORCH_FP32, ORT_FP32 = "torch fp32", "ORT fp32"
STRUCTURED, LOWRANK = "torch structured 30%", "torch low-rank ½"


def _int4_group(facts: ModelFacts) -> int:
    return 128 if all(inp % 128 == 0 for (_, inp), _ in facts.shapes) else 32


def probe_paths(facts: ModelFacts, machine: MachineFacts) -> list[ProbePath]:
    """The Linear paths worth timing for this model on this machine (each as its candidates configure it)."""
    g = _int4_group(facts)
    narrow = machine.int8_accelerator is None  # 7-bit weights: exact u8s8 GEMMs without VNNI
    paths = [ProbePath("torch", TORCH_FP32), ProbePath("torch", "torch int8 weight-only", RTN(bits=8)),
             ProbePath("torch", "torch int4 weight-only", RTN(bits=4, group_size=g)),
             ProbePath("torch", "torch W8A8 dynamic", DynamicQuant(bits=8)),
             ProbePath("torch", STRUCTURED, shape_change="structured"),
             ProbePath("torch", LOWRANK, shape_change="lowrank")]
    if "onnxruntime" in machine.runtimes and not facts.generates:
        paths += [ProbePath("onnxruntime", ORT_FP32), ProbePath("onnxruntime", "ORT int8 dynamic", DynamicQuant(bits=8, reduce_range=narrow)),
                  ProbePath("onnxruntime", "ORT int8 static", StaticQuant(bits=8, reduce_range=narrow)),
                  ProbePath("onnxruntime", "ORT int4 weight-only", RTN(bits=4, group_size=32))]
    return paths


def build_candidates(facts: ModelFacts, machine: MachineFacts, keep_architecture: bool = False) -> list[Candidate]:
    """Every candidate the tree allows for this model and machine, not yet ranked."""
    g = _int4_group(facts)
    emb = facts.embedding_params > 0
    accel = machine.int8_accelerator is not None
    smooth = 0.5 if facts.outlier_layers else None
    recovery = Distill(student="", steps=RECOVERY_STEPS, lr=5e-4, warmup_steps=30, batch_size=16, eval_every=100)
    # GPTQ (blocks, calibrated) for a decoder; RTN elsewhere, with int4 embedding rows too
    four_bit = (GPTQ(bits=4, group_size=g, symmetric=True) if facts.generates
                else RTN(bits=4, group_size=g, embeddings=emb))
    emb8, emb4 = (8 if emb else 32), (4 if emb and not facts.generates else 32)
    cands = [
        Candidate("int8 weight-only", "torch", (RTN(bits=8, embeddings=emb),), "low", "torch int8 weight-only",
                  reason="8-bit codes of every weight, computed by torch's int8 weight kernel where it won the probe",
                  expected_bytes=expected_bytes(facts, 8, embedding_bits=emb8)),
        Candidate(f"int4 weight-only ({type(four_bit).__name__}, group {g})", "torch", (four_bit,), "medium",
                  "torch int4 weight-only", reason="4-bit codes of every Linear"
                  + (", GPTQ's error correction (calibrated)" if facts.generates else ""),
                  expected_bytes=expected_bytes(facts, 4, g, embedding_bits=emb4)),
    ]
    if not facts.generates:
        cands.append(Candidate("W8A8 dynamic (torch)", "torch", (DynamicQuant(bits=8, embeddings=emb),), "low",
                               "torch W8A8 dynamic", reason="int8 weights and per-batch int8 activations through "
                               "torch._int_mm", expected_bytes=expected_bytes(facts, 8, embedding_bits=emb8)))
    if "onnxruntime" in machine.runtimes and not facts.generates:
        static = StaticQuant(bits=8, reduce_range=not accel, smooth_alpha=smooth, embeddings=emb)
        cands += [
            Candidate("int8 dynamic (ONNX Runtime)", "onnxruntime",
                      (DynamicQuant(bits=8, reduce_range=not accel, embeddings=emb),), "low", "ORT int8 dynamic",
                      reason="ORT's MatMulInteger with activations quantized per call",
                      expected_bytes=expected_bytes(facts, 8, embedding_bits=emb8)),
            Candidate("int8 static (ONNX Runtime)", "onnxruntime", (static,), "low", "ORT int8 static",
                      reason="calibrated int8 activations: ORT's QLinear kernels"
                      + (", SmoothQuant for the outlier channels" if smooth else ""),
                      expected_bytes=expected_bytes(facts, 8, embedding_bits=emb8)),
            Candidate("int4 weight-only (ONNX Runtime)", "onnxruntime", (RTN(bits=4, group_size=32, embeddings=emb),),
                      "medium", "ORT int4 weight-only", reason="ORT's MatMulNBits",
                      expected_bytes=expected_bytes(facts, 4, 32, embedding_bits=emb4)),
        ]
    if not keep_architecture:
        prune = StructuredPrune(ratio=0.3, importance="l2")
        cands.append(Candidate("structured 30% + recovery", "torch", (prune, recovery), "high", TORCH_FP32,
                               (TORCH_FP32, STRUCTURED), reason="30% of heads/neurons/channels removed, then "
                               f"{RECOVERY_STEPS} distillation steps against the original",
                               expected_bytes=expected_bytes(facts, 32, keep=STRUCTURED_KEEP_WEIGHTS)))
        if "onnxruntime" in machine.runtimes and not facts.generates:
            static = StaticQuant(bits=8, reduce_range=not accel, smooth_alpha=smooth, embeddings=emb)
            cands.append(Candidate("structured 30% + recovery + int8 static (ONNX Runtime)", "onnxruntime",
                                   (prune, recovery, static), "high", "ORT int8 static", (TORCH_FP32, STRUCTURED),
                                   reason="less work and int8 kernels for what remains",
                                   expected_bytes=expected_bytes(facts, 8, embedding_bits=emb8,
                                                                 keep=STRUCTURED_KEEP_WEIGHTS)))
        cands.append(Candidate("low-rank ½ (SVD) + recovery", "torch", (SVD(param_ratio=0.5), recovery), "high",
                               TORCH_FP32, (TORCH_FP32, LOWRANK),
                               reason="each Linear as two thin ones holding half its weights",
                               expected_bytes=expected_bytes(facts, 32, keep=0.5)))
    if facts.generates:
        joint = GPTQ(bits=4, group_size=g, symmetric=True, pattern="2:4", fp16_scales=True)
        cands.append(Candidate("2:4 sparse + int4 (GPTQ joint)", "torch", (joint,), "high", "torch int4 weight-only",
                               reason="half the weights removed in 2:4 pairs while quantizing: 2.875 bits per "
                               "weight on disk; no CPU kernel skips the zeros, so it runs as int4",
                               expected_bytes=expected_bytes(facts, 2.875, g, scale_bytes=0)))
    for c in cands:
        # torch's int4 kernel computes from a repacked copy of the codes, held beside them (+0.5 B per weight)
        c.expected_memory = c.expected_bytes + (facts.linear_params // 2 if c.path == "torch int4 weight-only" else 0)
    return cands


def uncompressed(runtime: str, facts: ModelFacts) -> Candidate:
    """The model as it is, in ``runtime`` (for ONNX Runtime: exported, not compressed)."""
    how = "as it is" if runtime == "torch" else "exported to ONNX Runtime (slimkit export onnx), not compressed"
    return Candidate(f"no compression (fp32, {'torch' if runtime == 'torch' else 'ONNX Runtime'})", runtime, (), "low",
                     TORCH_FP32 if runtime == "torch" else ORT_FP32, reason=f"the fp32 model {how}; a compression "
                     f"must be expected at least {1 - NO_GAIN:.0%} faster to rank above it",
                     expected_bytes=facts.fp32_bytes, expected_memory=facts.fp32_bytes)


#: structured 30% removes rows of half the Linears and columns of the other half: 70% of their weights stay
STRUCTURED_KEEP_WEIGHTS = 0.7


# ---------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------


def decision_tree(facts: ModelFacts, machine: MachineFacts, target: str, keep_architecture: bool) -> list[tuple[str, str]]:
    """The tree's questions with this model's and machine's answers (what each answer implies)."""
    tree = []
    if facts.generates:
        tree.append(("Does it generate token by token?", ("Yes: decoding is memory-bandwidth bound (one row per "
                     "weight read), so fewer weight bits decide speed; W8A8 is not a candidate.")))
    else:
        tree.append(("Does it generate token by token?", ("No: its Linears see batches of rows, compute bound; "
                     "integer GEMMs (W8A8) are candidates.")))
    if machine.int8_accelerator:
        tree.append(("int8 dot-product hardware?", (f"Yes ({machine.int8_accelerator}): int8 GEMMs are expected "
                     "to beat fp32 for batched inputs; weights use the full 8-bit range.")))
    else:
        tree.append(("int8 dot-product hardware?", (f"No ({machine.isa}): int8 GEMMs widen through 16-bit "
                     "multiply-adds and ORT's u8s8 path needs 7-bit weights (reduce_range); the probes decide "
                     "whether int8 wins at all.")))
    ratios = [r for r in facts.outliers.values()]
    if not ratios:
        tree.append(("Activation outliers?", "Not measured (no calibration data)."))
    elif facts.outlier_layers:
        tree.append(("Activation outliers?", (f"Yes: {len(facts.outlier_layers)} of {len(ratios)} Linear inputs "
                     f"have a channel ≥ 20× the median (max {max(ratios):.0f}×); static int8 gets SmoothQuant.")))
    else:
        tree.append(("Activation outliers?", (f"No (largest channel {max(ratios):.1f}× the median): plain "
                     "per-tensor int8 activations suffice.")))
    extra = [k for k in machine.runtimes if k != "torch"]
    tree.append(("Runtimes installed?", "torch" + ("" if not extra else " and " + ", ".join(extra))
                 + ("" if "onnxruntime" in machine.runtimes else "; ONNX Runtime candidates need "
                    "`pip install onnxruntime`") + (" (ONNX Runtime candidates are probed for models that do not "
                                                    "generate)" if facts.generates and "onnxruntime" in extra else "")))
    tree.append(("May the architecture change?", "No (keep_architecture): quantization only." if keep_architecture
                 else "Yes: structured pruning and low-rank factorization with a distillation recovery are "
                 "candidates; they cut work on every ISA."))
    key = {"latency": "the expected time from the probes", "size": "the expected bytes on disk",
           "memory": "the expected bytes the runtime holds (torch's int4 kernel keeps a repacked copy)"}[target]
    tree.append((f"Target: {target}.", f"Candidates are ranked by {key}; lower quality risk breaks ties."))
    return tree


# ---------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------


def _probe_shapes(facts: ModelFacts) -> list[tuple[tuple[int, int], int]]:
    """The most-weights-first shapes holding PROBE_COVERAGE of the Linear weights (the rest scaled from them)."""
    total = sum(o * i * n for (o, i), n in facts.shapes) or 1
    picked, held = [], 0
    for (o, i), n in facts.shapes:
        if held >= PROBE_COVERAGE * total:
            break
        picked.append(((o, i), n))
        held += o * i * n
    # scale the layer counts so the probed shapes stand for every Linear's weights
    factor = total / max(held, 1)
    return [(shape, n * factor) for shape, n in picked]


def _time_baselines(model: nn.Module, facts: ModelFacts, machine: MachineFacts, data: Any) -> tuple[dict[str, float], str, int]:
    """Measured fp32 times per runtime, their unit, and the rows each Linear sees."""
    task = task_of(model)
    if facts.generates:
        from slimkit.evaluation.generation import measure_generation

        prompt = task.generation_prompt(model, data, 64)
        stats = measure_generation(model, prompt, new_tokens=48, runs=3)
        return {"torch": 1e3 / stats.decode_tokens_per_s}, "ms per decoded token (batch 1, KV cache)", 1
    inputs, batch, seq = task.latency_inputs(model, data)
    rows = batch * (seq or 1)
    unit = f"ms per batch of {batch}" + (f" × {seq} tokens" if seq else "")
    times = {"torch": model_latency(model, inputs, warmup=2, runs=5).median_ms}
    if "onnxruntime" in machine.runtimes:
        times.update(_ort_baseline(model, inputs))
    return times, unit, rows


def _ort_baseline(model: nn.Module, inputs: Any) -> dict[str, float]:
    from slimkit.core.measure import fastest_ms
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session, run_onnx

    with tempfile.TemporaryDirectory(prefix="slimkit-advise-") as tmp:
        file = Path(tmp) / "model.onnx"
        export_onnx(copy.deepcopy(model), file)
        session = ort_session(file, threads=torch.get_num_threads())
        feed = inputs if isinstance(inputs, dict) else {"input": inputs}
        return {"onnxruntime": fastest_ms(lambda: run_onnx(session, feed), budget_s=1.0, runs=7)}


def headline(quality: dict[str, float]) -> tuple[str, float] | None:
    """The first figure of a task's quality dict whose direction is known, as (name, value); None if none is."""
    for k, v in quality.items():
        if k in QUALITY_DIRECTIONS and v is not None:
            return k, float(v)
    return None


def relative_drop(metric: str, before: float, after: float) -> float:
    """How much worse ``after`` is than ``before`` as a fraction of it (a perplexity rise, an accuracy fall)."""
    worse = after - before if QUALITY_DIRECTIONS.get(metric) == "lower" else before - after
    return worse / abs(before)


def _quality_probe(model: nn.Module, cand: Candidate, data: Any, reference: Any, base: tuple[str, float],
                   calib: Any) -> dict[str, Any]:
    """Run the candidate's steps (training left out) on a copy; its headline quality on the calibration split."""
    from slimkit.recipe.steps import apply_step

    task = task_of(model)
    work = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in cand.steps:
            if not isinstance(step, Distill):
                apply_step(work, step, data=calib)
    quality, _ = task.measure_quality(work, data, reference)
    metric, before = base
    after = float(quality[metric])
    return {"metric": metric, "baseline": before, "value": after, "drop": relative_drop(metric, before, after),
            "before_recovery": cand.needs_training}


def advise(model: nn.Module, target: str = "latency", max_drop: float | None = None, *,
           keep_architecture: bool = False, model_name: str | None = None,
           machine: MachineFacts | None = None, calibration: Any = None, sensitivity: bool = False,
           progress: Any = None) -> Advice:
    """Inspect ``model`` and this machine, probe the kernels, walk the tree, rank the candidates.

    ``target``: "latency", "size" or "memory". ``max_drop``: the largest relative drop of the
    task's headline quality figure (0.01 = 1%) a recommendation may cost, measured on the
    calibration split (never the eval split). ``machine``: facts to use instead of this
    machine's (tests fake an ISA; the probes still run here). ``calibration``: a data spec.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if max_drop is not None and not (0 <= max_drop < 1):
        raise ConfigError(f"max_drop {max_drop!r} must be a fraction in [0, 1), e.g. 0.01 for 1%")
    say = progress or (lambda text: None)
    start = time.perf_counter()
    model.eval()
    machine = machine or machine_facts()
    task = task_of(model)
    say("calibration data")
    calib = task.calibration(model, calibration)
    facts = model_facts(model, calib.batches[:4])
    data = task.eval_data(model, calibration, max_tokens=8192, split="calibration")
    reference = base = None
    if max_drop is not None:  # checked before the probes: a model without a quality figure fails fast
        say("baseline quality")
        reference = task.reference(model, data)
        base = headline(task.measure_quality(model, data, reference)[0])
        if base is None:
            raise ConfigError(f"max_drop needs a quality figure, and a {task.kind} model's task measures none; "
                              "attach a task with a metric (GenericTask(metric=...)) or leave max_drop out")
    say("fp32 baselines")
    baselines, unit, rows = _time_baselines(model, facts, machine, data)
    say("kernel probes")
    probes = probe_shapes(_probe_shapes(facts), rows, probe_paths(facts, machine), set(baselines))
    cands = build_candidates(facts, machine, keep_architecture)
    if target == "latency":  # no compression is a choice too: what the others must beat by more than the noise
        cands += [uncompressed(rt, facts) for rt in baselines]
    fp32_of = {"torch": TORCH_FP32, "onnxruntime": ORT_FP32}
    for c in cands:
        c.expected_ms = (baselines[c.runtime] if c.uncompressed else
                         expected_ms(baselines[c.runtime], probes, fp32_of[c.runtime], c.path, c.shrink))
        if c.expected_ms is None:
            failed = sorted({f"{k}: {v}" for p in probes for k, v in p.failures.items() if k in (c.path, *(c.shrink or ()))})
            c.excluded = "its probe did not run (" + ("; ".join(failed) or "no time") + ")"
    if max_drop is not None:
        for c in cands:
            if c.excluded:
                continue
            say(f"quality: {c.name}")
            c.quality = _quality_probe(model, c, data, reference, base, calib)
            if c.quality["drop"] > max_drop and not c.needs_training:
                c.excluded = f"drop {c.quality['drop'] * 100:.2f}% > max_drop {max_drop * 100:.2f}%"
    cands = rank(cands, target, max_drop)
    advice = Advice(machine, facts, target, max_drop, decision_tree(facts, machine, target, keep_architecture),
                    baselines, unit, probes, cands, model_name=model_name)
    best = advice.best
    if target == "latency" and best is not None and best.uncompressed:
        advice.notes.append(f"No compression is expected to be at least {1 - NO_GAIN:.0%} faster than fp32 on "
                            f"{machine.isa}: at this model's layer sizes the kernels' fixed costs eat what fewer "
                            "bytes or operations save. Compression buys size here, not speed (--target size).")
    if any(c.needs_training for c in cands):
        advice.notes.append("Candidates with a recovery step are timed as their final shapes; with max_drop, their "
                            "quality is measured before recovery (training is left out of advise), so it is a floor.")
    if sensitivity:
        say("per-layer sensitivity")
        advice.sensitivity = layer_sensitivity(model, calib.batches[:4],
                                               data_description=f"{min(4, len(calib.batches))} batch(es) of {calib.description}")
    advice.seconds = time.perf_counter() - start
    return advice


RISK_ORDER = {"low": 0, "medium": 1, "high": 2}


def rank(cands: list[Candidate], target: str, max_drop: float | None = None) -> list[Candidate]:
    """Order candidates: recommendable first; by the target's expected figure; then by quality risk.

    With ``max_drop``, a candidate whose quality was verified within it goes before one whose
    quality could not be verified (a recovery step advise does not run).
    """
    def key(c: Candidate) -> tuple:
        figure = {"latency": c.expected_ms, "size": c.expected_bytes, "memory": c.expected_memory}[target]
        if c.uncompressed and figure is not None:
            figure *= NO_GAIN  # a compression must be expected clearly better than none to be worth its risk
        unverified = max_drop is not None and c.quality is not None and c.quality["drop"] > max_drop
        return (c.excluded is not None, unverified, math.inf if figure is None else figure, RISK_ORDER[c.risk])

    return sorted(cands, key=key)
