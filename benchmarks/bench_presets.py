"""C2/C3 — the combination presets (issue 20), each beside every technique on its own, measured in one run.

    python -m benchmarks.bench_presets            # full run, writes the c2-c3-presets section of BENCHMARKS.md
    python -m benchmarks.bench_presets --quick    # smoke test: a few distillation steps, few texts and runs; never written
    python -m benchmarks.bench_presets --no-write # full run, printed only
    python -m benchmarks.bench_presets --parts minilm,digits   # some models only (printed; a section needs all three)

Presets (shipped recipes, run as shipped through ``recipe.runner.run_recipe``):
- ``mobile-int8-structured-kd`` (MiniLM): StructuredPrune 30% of heads and MLP neurons (L2) → Distill recovery
  against the unpruned model (cosine + a hint on every layer's token states) → StaticQuant int8 (int8-static-minilm's settings);
- ``mobile-int8-structured-kd-digits`` (digits-cnn): StructuredPrune 30% of the filters (L1, widths rounded down
  to multiples of 8, BatchNorm re-estimated) → KD recovery against the unpruned model → StaticQuant int8;
- ``distill-quantize-prune`` (stdlib-coder): Distill into stdlib-coder-student → GPTQ int8 per channel pruning
  2:4 in the same pass (SparseGPT's joint mode) → RTN int8 of lm_head and the embedding rows.

Single-technique rows, each one step (or one step plus the same recovery) on the uncompressed model:
- MiniLM: fp32; StaticQuant int8 alone (recipe int8-static-minilm); structured 30% alone and 30% + recovery (the
  preset's own model after its first and second stage); structured 50% alone (no recovery: an fp32 model at half
  the encoder is still over 3x the preset's size, so its recovery could not change C2, and skipping it keeps the
  run within 30 minutes); RTN int4 weight-only (group 32, embedding rows int4 too), a single technique near the
  preset's size;
- digits-cnn: fp32; StaticQuant int8 alone (the preset's quantize step); structured 30% alone and 30% + recovery
  (the preset's stages); structured 50% + the same recovery; the KD student alone (recipe kd-digits: a 4x narrower
  CNN trained from scratch by distillation);
- stdlib-coder: fp32; the KD student alone (the preset's model after its distill stage, i.e. recipe
  distill-stdlib-coder); GPTQ int8 alone, GPTQ int8 pruning 2:4 in the same pass, SparseGPT 2:4 alone (recipe
  sparsegpt-2of4) and GPTQ int4 g128 (recipe w4-gptq), all on the teacher's 42 block layers with lm_head and the
  embedding fp32; RTN int8 of every weight, the embedding table and lm_head included (recipe int8-weight-only).

Quality: MiniLM, mean (and min) cosine of mean-pooled sentence embeddings to the fp32 model's, both from ONNX
Runtime, on 256 eval-split sentences padded to 128 tokens (bench_int8_minilm's measure); digits-cnn, top-1 accuracy
of the ONNX Runtime model on the 540 test images; stdlib-coder, sliding-window perplexity (context 256, stride 128)
on the first 65,536 tokens of the stdlib eval split. Training reads the train splits and calibration the
calibration splits only (recipes' own specs).

Size: bytes on disk. MiniLM and digits-cnn: the ONNX file ONNX Runtime runs (``slimkit.export.onnx.export_onnx``,
external data counted), and beside it the ``slimkit.save`` folder; stdlib-coder: the ``slimkit.save`` folder.
Latency (MiniLM, digits-cnn): ONNX Runtime, 2 intra-op threads, MiniLM one 32 × 128 batch, digits one batch of 256,
every row of a model interleaved (warm-up 3, median of 20 calls in 4 rounds); stdlib-coder is not timed (C2 asks
size and quality; bench_generate measures its decoding).

Pareto: a row is dominated when another row of the same model is no larger on disk and no worse in quality, and
better in one of the two; the column names the dominating rows. MiniLM and digits-cnn are judged on both sizes
(the ONNX file and the slimkit.save folder), the column saying both where they differ.
C2: each preset row is on that front, or the table says which single technique dominates it and why.
C3: the MiniLM preset's ONNX Runtime latency ≤ 0.45× ORT fp32 with mean cosine ≥ 0.97.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import harness

SECTION = "c2-c3-presets"
THREADS = 2
PARTS = ("minilm", "digits", "coder")
C3_LATENCY, C3_COSINE = 0.45, 0.97
PRESETS = {"minilm": "mobile-int8-structured-kd", "digits": "mobile-int8-structured-kd-digits",
           "coder": "distill-quantize-prune"}


@dataclass(frozen=True)
class Settings:
    quick: bool
    distill_steps: int | None  # None: the recipes' own
    n_eval: int  # MiniLM eval sentences
    eval_tokens: int  # stdlib-coder perplexity tokens
    calib_n: int | None  # None: the recipes' own calibration size
    warmup: int
    runs: int
    rounds: int


FULL = Settings(False, None, 256, 65536, None, 3, 20, 4)
QUICK = Settings(True, 4, 64, 4096, 16, 1, 4, 2)


@dataclass
class Row:
    """One variant of one model: how it was made, what was measured."""

    label: str
    family: str  # "fp32" | "single" | "preset" | "variant" (a preset changed; not a C2 comparison)
    why: str = ""  # what the technique changes (used when it dominates a preset)
    model: nn.Module | None = None
    lm: nn.Module | None = None  # stdlib-coder rows: the model perplexity runs on
    size: int | None = None  # slimkit.save folder bytes
    onnx_size: int | None = None
    run: Callable[[Any], Any] | None = None  # ONNX Runtime call on one input
    quality: float | None = None  # mean cosine / accuracy / perplexity
    min_cosine: float | None = None
    ppl: float | None = None
    latency: Any = None
    seconds: float | None = None
    other_load: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    pareto: str = ""


# ---------------------------------------------------------------------------------------
# Running recipes
# ---------------------------------------------------------------------------------------


def shipped(name: str, settings: Settings):
    """The shipped recipe ``name``, with its Distill steps and calibration size cut in --quick."""
    from slimkit.distillation.distill import Distill
    from slimkit.recipe.schema import Stage, resolve_recipe

    r = resolve_recipe(name)
    if settings.distill_steps is not None:
        short = {"steps": settings.distill_steps, "warmup_steps": 1, "eval_every": 0}
        r = dataclasses.replace(r, stages=tuple(
            Stage(st.name, tuple(dataclasses.replace(s, **short) if isinstance(s, Distill) else s for s in st.steps))
            for st in r.stages))
    if settings.calib_n is not None and r.calibration is not None:
        r = dataclasses.replace(r, calibration=dataclasses.replace(r.calibration, n=settings.calib_n))
    return r


def variant(recipe, stages: list[str], **step_changes):
    """``recipe`` keeping only the named stages, with fields of its steps replaced where they exist."""
    from slimkit.recipe.schema import Stage

    kept = []
    for st in recipe.stages:
        if st.name in stages:
            kept.append(Stage(st.name, tuple(
                dataclasses.replace(s, **{k: v for k, v in step_changes.items() if hasattr(s, k)}) for s in st.steps)))
    return dataclasses.replace(recipe, stages=tuple(kept))


def one_step(recipe, step):
    """``recipe``'s model and calibration with the single step ``step``."""
    from slimkit.recipe.schema import Stage

    return dataclasses.replace(recipe, stages=(Stage("single", (step,)),))


def run(row: Row, base: nn.Module, recipe, keep_stages: dict[str, Row] | None = None) -> None:
    """Run ``recipe`` on a copy of ``base`` into ``row.model`` (timed); ``keep_stages`` rows get a copy of the
    model after that stage (their ``seconds`` are the run's seconds up to there)."""
    from slimkit.core.registry import Context
    from slimkit.recipe.runner import run_recipe

    start = time.perf_counter()

    def after(stage: str, model: nn.Module, _ctx: Any) -> None:
        if keep_stages and stage in keep_stages:
            kept = keep_stages[stage]
            kept.model, kept.seconds = copy.deepcopy(model).eval(), time.perf_counter() - start

    def go() -> None:
        ctx = Context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx = run_recipe(copy.deepcopy(base), recipe, ctx=ctx, after_stage=after)
        row.model = ctx.model.eval()
        row.notes += [n for n in ctx.notes if n.startswith("Distill:") or "back to float" in n]

    print(f"  {row.label}", flush=True)
    harness.guard(row, "compress", lambda: harness.timed_row(row, go))
    if keep_stages and row.error:
        for kept in keep_stages.values():
            kept.error = kept.error or row.error


# ---------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------


def minilm_rows(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from benchmarks.bench_int8_minilm import (
        SHAPE,
        _embed,
        _file_size,
        _ort_runner,
        _tokenize,
    )
    from slimkit.export.onnx import export_onnx
    from slimkit.tasks.metrics import embedding_fidelity
    from slimkit.zoo import minilm

    dense = sk.load("minilm").eval()
    preset = shipped(PRESETS["minilm"], settings)
    prune, = [s for s in preset.steps if type(s).__name__ == "StructuredPrune"]
    fp32 = Row("fp32", "fp32", model=dense)
    int8 = Row("StaticQuant int8 alone (int8-static-minilm)", "single",
               "int8 codes and int8 kernels for every encoder Linear and the embedding rows, all 12 heads and 1536 "
               "neurons kept")
    s30 = Row("StructuredPrune 30% alone (no recovery)", "single", "the preset's model after its prune stage")
    s30kd = Row("StructuredPrune 30% + recovery", "single", "the preset's model after its recover stage (fp32)")
    s50 = Row("StructuredPrune 50% alone (no recovery)", "single", "half the heads and neurons gone, fp32 weights")
    rtn4 = Row("RTN int4 weight-only, group 32, embedding rows int4", "single",
               "4-bit codes for every weight, the 11.7M-weight embedding table included, against the preset's "
               "8 bits: halving the bits of all 22.3M weights saves more bytes than removing 30% of the encoder's "
               "10.6M Linear weights; it buys no speed (weight-only: ONNX Runtime dequantizes to float matmuls)")
    ours = Row(f"preset {PRESETS['minilm']}", "preset")
    run(ours, dense, preset, {"prune": s30, "recover": s30kd})
    run(int8, dense, shipped("int8-static-minilm", settings))
    run(s50, dense, variant(preset, ["prune"], ratio=0.5))
    run(rtn4, dense, one_step(preset, sk.RTN(bits=4, group_size=32, embeddings=True, ignore=("pooler.dense",))))
    rows = [fp32, int8, s30, s30kd, s50, rtn4, ours]

    tokenizer = sk.tokenizer_of(dense)
    eval_batches = _tokenize(tokenizer, minilm.sample_texts("eval", n=settings.n_eval))
    for i, r in enumerate(rows):
        if r.error:
            continue

        def export(r=r, i=i) -> None:
            r.size = harness.saved_size(r.model)
            path = work / f"minilm-{i}.onnx"
            export_onnx(r.model, path)
            r.onnx_size, r.run = _file_size(path), _ort_runner(path)

        print(f"  export: {r.label}", flush=True)
        harness.guard(r, "export", export)
    reference = _embed(fp32.run, eval_batches) if fp32.run else None
    for r in rows:
        if r.run is not None and reference is not None:
            fid = harness.guard(r, "embed", lambda r=r: embedding_fidelity(_embed(r.run, eval_batches), reference))
            if fid is not None:
                r.quality, r.min_cosine = fid.mean_cosine, fid.min_cosine
    live = [r for r in rows if r.run is not None and not r.error]
    feeds = eval_batches[0]
    print("  latency (interleaved)", flush=True)
    timing = harness.timed_interleaved({r.label: (lambda r=r: r.run(feeds)) for r in live}, warmup=settings.warmup,
                                       runs=settings.runs, rounds=settings.rounds, batch_size=SHAPE[0], seq_len=SHAPE[1])
    for r in live:
        r.latency = timing.stats[r.label]
    for r in rows:
        r.model = None  # free memory before the next model
    return rows, {"shape": SHAPE, "other_load": timing.other_load, "n_eval": settings.n_eval,
                  "prune": prune, "recipe": preset}


# ---------------------------------------------------------------------------------------
# digits-cnn
# ---------------------------------------------------------------------------------------


def digits_rows(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from benchmarks.bench_quant_digits import BATCH, _ort_accuracy, _ort_runner
    from slimkit.export.onnx import export_onnx
    from slimkit.zoo.digits import load_digits_split

    dense = sk.load("digits-cnn").eval()
    preset = shipped(PRESETS["digits"], settings)
    quant, = [s for s in preset.steps if type(s).__name__ == "StaticQuant"]
    fp32 = Row("fp32", "fp32", model=dense)
    int8 = Row("StaticQuant int8 alone (the preset's quantize step)", "single",
               "int8 codes for every conv and the classifier, all 32/64/128 filters kept")
    s30 = Row("StructuredPrune 30% alone (BatchNorm re-estimated, no recovery)", "single",
              "the preset's model after its prune stage")
    s30kd = Row("StructuredPrune 30% + KD recovery", "single", "the preset's model after its recover stage (fp32)")
    s50kd = Row("StructuredPrune 50% + the same KD recovery", "single", "half the filters gone, fp32 weights")
    kd = Row("KD student alone (kd-digits: channels 8/16/32 from scratch)", "single",
             "a 4x narrower CNN (6.3k parameters) distilled from the teacher: 15x fewer weights than the dense "
             "model, in fp32")
    ours = Row(f"preset {PRESETS['digits']}", "preset")
    run(ours, dense, preset, {"prune": s30, "recover": s30kd})
    run(int8, dense, one_step(preset, quant))
    run(s50kd, dense, variant(preset, ["prune", "recover"], ratio=0.5))
    run(kd, dense, shipped("kd-digits", settings))
    rows = [fp32, int8, s30, s30kd, s50kd, kd, ours]

    x, y = load_digits_split("test")
    batch = x[:BATCH].numpy()
    for i, r in enumerate(rows):
        if r.error:
            continue

        def export(r=r, i=i) -> None:
            r.size = harness.saved_size(r.model)
            path = work / f"digits-{i}.onnx"
            export_onnx(r.model, path)
            r.onnx_size, r.run = path.stat().st_size, _ort_runner(path)
            r.quality = _ort_accuracy(r.run, x, y)

        harness.guard(r, "export", export)
    live = [r for r in rows if r.run is not None and not r.error]
    timing = harness.timed_interleaved({r.label: (lambda r=r: r.run(batch)) for r in live}, warmup=settings.warmup,
                                       runs=settings.runs, rounds=settings.rounds, batch_size=BATCH)
    for r in live:
        r.latency = timing.stats[r.label]
    for r in rows:
        r.model = None
    return rows, {"batch": BATCH, "other_load": timing.other_load, "n_test": len(x)}


# ---------------------------------------------------------------------------------------
# stdlib-coder
# ---------------------------------------------------------------------------------------


def coder_rows(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.evaluation.suite import resolve_eval_data

    teacher = sk.load("stdlib-coder").eval()
    preset = shipped(PRESETS["coder"], settings)
    gptq, = [s for s in preset.steps if type(s).__name__ == "GPTQ"]
    fp32 = Row("fp32 (teacher, 6 layers)", "fp32", model=teacher)
    student = Row("KD student alone (distill-stdlib-coder: 2 layers, hidden 192)", "single",
                  "the preset's model after its distill stage (fp32)")
    g8 = Row("GPTQ int8 alone (teacher)", "single", "int8 codes in the teacher's 42 block layers")
    g8_24 = Row("GPTQ int8 pruning 2:4 in the same pass (teacher)", "single",
                "the preset's own quantize-prune step on the teacher")
    sp24 = Row("SparseGPT 2:4 alone (sparsegpt-2of4)", "single", "2:4 zeros in the teacher's block layers, fp32")
    g4 = Row("GPTQ int4 g128 alone (w4-gptq)", "single", "4-bit codes in the teacher's block layers")
    rtn8 = Row("RTN int8 of every weight, embedding and lm_head included (int8-weight-only)", "single",
               "it quantizes the token embedding and lm_head too — half of the teacher's 6.2M weights — "
               "which every GPTQ/SparseGPT row keeps in fp32; the 6-layer teacher at int8 is far better than "
               "the 2-layer student (the student's loss is distillation's, not quantization's)")
    ours = Row(f"preset {PRESETS['coder']}", "preset")
    run(ours, teacher, preset, {"distill": student})
    run(g8, teacher, one_step(preset, dataclasses.replace(gptq, pattern=None, sparsity=0.0)))
    run(g8_24, teacher, one_step(preset, gptq))
    run(sp24, teacher, shipped("sparsegpt-2of4", settings))
    run(g4, teacher, shipped("w4-gptq", settings))
    run(rtn8, teacher, shipped("int8-weight-only", settings))
    rows = [fp32, student, g8, g8_24, sp24, g4, rtn8, ours]
    for r in rows:
        if not r.error:
            r.size = harness.guard(r, "save", lambda r=r: harness.saved_size(r.model))
            r.lm = r.model
    eval_ids = resolve_eval_data(teacher, max_tokens=settings.eval_tokens).token_ids
    harness.perplexity_rows(rows, eval_ids)
    for r in rows:
        r.quality, r.lm, r.model = r.ppl, None, None
    return rows, {"eval_tokens": int(eval_ids.numel())}


# ---------------------------------------------------------------------------------------
# Pareto, tables, targets
# ---------------------------------------------------------------------------------------


SIZES: dict[str, Callable[[Row], int | None]] = {"ONNX": lambda r: r.onnx_size, "slimkit.save": lambda r: r.size}


def pareto(rows: list[Row], size_of: Callable[[Row], int | None], higher_is_better: bool) -> dict[int, list[Row]]:
    """For each measured row (by id), the rows that dominate it: no larger, no worse, better in one of the two."""
    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    measured = [r for r in rows if size_of(r) is not None and r.quality is not None]
    return {id(r): [o for o in measured if o is not r and size_of(o) <= size_of(r) and not better(r.quality, o.quality)
                    and (size_of(o) < size_of(r) or better(o.quality, r.quality))] for r in measured}


def fill_pareto(rows: list[Row], sizes: list[str], higher_is_better: bool) -> dict[str, dict[int, list[Row]]]:
    """Every row's Pareto cell for each size measure in ``sizes`` (one text when they agree); returns the dominators."""
    fronts = {name: pareto(rows, SIZES[name], higher_is_better) for name in sizes}

    def text(over: list[Row] | None) -> str:
        return "" if over is None else "on the front" if not over else "dominated by " + "; ".join(o.label for o in over)

    for r in rows:
        cells = {name: text(front.get(id(r))) for name, front in fronts.items()}
        r.pareto = (next(iter(cells.values())) if len(set(cells.values())) == 1 else
                    " / ".join(f"{name} size: {cell}" for name, cell in cells.items()))
    return fronts


def c2_line(name: str, rows: list[Row], fronts: dict[str, dict[int, list[Row]]], what: str,
            fmt: Callable[[Row], str]) -> str:
    """C2 for one preset: on the front of every size measure against the fp32 and single-technique rows, or why not."""
    ours = next(r for r in rows if r.family == "preset")
    if ours.error or ours.quality is None:
        return f"- C2 {name}: the preset row did not run ({ours.error})."
    parts, met = [], True
    for size_name, front in fronts.items():
        size_of = SIZES[size_name]
        over = [r for r in front.get(id(ours), []) if r.family in ("fp32", "single")]
        where = f"{fmt(ours)} at {_mb(size_of(ours))} ({size_name})"
        if not over:
            smaller = [r for r in rows if r is not ours and r.family in ("fp32", "single") and r.quality is not None
                       and size_of(r) is not None and size_of(r) < size_of(ours)]
            parts.append(f"on the front of ({size_name} size, {what}): {where}; " + (
                "no fp32 or single-technique row is smaller" if not smaller else
                "the smaller rows are all worse: " + ", ".join(f"{r.label} {fmt(r)} at {_mb(size_of(r))}"
                                                               for r in smaller)))
        else:
            met = False
            parts.append(f"dominated on ({size_name} size, {what}): {where}, by " + "; ".join(
                f"{r.label} ({fmt(r)} at {_mb(size_of(r))}): {r.why}" for r in over))
    return f"- C2 {name}: {'met' if met else 'MISSED'} — {PRESETS[name]} is " + "; it is ".join(parts) + "."


def _mb(n: int | None) -> str:
    """Bytes as MB (or kB below 1 MB)."""
    return "" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _paragraphs(text: str) -> list[str]:
    """Docstring paragraphs as markdown: wrapped lines joined, "- " items kept one per line."""
    out = []
    for part in text.split("\n\n"):
        items: list[str] = []
        for line in part.strip().splitlines():
            line = line.strip()
            if line.startswith("- ") or not items:
                items.append(line)
            else:
                items[-1] += " " + line
        out.append("\n".join(items) + "\n")
    return out


def onnx_table(rows: list[Row], quality: str, fmt: Callable[[Row], str]) -> harness.Table:
    fp32 = rows[0]
    t = harness.Table(["variant", "ONNX size", "× fp32", "slimkit.save size", quality, "ORT ms (median)", "× ORT fp32",
                       "compress s", "Pareto (size, quality)", "notes"], align="lrrrrrrrll")
    for r in rows:
        if r.error:
            t.add(r.label, "", "", "", r.error, "", "", "", "", "")
            continue
        lat = r.latency.median_ms if r.latency else None
        ref = fp32.latency.median_ms if fp32.latency else None
        t.add(r.label, _mb(r.onnx_size), f"{r.onnx_size / fp32.onnx_size:.3f}×" if r.onnx_size and fp32.onnx_size else "",
              _mb(r.size), fmt(r), f"{lat:.2f}" if lat else "", f"{lat / ref:.3f}×" if lat and ref else "",
              f"{r.seconds:.1f}" if r.seconds else "", r.pareto, "; ".join(r.notes)[:300])
    return t


def coder_table(rows: list[Row]) -> harness.Table:
    fp32 = rows[0]
    t = harness.Table(["variant", "slimkit.save size", "× fp32", "eval perplexity", "Δ vs fp32", "compress s",
                       "Pareto (size, perplexity)", "notes"], align="lrrrrrll")
    for r in rows:
        if r.error:
            t.add(r.label, "", "", r.error, "", "", "", "")
            continue
        t.add(r.label, _mb(r.size), f"{r.size / fp32.size:.3f}×" if r.size and fp32.size else "",
              f"{r.ppl:.3f}" if r.ppl is not None else "",
              f"{100 * (r.ppl / fp32.ppl - 1):+.1f}%" if r.ppl and fp32.ppl and r is not fp32 else "",
              f"{r.seconds:.1f}" if r.seconds else "", r.pareto, "; ".join(r.notes)[:300])
    return t


def c3_line(rows: list[Row]) -> str:
    ours, fp32 = next(r for r in rows if r.family == "preset"), rows[0]
    if ours.error or ours.latency is None or fp32.latency is None or ours.quality is None:
        return f"- C3: the preset or fp32 row did not run ({ours.error or fp32.error})."
    ratio = ours.latency.median_ms / fp32.latency.median_ms
    ok = ratio <= C3_LATENCY and ours.quality >= C3_COSINE
    parts = [(f"latency {ratio:.3f}× ORT fp32 ({ours.latency.median_ms:.1f} vs {fp32.latency.median_ms:.1f} ms; "
              f"target ≤ {C3_LATENCY}×: {'met' if ratio <= C3_LATENCY else 'MISSED'})"),
             (f"mean cosine {ours.quality:.4f} (min {ours.min_cosine:.4f}; target ≥ {C3_COSINE}: "
              f"{'met' if ours.quality >= C3_COSINE else 'MISSED'})")]
    return f"- C3 MiniLM {PRESETS['minilm']}: {'met' if ok else 'MISSED'} — " + ", ".join(parts) + "."


def _cos(r: Row) -> str:
    return "" if r.quality is None else f"cos {r.quality:.4f} (min {r.min_cosine:.3f})"


def _acc(r: Row) -> str:
    return "" if r.quality is None else f"{100 * r.quality:.2f}%"


def _ppl(r: Row) -> str:
    return "" if r.quality is None else f"ppl {r.quality:.2f}"


def render(results: dict[str, tuple[list[Row], dict[str, Any]]], env: dict[str, Any], seconds: float,
           settings: Settings) -> tuple[str, str]:
    from slimkit.core.machine import cpu_isa

    isa = cpu_isa()
    out, text, lines = [], [], []
    if "minilm" in results:
        rows, info = results["minilm"]
        t = onnx_table(rows, "mean cosine to fp32 (min)", lambda r: "" if r.quality is None else
                       f"{r.quality:.4f} ({r.min_cosine:.3f})")
        load = info.get("other_load")
        out += [f"**MiniLM** (`{PRESETS['minilm']}`): {info['n_eval']} eval-split sentences padded to "
                f"{info['shape'][1]} tokens; ORT latency on one {info['shape'][0]} × {info['shape'][1]} batch, "
                f"{THREADS} intra-op threads, {isa}" + (f"; other processes took {load:.0%} of the CPU while timing."
                                                        if load is not None else "."), "", t.to_markdown(), ""]
        text.append(t.to_text())
        lines += [c3_line(rows), c2_line("minilm", rows, info["fronts"], "mean cosine", _cos)]
    if "digits" in results:
        rows, info = results["digits"]
        t = onnx_table(rows, "accuracy (ORT)", lambda r: "" if r.quality is None else f"{100 * r.quality:.2f}%")
        load = info.get("other_load")
        out += [f"**digits-cnn** (`{PRESETS['digits']}`): accuracy of the ONNX Runtime model on the {info['n_test']} "
                f"test images (one image = {100 / info['n_test']:.2f} pt); ORT latency on one batch of {info['batch']}, "
                f"{THREADS} intra-op threads, {isa}" + (f"; other processes took {load:.0%} of the CPU while timing."
                                                        if load is not None else "."), "", t.to_markdown(), ""]
        text.append(t.to_text())
        lines.append(c2_line("digits", rows, info["fronts"], "accuracy", _acc))
    if "coder" in results:
        rows, info = results["coder"]
        t = coder_table(rows)
        out += [(f"**stdlib-coder** (`{PRESETS['coder']}`): perplexity on the first {info['eval_tokens']:,} tokens "
                 "of the stdlib eval split (context 256, stride 128); not timed."), "", t.to_markdown(), ""]
        text.append(t.to_text())
        lines.append(c2_line("coder", rows, info["fronts"], "perplexity", _ppl))
    doc = __doc__.split("\n\n")
    markdown = "\n".join([
        "## C2/C3 — combination presets beside each technique alone (issue 20)",
        "",
        f"The whole run took {seconds:.0f} s" + (" (--quick: distillation cut to "
                                                  f"{settings.distill_steps} steps; not a result)" if settings.quick else "")
        + ". " + harness.environment_line(env),
        "",
        *_paragraphs("\n\n".join(doc[2:])),
        *out,
        *lines,
    ])
    return markdown, "\n\n".join(text)


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_presets", summary,
                                  quick="smoke test: 4 distillation steps, few texts, tokens and runs; never written")
    parser.add_argument("--parts", type=harness.parts_type(PARTS), default=PARTS,
                        help=f"comma-separated subset of {', '.join(PARTS)} (default all; a subset is never written)")
    args = parser.parse_args(argv)
    harness.set_threads(THREADS)
    torch.manual_seed(0)
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()
    results: dict[str, tuple[list[Row], dict[str, Any]]] = {}
    builders = {"minilm": minilm_rows, "digits": digits_rows, "coder": coder_rows}
    with tempfile.TemporaryDirectory(prefix="slimkit-presets-") as tmp:
        for part in args.parts:
            print(f"{part}:", flush=True)
            t = time.perf_counter()
            results[part] = builders[part](settings, Path(tmp))
            print(f"  {part} took {time.perf_counter() - t:.0f} s", flush=True)
    for part, (rows, info) in results.items():
        info["fronts"] = fill_pareto(rows, ["slimkit.save"] if part == "coder" else ["ONNX", "slimkit.save"],
                                     higher_is_better=part != "coder")
    markdown, text = render(results, env, time.perf_counter() - start, settings)
    print(text)
    print()
    print(markdown)
    own_failures = [f"{r.label}: {r.error}" for rows, _ in results.values() for r in rows if r.error]
    if tuple(args.parts) != PARTS and not (args.quick or args.no_write):
        print("(not written: --parts ran a subset)")
        return 1 if own_failures else 0
    return harness.publish(args, SECTION, markdown, own_failures)


if __name__ == "__main__":
    sys.exit(main())
