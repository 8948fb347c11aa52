"""A2 — ``slimkit auto`` on MiniLM at a latency budget of 0.5× ONNX Runtime fp32, beside every shipped recipe.

    python -m benchmarks.bench_auto_latency            # full run, writes the A2 section of BENCHMARKS.md
    python -m benchmarks.bench_auto_latency --quick    # smoke test: short trainings, few sentences; never written
    python -m benchmarks.bench_auto_latency --no-write # full run, printed only

``slimkit.auto.plan.auto(model, "latency=0.5", recover_steps=300)`` runs as ``slimkit auto minilm
--budget latency=0.5 --recover 300`` does: structural sensitivity of every head and neuron group
on the calibration split, per-shape probes of ORT fp32 / dynamic int8 / static int8, one
allocated plan per kernel path beside the uniform ones, each built and timed against fp32 in
ONNX Runtime, the winner then trained for 300 distillation steps (the shipped preset's
recovery length). Its winning recipe is re-run from its YAML text on a fresh copy of the model
(as ``slimkit compress --recipe recipe.yaml`` would), and that model is what is measured here.

Every shipped recipe whose model is MiniLM runs in the same process on its own copy, with its
own settings and full training. Every row is exported with slimkit's ONNX exporter and run in
ONNX Runtime (2 intra-op threads): latency on one 32 × 128 batch, all rows interleaved (warm-up
3, 20 calls in 4 rounds, median); quality as the mean (and min) cosine of the mean-pooled
sentence embeddings to the fp32 model's, on 256 eval-split sentences padded to 128 tokens
(bench_int8_minilm's measure; auto reads only the calibration and train splits). A2: auto's
plan has a higher mean cosine than every shipped recipe within 0.5× the fp32 latency.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness

SECTION = "a2-auto-latency"
THREADS = 2
MODEL = "minilm"
BUDGET_FRACTION = 0.5
BUDGET = f"latency={BUDGET_FRACTION}"
RECOVER = 300


@dataclass
class Row:
    label: str
    family: str  # "fp32" | "slimkit" (auto) | "shipped"
    model: Any = None
    run: Any = None
    onnx_size: int | None = None
    cosine: float | None = None
    min_cosine: float | None = None
    latency: Any = None
    ratio: float | None = None
    seconds: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_auto_latency", summary, quick="smoke test: short trainings; never written")
    args = parser.parse_args(argv)
    harness.set_threads(THREADS)
    torch.manual_seed(0)
    env = harness.environment()
    start = time.perf_counter()
    import tempfile

    import slimkit as sk
    from benchmarks.bench_auto import _recipe, _run_recipe, _shipped_for, run_auto
    from benchmarks.bench_int8_minilm import (
        SHAPE,
        _embed,
        _file_size,
        _ort_runner,
        _tokenize,
    )
    from slimkit.export.onnx import export_onnx
    from slimkit.recipe.schema import Recipe
    from slimkit.tasks.metrics import embedding_fidelity
    from slimkit.zoo import minilm

    base = sk.load(MODEL).eval()
    fp32 = Row("fp32", "fp32", model=base)
    print("auto:", flush=True)
    result, auto_seconds = run_auto(base, BUDGET, MODEL, recover_steps=8 if args.quick else RECOVER)
    print(result.to_markdown(), flush=True)
    ours = Row(f"auto {BUDGET}: {result.winner.name if result.winner else 'no plan fitted'}", "slimkit")
    if result.winner is None:
        ours.error = "no plan fitted the budget"
    else:
        _run_recipe(ours, base, Recipe.from_yaml_text(result.winner.recipe(MODEL).to_yaml()))
    rows = [fp32, ours]
    for name in _shipped_for(MODEL):
        row = Row(f"shipped {name}", "shipped")
        _run_recipe(row, base, _recipe(name, args.quick))
        rows.append(row)
    n_eval = 64 if args.quick else 256
    batches = _tokenize(sk.tokenizer_of(base), minilm.sample_texts("eval", n=n_eval))
    with tempfile.TemporaryDirectory(prefix="bench-a2-") as tmp:
        for i, r in enumerate(rows):
            if r.error:
                continue

            def export(r=r, i=i) -> None:
                path = Path(tmp) / f"row{i}.onnx"
                export_onnx(r.model, path)
                r.onnx_size, r.run = _file_size(path), _ort_runner(path)

            print(f"  export: {r.label}", flush=True)
            harness.guard(r, "export", export)
        reference = _embed(fp32.run, batches)
        for r in rows:
            if r.run is not None:
                fid = harness.guard(r, "embed", lambda r=r: embedding_fidelity(_embed(r.run, batches), reference))
                if fid is not None:
                    r.cosine, r.min_cosine = fid.mean_cosine, fid.min_cosine
        live = [r for r in rows if r.run is not None and not r.error]
        print("  latency (interleaved)", flush=True)
        feeds = batches[0]
        runs, rounds = (4, 2) if args.quick else (20, 4)
        timing = harness.timed_interleaved({r.label: (lambda r=r: r.run(feeds)) for r in live}, warmup=3, runs=runs,
                                           rounds=rounds, batch_size=SHAPE[0], seq_len=SHAPE[1])
        for r in live:
            r.latency = timing.stats[r.label]
            r.ratio = r.latency.median_ms / timing.stats["fp32"].median_ms
    markdown = render(rows, result, auto_seconds, env, time.perf_counter() - start, timing.other_load)
    print(markdown)
    failures = [f"{r.label}: {r.error}" for r in rows if r.error and r.family != "shipped"]
    return harness.publish(args, SECTION, markdown, failures)


def render(rows: list[Row], result: Any, auto_seconds: float, env: dict[str, Any], seconds: float,
           other_load: float) -> str:
    t = harness.Table(["recipe", "ONNX size", "ORT ms (median)", "× ORT fp32", "mean cosine (min)", "compress s",
                       "notes"], align="lrrrrrl")
    for r in rows:
        t.add(r.label, None if r.onnx_size is None else f"{r.onnx_size / 1e6:.2f} MB",
              None if r.latency is None else f"{r.latency.median_ms:.1f}",
              None if r.ratio is None else f"{r.ratio:.3f}×",
              None if r.cosine is None else f"{r.cosine:.4f} ({r.min_cosine:.3f})",
              None if r.seconds is None else f"{r.seconds:.0f}", r.error or "; ".join(r.notes))
    ours = rows[1]
    rivals = [r for r in rows if r.family == "shipped" and r.ratio is not None and r.ratio <= BUDGET_FRACTION]
    lines = []
    if ours.cosine is None or ours.ratio is None:
        lines.append(f"- A2: MISSED — auto's plan could not be measured ({ours.error}).")
    else:
        within = ours.ratio <= BUDGET_FRACTION
        beaten = [r for r in rivals if r.cosine is not None and r.cosine >= ours.cosine]
        ok = within and not beaten
        lines.append(f"- A2: {'met' if ok else 'MISSED'} — auto's plan runs at {ours.ratio:.3f}× ORT fp32 "
                     f"({'within' if within else 'over'} the {BUDGET_FRACTION}× budget) with mean cosine "
                     f"{ours.cosine:.4f}; "
                     + ("shipped recipes within the budget: " + ", ".join(
                         f"{r.label} {r.cosine:.4f} at {r.ratio:.3f}×" for r in rivals if r.cosine is not None)
                        if rivals else "no shipped recipe runs within the budget")
                     + ("" if not beaten else "; as good or better: " + ", ".join(r.label for r in beaten)) + ".")
        near = [r for r in rows if r.family == "shipped" and r.ratio is not None and r not in rivals
                and r.ratio <= BUDGET_FRACTION * 1.1 and r.cosine is not None]
        if near:
            lines.append("- Just over the budget (within 10%): " + ", ".join(
                f"{r.label} {r.cosine:.4f} at {r.ratio:.3f}×" for r in near) + ".")
    lines.append(f"- auto took {auto_seconds:.0f} s on {THREADS} threads, the {RECOVER}-step recovery included.")
    from benchmarks.bench_auto import plans_markdown

    plans = plans_markdown(result)
    return "\n".join([
        "## A2 — `slimkit auto` on MiniLM at latency ≤ 0.5× ONNX Runtime fp32, beside every shipped recipe", "",
        (f"The whole run took {seconds:.0f} s. {harness.environment_line(env)}; other processes took "
        f"{other_load:.0%} of the CPU while timing."), "",
        *(x for i in (2, 3) for x in (" ".join(__doc__.split("\n\n")[i].split()), "")),
        ("**The plans auto measured** (calibration split; times in ONNX Runtime against fp32 timed beside each; the "
        "winner first):"), "", plans, "",
        "**Eval split, ONNX Runtime** (the winner's recipe re-run from its YAML; every shipped MiniLM recipe):", "",
        t.to_markdown(), "", *lines])


if __name__ == "__main__":
    sys.exit(main())
