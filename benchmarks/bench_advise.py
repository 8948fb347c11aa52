"""A3 — ``slimkit advise`` on this machine: is its top recommendation the measured best of its own candidates?

    python -m benchmarks.bench_advise            # full run, writes the A3 section of BENCHMARKS.md
    python -m benchmarks.bench_advise --quick    # smoke test: fewer timed runs; never written
    python -m benchmarks.bench_advise --no-write # full run, printed only

For each model, ``slimkit.auto.advise.advise(model, "latency")`` runs as ``slimkit advise MODEL``
does (facts, fp32 baselines, one-layer kernel probes, the decision tree, the ranking). Then every
candidate it lists is built for real and timed where it runs:

- for a latency target advise lists "no compression" too (fp32 in torch, and exported to ONNX
  Runtime): a compression must be expected ≥ 5% faster to rank above it;
- the candidate's steps are applied to a copy of the model; a ``Distill`` recovery step is
  skipped (training changes no shape, so it changes no latency; the quality of those
  candidates is not what A3 asks);
- stdlib-coder (it generates): decode ms per token with a KV cache (``measure_generation``:
  128 new tokens after a 64-token prompt of the calibration split, median of 3), each candidate measured in
  turn for 5 rounds (order reversed every other round), the median of the rounds' medians;
- MiniLM (batch 32 × 128): torch candidates as ``model_latency`` calls, ONNX Runtime candidates
  exported with slimkit's exporter and run in an ORT session; all rows interleaved
  (``harness.timed_interleaved``), median of the pooled runs.

A3: advise's top recommendation has the lowest measured time of its candidate list. The
table also shows each expected time beside the measured one (how well the one-layer probes
predict the whole model). Only this machine's ISA can be run here; the faked-ISA test
(tests/auto/test_advise.py) covers the tree's other branches.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness

SECTION = "a3-advise"
THREADS = 2
MODELS = ("stdlib-coder", "minilm")
NEW_TOKENS = 128  # per decode measurement: a tiny model decodes in ~7 ms per token, so fewer tokens are mostly noise


@dataclass
class Row:
    """One candidate of one model: advise's expectation and the measured time."""

    label: str
    runtime: str
    rank: int
    expected_ms: float | None
    excluded: str | None
    error: str | None = None
    measured_ms: float | None = None
    spread: float | None = None  # (max − min) / median of the per-round medians: the run-to-run noise
    family: str = "slimkit"


def _built(model: torch.nn.Module, steps: tuple, calib: Any) -> torch.nn.Module:
    from slimkit.distillation.distill import Distill
    from slimkit.recipe.steps import apply_step

    work = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steps:
            if not isinstance(step, Distill):
                apply_step(work, step, data=calib)
    return work.eval()


def _decode_rows(model, advice, calib, rounds: int) -> list[Row]:
    from slimkit.evaluation.generation import measure_generation
    from slimkit.tasks import task_of

    task = task_of(model)
    data = task.eval_data(model, max_tokens=4096, split="calibration")
    prompt = task.generation_prompt(model, data, 64)
    rows, built = [], {}
    for i, c in enumerate(advice.candidates, 1):
        row = Row(c.name, c.runtime, i, c.expected_ms, c.excluded)
        rows.append(row)
        print(f"  build {c.name}", flush=True)
        m = harness.guard(row, "build", lambda c=c: _built(model, c.steps, calib))
        if m is not None:
            built[c.name] = m
    samples: dict[str, list[float]] = {k: [] for k in built}
    for r in range(rounds):
        for name in built if r % 2 == 0 else reversed(list(built)):
            row = next(x for x in rows if x.label == name)
            stats = harness.guard(row, "decode", lambda name=name: measure_generation(built[name], prompt,
                                                                                      new_tokens=NEW_TOKENS, runs=3))
            if stats is not None:
                samples[name].append(1e3 / stats.decode_tokens_per_s)
    for row in rows:
        if samples.get(row.label):
            row.measured_ms = statistics.median(samples[row.label])
            row.spread = _spread(samples[row.label])
    return rows


def _spread(values: list[float]) -> float | None:
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else None


def _batch_rows(model, advice, calib, settings: dict[str, int]) -> list[Row]:
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session, run_onnx
    from slimkit.tasks import task_of

    task = task_of(model)
    data = task.eval_data(model, split="calibration")
    inputs, batch, seq = task.latency_inputs(model, data)
    rows: list[Row] = []
    fns: dict[str, Any] = {}

    def torch_fn(m):
        def run():
            with torch.no_grad():
                m(**inputs)
        return run

    tmp = Path(tempfile.mkdtemp(prefix="slimkit-a3-"))

    def ort_fn(m, name):
        file = tmp / f"{len(fns)}" / "model.onnx"
        file.parent.mkdir()
        export_onnx(copy.deepcopy(m), file)
        session = ort_session(file, threads=THREADS)
        return lambda: run_onnx(session, inputs)

    for i, c in enumerate(advice.candidates, 1):
        row = Row(c.name, c.runtime, i, c.expected_ms, c.excluded)
        rows.append(row)
        print(f"  build {c.name}", flush=True)
        m = harness.guard(row, "build", lambda c=c: _built(model, c.steps, calib))
        if m is None:
            continue
        fn = harness.guard(row, "export", lambda m=m, c=c: torch_fn(m) if c.runtime == "torch" else ort_fn(m, c.name))
        if fn is not None:
            fns[c.name] = fn
    timing = harness.timed_interleaved(fns, warmup=settings["warmup"], runs=settings["runs"],
                                       rounds=settings["rounds"], batch_size=batch, seq_len=seq)
    for row in rows:
        if row.label in timing.stats:
            row.measured_ms = timing.stats[row.label].median_ms
            row.spread = _spread(timing.round_medians[row.label])
    return rows


def run_model(name: str, quick: bool) -> tuple[Any, list[Row], float]:
    """advise on ``name``, then every candidate built and timed; returns (advice, rows, seconds of advise)."""
    import slimkit as sk
    from slimkit.auto.advise import advise
    from slimkit.tasks import task_of

    model = sk.load(name).eval()
    t = time.perf_counter()
    advice = advise(model, "latency", model_name=name, progress=lambda text: print(f"  advise: {text}", flush=True))
    seconds = time.perf_counter() - t
    print(advice.to_markdown(), flush=True)
    calib = task_of(model).calibration(model)
    if advice.model.generates:
        rows = _decode_rows(model, advice, calib, rounds=1 if quick else 5)
    else:
        settings = {"warmup": 1, "runs": 4, "rounds": 2} if quick else {"warmup": 2, "runs": 12, "rounds": 4}
        rows = _batch_rows(model, advice, calib, settings)
    return advice, rows, seconds


def verdict(advice: Any, rows: list[Row]) -> tuple[bool | None, str]:
    """A3 for one model: whether advise's recommendation is the fastest measured candidate, and the sentence."""
    ranked = [r for r in rows if r.rank > 0 and r.excluded is None and r.measured_ms is not None]
    if advice.best is None or not ranked:
        return None, "no candidate could be both recommended and measured"
    fastest = min(ranked, key=lambda r: r.measured_ms)
    top = next((r for r in ranked if r.label == advice.best.name), None)
    if top is None:
        return False, f"the recommendation {advice.best.name} could not be measured"
    ok = top is fastest
    text = (f"recommended {top.label} ({top.measured_ms:.3f} ms measured); the fastest measured is {fastest.label} "
            f"({fastest.measured_ms:.3f} ms)")
    if not ok:
        noise = max(x for x in (top.spread, fastest.spread, 0.0) if x is not None)
        text += (f": {top.measured_ms / fastest.measured_ms - 1:.1%} slower (the two rows' rounds spread up to "
                 f"{noise:.1%})")
    return ok, text


def render(results: dict[str, tuple[Any, list[Row], float]], env: dict[str, Any], seconds: float) -> str:
    """The A3 section: per model, the tree's answers, the table of expected vs measured, the verdict."""
    out = ["## A3 — `slimkit advise`: is its top recommendation the measured best of its candidates?", "",
           f"The whole run took {seconds:.0f} s. {harness.environment_line(env)}", "",
           *(x for i in (2, 3, 4) for x in (" ".join(__doc__.split("\n\n")[i].split()), ""))]
    summary = []
    for name, (advice, rows, adv_s) in results.items():
        out += [(f"**{name}** (advise took {adv_s:.0f} s; times in {advice.unit}; probes at {advice.probes[0].rows} "
                f"row(s) per Linear)"), ""]
        out += [f"- {q} {a}" for q, a in advice.tree] + [""]
        t = harness.Table(["advise rank", "candidate", "runtime", "expected ms", "measured ms", "round spread",
                           "measured / expected", "measured rank", "note"], align="rllrrrrrl")
        measured = sorted((r for r in rows if r.rank > 0 and r.measured_ms is not None), key=lambda r: r.measured_ms)
        for r in rows:
            ratio = (f"{r.measured_ms / r.expected_ms:.2f}" if r.measured_ms is not None and r.expected_ms else None)
            mrank = next((i for i, x in enumerate(measured, 1) if x is r), None)
            note = r.error or (f"not recommended: {r.excluded}" if r.excluded else "")
            t.add(r.rank, r.label, r.runtime, None if r.expected_ms is None else f"{r.expected_ms:.2f}",
                  None if r.measured_ms is None else f"{r.measured_ms:.2f}",
                  None if r.spread is None else f"{r.spread:.1%}", ratio, mrank, note)
        out += [t.to_markdown(), ""]
        ok, text = verdict(advice, rows)
        summary.append(f"- A3 {name} ({advice.machine.isa}): {'met' if ok else 'MISSED' if ok is False else 'n/a'} — "
                       f"{text}.")
    out += summary
    out.append("- A3 on an AVX-512 VNNI machine: not run (no such machine here); the tree's VNNI branch and the "
               "int8 settings that follow the ISA are checked with a faked ISA in tests/auto/test_advise.py.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_advise", summary, quick="smoke test: fewer timed runs; never written")
    parser.add_argument("--models", type=harness.parts_type(MODELS), default=MODELS,
                        help=f"comma-separated subset of {', '.join(MODELS)} (a subset is never written)")
    args = parser.parse_args(argv)
    harness.set_threads(THREADS)
    env = harness.environment()
    start = time.perf_counter()
    results = {}
    for name in args.models:
        print(f"{name}:", flush=True)
        results[name] = run_model(name, args.quick)
    markdown = render(results, env, time.perf_counter() - start)
    print(markdown)
    failures = [f"{name}: {r.label}: {r.error}" for name, (_, rows, _) in results.items() for r in rows
                if r.error and r.label.startswith("no compression")]
    if tuple(args.models) != MODELS and not (args.quick or args.no_write):
        print("(not written: --models ran a subset)")
        return 1 if failures else 0
    return harness.publish(args, SECTION, markdown, failures)


if __name__ == "__main__":
    sys.exit(main())
