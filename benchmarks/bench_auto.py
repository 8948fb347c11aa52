"""A1/P8 — ``slimkit auto`` on stdlib-coder at a size budget of 0.20× fp32, beside every shipped recipe.

    python -m benchmarks.bench_auto            # full run, writes the A1 section of BENCHMARKS.md
    python -m benchmarks.bench_auto --quick    # smoke test: short distillation, few eval tokens; never written
    python -m benchmarks.bench_auto --no-write # full run, printed only

``slimkit.auto.plan.auto(model, "size=0.2")`` runs as ``slimkit auto stdlib-coder --budget size=0.2``
does (P8: its wall time on 2 cores, target ≤ 10 minutes). Its winning recipe is then re-run from
its YAML text on a fresh copy of the model (as ``slimkit compress --recipe recipe.yaml`` would) and
measured on the held-out eval split, which ``auto`` never reads.

Every shipped recipe whose model is stdlib-coder runs in the same process on its own copy; each
is measured by the bytes of its ``slimkit.save`` folder, and, when that is at most 0.20× the fp32
folder, by its eval perplexity too (a larger recipe is not a comparison A1 asks for; its size is
still listed). The two distillation recipes run their full training (their students' sizes do
not depend on it, but their quality does).

Quality: sliding-window perplexity (context 256, stride 128) on the first 65,536 tokens of the
stdlib eval split (``--quick``: 4,096). A1: auto's plan has lower eval perplexity than every
shipped recipe of its size or smaller.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness

SECTION = "a1-auto"
THREADS = 2
MODEL = "stdlib-coder"
BUDGET = "size=0.2"
MAX_SECONDS = 600  # P8


@dataclass
class Row:
    label: str
    family: str  # "fp32" | "slimkit" (auto) | "shipped"
    model: Any = None
    size: int | None = None
    ppl: float | None = None
    lm: Any = None
    seconds: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _recipe(name: str, quick: bool):
    import dataclasses

    from slimkit.distillation.distill import Distill
    from slimkit.recipe.schema import Stage, resolve_recipe

    r = resolve_recipe(name)
    if quick:
        short = {"steps": 2, "warmup_steps": 1, "eval_every": 0}
        r = dataclasses.replace(r, stages=tuple(
            Stage(st.name, tuple(dataclasses.replace(s, **short) if isinstance(s, Distill) else s for s in st.steps))
            for st in r.stages))
    return r


def _shipped_for(model: str) -> list[str]:
    from slimkit.recipe.schema import resolve_recipe

    folder = Path(__import__("slimkit").__file__).parent / "recipes"
    return sorted(p.stem for p in folder.glob("*.yaml") if resolve_recipe(p.stem).model == model)


def run_auto(base: torch.nn.Module, budget: str, model: str, **kw: Any) -> tuple[Any, float]:
    """``auto`` on a copy of ``base`` as the CLI runs it, its progress printed with seconds: (result, seconds)."""
    from slimkit.auto.plan import auto

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = auto(copy.deepcopy(base), budget, model_name=model,
                      progress=lambda text: print(f"  {time.perf_counter() - t:6.1f} s  {text}", flush=True), **kw)
    return result, time.perf_counter() - t


def plans_markdown(result: Any) -> str:
    """auto's own table without its title line: the blank lines around its tables kept (markdown needs them)."""
    return "\n".join(result.to_markdown().splitlines()[2:]).strip()


def _run_recipe(row: Row, base: torch.nn.Module, recipe: Any) -> None:
    from slimkit.recipe.runner import run_recipe

    def go() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx = run_recipe(copy.deepcopy(base), recipe)
        row.model = ctx.model.eval()

    print(f"  {row.label}", flush=True)
    harness.guard(row, "compress", lambda: harness.timed_row(row, go))


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_auto", summary, quick="smoke test: short distillation; never written")
    args = parser.parse_args(argv)
    harness.set_threads(THREADS)
    torch.manual_seed(0)
    env = harness.environment()
    start = time.perf_counter()
    import slimkit as sk
    from slimkit.evaluation.suite import resolve_eval_data
    from slimkit.recipe.schema import Recipe

    base = sk.load(MODEL).eval()
    fp32 = Row("fp32", "fp32", model=base)
    print("auto:", flush=True)
    result, auto_seconds = run_auto(base, BUDGET, MODEL)
    print(result.to_markdown(), flush=True)
    ours = Row(f"auto {BUDGET}: {result.winner.name if result.winner else 'no plan fitted'}", "slimkit")
    if result.winner is None:
        ours.error = "no plan fitted the budget"
    else:
        text = result.winner.recipe(MODEL).to_yaml()
        _run_recipe(ours, base, Recipe.from_yaml_text(text))
    rows = [fp32, ours]
    for name in _shipped_for(MODEL):
        row = Row(f"shipped {name}", "shipped")
        _run_recipe(row, base, _recipe(name, args.quick))
        rows.append(row)
    for r in rows:
        if not r.error:
            r.size = harness.guard(r, "save", lambda r=r: harness.saved_size(r.model))
    limit = BUDGET_FRACTION * fp32.size
    for r in rows:
        if r.size is not None and (r.size <= limit or r.family != "shipped"):
            r.lm = r.model
        elif r.size is not None:
            r.notes.append("larger than the budget: not evaluated")
    eval_ids = resolve_eval_data(base, max_tokens=4096 if args.quick else 65536).token_ids
    harness.perplexity_rows(rows, eval_ids)
    markdown = render(rows, result, auto_seconds, env, time.perf_counter() - start, limit)
    print(markdown)
    failures = [f"{r.label}: {r.error}" for r in rows if r.error and r.family != "shipped"]
    return harness.publish(args, SECTION, markdown, failures)


BUDGET_FRACTION = 0.2


def render(rows: list[Row], result: Any, auto_seconds: float, env: dict[str, Any], seconds: float,
           limit: float) -> str:
    fp32 = rows[0]
    t = harness.Table(["recipe", "size on disk", "× fp32", "eval perplexity", "Δ vs fp32", "compress s", "notes"],
                      align="lrrrrrl")
    for r in rows:
        t.add(r.label, None if r.size is None else f"{r.size / 1e6:.2f} MB",
              None if r.size is None else f"{r.size / fp32.size:.3f}×",
              None if r.ppl is None else f"{r.ppl:.3f}",
              None if r.ppl is None or r is fp32 else f"{100 * (r.ppl / fp32.ppl - 1):+.1f}%",
              None if r.seconds is None else f"{r.seconds:.0f}", r.error or "; ".join(r.notes))
    ours = rows[1]
    rivals = [r for r in rows if r.family == "shipped" and r.ppl is not None and ours.size is not None
              and r.size <= ours.size]
    lines = []
    if ours.ppl is None:
        lines.append(f"- A1: MISSED — auto's plan could not be measured ({ours.error}).")
    else:
        beaten = [r for r in rivals if r.ppl <= ours.ppl]
        within = ours.size <= limit
        ok = within and not beaten
        lines.append(f"- A1: {'met' if ok else 'MISSED'} — auto's plan: {ours.size / fp32.size:.3f}× fp32 on disk "
                     f"({'within' if within else 'over'} the {BUDGET_FRACTION}× budget), eval perplexity {ours.ppl:.3f}; "
                     + ("shipped recipes as small or smaller: " + ", ".join(f"{r.label} {r.ppl:.3f} at "
                                                                           f"{r.size / fp32.size:.3f}×" for r in rivals)
                        if rivals else "no shipped recipe is as small or smaller")
                     + ("" if not beaten else "; better or equal: " + ", ".join(r.label for r in beaten)) + ".")
    lines.append(f"- P8: auto took {auto_seconds:.0f} s on {THREADS} threads (target ≤ {MAX_SECONDS} s: "
                 f"{'met' if auto_seconds <= MAX_SECONDS else 'MISSED'}).")
    plans = plans_markdown(result)
    return "\n".join([
        "## A1/P8 — `slimkit auto` on stdlib-coder at size ≤ 0.20× fp32, beside every shipped recipe", "",
        f"The whole run took {seconds:.0f} s. {harness.environment_line(env)}", "",
        *(x for i in (2, 3, 4) for x in (" ".join(__doc__.split("\n\n")[i].split()), "")),
        "**The plans auto measured** (calibration split; the winner first):", "", plans, "",
        "**Eval split** (the winner's recipe re-run from its YAML; every shipped stdlib-coder recipe):", "",
        t.to_markdown(), "", *lines])


if __name__ == "__main__":
    sys.exit(main())
