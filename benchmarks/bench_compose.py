"""C1 — 50% sparse + int4 on stdlib-coder: SparseGPT then GPTQ keeping the zeros, beside each technique alone
at comparable size, measured in one run (bits on disk, sparsity after quantization, perplexity).

    python -m benchmarks.bench_compose            # full run, writes the C1 section of BENCHMARKS.md
    python -m benchmarks.bench_compose --quick    # smoke test: few tokens and windows; never written
    python -m benchmarks.bench_compose --no-write # full run, printed only

Model: the zoo causal LM ``stdlib-coder`` (6.23M parameters; 42 Linear layers in 6 decoder blocks,
an untied lm_head). Every compressed row changes those 42 layers only; lm_head and the embedding
stay fp32 in every row, as in bench_w4_coder and bench_sparse_coder.

Data: calibration = 64 windows of 256 tokens (seed 0) from the stdlib *calibration* split, the same
windows for every step; quality = sliding-window perplexity (context 256, stride 128) on the first
65,536 tokens of the disjoint *eval* split (``--quick``: 8 windows, 4,096 tokens).

Rows:
- fp32; GPTQ int4 g128 alone (symmetric, the w4-gptq recipe's settings); SparseGPT 50% alone and
  SparseGPT 2:4 alone (float weights, stored as bitmask + non-zeros);
- SparseGPT 50% → GPTQ int4 g128 with ``keep_zeros``, with fp16 scales (C1: ``fp16_scales`` rounds
  each scale to float16 as GPTQ chooses it, so the file stores them in 16 bits losslessly), and with
  ``keep_zeros=False`` (GPTQ as it was: its OBS updates fill the pruned positions back in);
  SparseGPT 50% → RTN int4 g128 (0 is always on RTN's grid: zeros stay, no error correction);
  GPTQ pruning 50% in the same pass (SparseGPT's joint mode, ``GPTQ(sparsity=0.5)``);
- the same at 2:4: SparseGPT 2:4 → GPTQ keep_zeros (fp32 and fp16 scales: C1 at 2:4, stored as a 3-bit
  pair index + 2 codes per 4 weights), and GPTQ pruning 2:4 in the same pass.

Columns: perplexity and its change vs fp32; the increase over fp32 as a multiple of SparseGPT-alone's
at the same pattern (C1: ≤ 1.2×); zeros of the 42 layers after the last step (exact zeros of each
layer's applied weight, min and max over the layers: C1 asks exactly 50%; a kept weight that rounds
to 0 adds a zero); bits per weight of those layers **on disk**: the bytes of every safetensors entry
belonging to them in the ``slimkit.save`` file (codes or bitmask + kept codes, scales) × 8 ÷ their
weights (C1: ≤ 3.0); the whole file's bytes; for fp32, dense GPTQ int4 and the two C1 rows, the
ONNX export (``export_decoder_onnx``: decoder with past, int4 layers as MatMulNBits at its default
accuracy level) in bytes and its ONNX Runtime decode speed (greedy, 128 new tokens after a 128-token
eval prompt, 2 threads, rows interleaved over 6 rounds, the first a warm-up, median of the rest, ± half the
range of the rest);
wall seconds of the compression steps.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import harness

SECTION = "c1-sparse-int4"
THREADS = 2
MODEL = "stdlib-coder"
SEQ_LEN = 256
MAX_RATIO = 1.2  # C1: perplexity increase ≤ 1.2× SparseGPT-alone's
MAX_BITS = 3.0  # C1: stored bits per weight


@dataclass(frozen=True)
class Settings:
    quick: bool
    eval_tokens: int
    n_calib: int
    ort_rounds: int


FULL = Settings(quick=False, eval_tokens=65536, n_calib=64, ort_rounds=6)
QUICK = Settings(quick=True, eval_tokens=4096, n_calib=8, ort_rounds=2)
PROMPT_TOKENS, NEW_TOKENS = 128, 128


@dataclass
class Row:
    """One variant: its steps, the model perplexity runs on, and what was measured."""

    label: str
    steps: tuple[Any, ...]
    pattern: str | None = None  # the sparsity pattern its ratio is taken against ("50%", "2:4")
    family: str = "slimkit"
    lm: nn.Module | None = None
    seconds: float | None = None
    ppl: float | None = None
    zeros: tuple[float, float] | None = None
    bits: float | None = None
    file_bytes: int | None = None
    onnx: bool = False  # also exported and decoded in ONNX Runtime
    ort_tps: float | None = None
    ort_spread: float | None = None  # (max − min) / median of the measured rounds
    onnx_bytes: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def build_rows() -> list[Row]:
    """The variants, each as the list of configs applied in order."""
    import slimkit as sk

    gptq = {"bits": 4, "group_size": 128, "symmetric": True}
    return [
        Row("fp32", (), family="fp32", onnx=True),
        Row("GPTQ int4 g128 alone", (sk.GPTQ(**gptq),), onnx=True),
        Row("SparseGPT 50% alone", (sk.SparseGPT(sparsity=0.5),), "50%"),
        Row("SparseGPT 50% → GPTQ int4 g128, keep_zeros", (sk.SparseGPT(sparsity=0.5), sk.GPTQ(**gptq)), "50%"),
        Row("SparseGPT 50% → GPTQ int4 g128, keep_zeros, fp16 scales (C1)",
            (sk.SparseGPT(sparsity=0.5), sk.GPTQ(**gptq, fp16_scales=True)), "50%", onnx=True),
        Row("GPTQ int4 g128 pruning 50% in the same pass (joint), fp16 scales",
            (sk.GPTQ(**gptq, sparsity=0.5, fp16_scales=True),), "50%"),
        Row("SparseGPT 50% → GPTQ int4 g128, keep_zeros=false", (sk.SparseGPT(sparsity=0.5),
                                                                  sk.GPTQ(**gptq, keep_zeros=False)), "50%"),
        Row("SparseGPT 50% → RTN int4 g128", (sk.SparseGPT(sparsity=0.5),
                                             sk.RTN(bits=4, group_size=128, include=[r"re:model\.layers\..*"])), "50%"),
        Row("SparseGPT 2:4 alone", (sk.SparseGPT(sparsity=0.5, pattern="2:4"),), "2:4"),
        Row("SparseGPT 2:4 → GPTQ int4 g128, keep_zeros", (sk.SparseGPT(sparsity=0.5, pattern="2:4"),
                                                          sk.GPTQ(**gptq)), "2:4"),
        Row("SparseGPT 2:4 → GPTQ int4 g128, keep_zeros, fp16 scales (C1, 2:4)",
            (sk.SparseGPT(sparsity=0.5, pattern="2:4"), sk.GPTQ(**gptq, fp16_scales=True)), "2:4", onnx=True),
        Row("GPTQ int4 g128 pruning 2:4 in the same pass (joint), fp16 scales",
            (sk.GPTQ(**gptq, pattern="2:4", fp16_scales=True),), "2:4"),
    ]


def block_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The 42 decoder-block layers every row changes (Linear or their quantized replacements)."""
    return {n: m for n, m in model.named_modules()
            if ".layers." in n and (isinstance(m, nn.Linear) or hasattr(m, "qweight"))}


def applied_weight(module: nn.Module) -> torch.Tensor:
    return module.dense_weight() if hasattr(module, "dense_weight") else module.weight.detach()


def zero_range(model: nn.Module) -> tuple[float, float]:
    """(min, max) share of exact zeros over the block layers' applied weights."""
    shares = [float((applied_weight(m) == 0).float().mean()) for m in block_layers(model).values()]
    return min(shares), max(shares)


def stored_bits(model: nn.Module, folder: Path) -> tuple[float, int]:
    """Bits per weight of the block layers in the saved file (every entry under their names), and the file's bytes."""
    from safetensors import safe_open

    from slimkit.core.sparse_storage import SAFETENSORS_DTYPES

    path = folder / "model.safetensors"
    layers = block_layers(model)
    weights = sum(applied_weight(m).numel() for m in layers.values())
    nbytes = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            owner = key.split(".__")[0].rsplit(".", 1)[0]
            if owner in layers:
                view = f.get_slice(key)
                count = 1
                for d in view.get_shape():
                    count *= d
                nbytes += count * SAFETENSORS_DTYPES[view.get_dtype()].itemsize
    return nbytes * 8 / weights, path.stat().st_size


def run_rows(rows: list[Row], settings: Settings) -> dict[str, Any]:
    import slimkit as sk
    from slimkit.core.calibration import CalibrationData
    from slimkit.core.registry import Context
    from slimkit.evaluation.suite import resolve_eval_data
    from slimkit.recipe.steps import apply_step
    from slimkit.zoo.corpus import load_split

    base = sk.load(MODEL).eval()
    calib = CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(base), seq_len=SEQ_LEN,
                                       n=settings.n_calib)
    eval_ids = resolve_eval_data(base, max_tokens=settings.eval_tokens).token_ids
    for row in rows:
        print(f"  {row.label}", flush=True)
        model = copy.deepcopy(base)

        def compress(model=model, row=row) -> None:
            ctx = Context()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for step in row.steps:
                    apply_step(model, step, calib, ctx)
            row.notes += [n for n in ctx.notes if "keep" in n or "zeros" in n]

        harness.guard(row, "compress", lambda: harness.timed_row(row, compress))
        if row.error:
            continue
        row.lm = model
        row.zeros = zero_range(model)
        with tempfile.TemporaryDirectory() as tmp:
            sk.save(model, Path(tmp) / "m")
            row.bits, row.file_bytes = stored_bits(model, Path(tmp) / "m")
    return {"eval_ids": eval_ids, "params": sum(p.numel() for p in base.parameters())}


def ort_decode(rows: list[Row], eval_ids: torch.Tensor, settings: Settings) -> None:
    """Export the ``onnx`` rows as decoder-with-past graphs and time ONNX Runtime decoding, rounds interleaved."""
    import statistics

    from slimkit.export.onnx_decoder import OrtDecoder, export_decoder_onnx
    from slimkit.tasks.generation import Sampling

    prompt = eval_ids[:PROMPT_TOKENS].reshape(1, -1)
    work = Path(tempfile.mkdtemp(prefix="slimkit-c1-onnx-"))
    decoders: dict[str, Any] = {}
    for row in (r for r in rows if r.onnx and not r.error and r.lm is not None):
        print(f"  onnx: {row.label}", flush=True)
        path = work / f"{len(decoders)}" / "model.onnx"
        path.parent.mkdir()

        def export(row=row, path=path) -> Any:
            export_decoder_onnx(row.lm, path)
            row.onnx_bytes = sum(f.stat().st_size for f in path.parent.iterdir())
            return OrtDecoder(path, threads=THREADS)

        dec = harness.guard(row, "onnx export", export)
        if dec is not None:
            decoders[row.label] = dec
    samples: dict[str, list[float]] = {k: [] for k in decoders}
    names = list(decoders)
    for r in range(settings.ort_rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out = decoders[name].generate(prompt, NEW_TOKENS, Sampling(stop_at_eos=False))
            if r:  # the first round warms up
                samples[name].append(out.new_tokens / out.decode_s)
    for row in rows:
        if samples.get(row.label):
            got = samples[row.label]
            row.ort_tps = statistics.median(got)
            row.ort_spread = (max(got) - min(got)) / row.ort_tps


def _increase_ratio(rows: list[Row], row: Row) -> float | None:
    fp32 = next((r for r in rows if r.family == "fp32"), None)
    alone = next((r for r in rows if r.pattern == row.pattern and len(r.steps) == 1 and r.pattern), None)
    if row.pattern is None or alone is None or row is alone or None in (fp32 and fp32.ppl, alone.ppl, row.ppl):
        return None
    return (row.ppl - fp32.ppl) / (alone.ppl - fp32.ppl)


def table(rows: list[Row]) -> harness.Table:
    fp32 = next(r for r in rows if r.family == "fp32")
    t = harness.Table(["variant", "perplexity (Δ vs fp32)", "× SparseGPT-alone's increase", "zeros after (min–max)",
                       "bits/weight on disk (block layers)", "file bytes", "ONNX bytes", "ORT decode tok/s",
                       "seconds", "notes"])
    for r in rows:
        if r.error:
            t.add(r.label, r.error, "", "", "", "", "", "", "", "")
            continue
        delta = "" if r.ppl is None or fp32.ppl is None or r is fp32 else f" ({100 * (r.ppl / fp32.ppl - 1):+.2f}%)"
        ratio = _increase_ratio(rows, r)
        t.add(r.label, f"{r.ppl:.3f}{delta}" if r.ppl is not None else "–",
               "" if ratio is None else f"{ratio:.2f}×",
               f"{100 * r.zeros[0]:.2f}–{100 * r.zeros[1]:.2f}%" if r.zeros else "",
               f"{r.bits:.3f}" if r.bits is not None else "", f"{r.file_bytes:,}" if r.file_bytes else "",
               f"{r.onnx_bytes:,}" if r.onnx_bytes else "",
               f"{r.ort_tps:.0f} (±{r.ort_spread / 2:.0%})" if r.ort_tps else "",
               f"{r.seconds:.1f}" if r.seconds else "", "; ".join(r.notes)[:160])
    return t


def target_lines(rows: list[Row]) -> list[str]:
    lines = []
    for c1 in (r for r in rows if "(C1" in r.label):
        lines.append(f"**{c1.label}**")
        lines.append("")
        lines += _c1_lines(rows, c1)
        lines.append("")
    dense4 = next((r for r in rows if r.label == "GPTQ int4 g128 alone"), None)
    fp32 = next((r for r in rows if r.family == "fp32"), None)
    for r in rows:
        if r.onnx and r.ort_tps and r is not dense4 and r is not fp32 and dense4 and dense4.ort_tps and fp32.ort_tps:
            noise = max(r.ort_spread or 0, dense4.ort_spread or 0)
            lines.append(f"- ONNX Runtime, {r.label}: {r.ort_tps:.0f} decode tok/s, {r.ort_tps / dense4.ort_tps:.2f}× "
                         f"dense GPTQ int4's {dense4.ort_tps:.0f} and {r.ort_tps / fp32.ort_tps:.2f}× fp32's "
                         f"{fp32.ort_tps:.0f}. The zeros are stored inside MatMulNBits' dense int4 blocks (the ONNX "
                         f"file is {r.onnx_bytes:,} bytes, dense int4's {dense4.onnx_bytes:,}) and computed like any "
                         "weight: no ONNX Runtime CPU kernel skips them, so the sparse graph does the same work as "
                         "dense int4 and a gap between the two is run-to-run noise (the rounds of these rows spread "
                         f"up to {noise:.0%}); the sparsity buys bytes on disk in slimkit's format, not speed.")
    lines.append("- Storage bound: an unstructured 50% mask carries 1 bit of information per weight (its entropy), "
                 "so 4-bit kept codes (2 bits per weight) plus any scales exceed 3.0 bits; the 2:4 pattern's "
                 "mask is log2(6)/4 = 0.65 bits per weight (stored as a 3-bit index per 4: 0.75).")
    return lines


def _c1_lines(rows: list[Row], c1: Row) -> list[str]:
    if c1.error or c1.ppl is None or c1.zeros is None or c1.bits is None:
        return [f"- C1: the row did not run ({c1.error})."]
    ratio = _increase_ratio(rows, c1)
    lo, hi = c1.zeros
    return [
        f"- C1 sparsity: {100 * lo:.2f}–{100 * hi:.2f}% zeros in the 42 layers after GPTQ (target: exactly 50%: "
        + ("met" if abs(lo - 0.5) < 1e-9 and abs(hi - 0.5) < 1e-9 else
           "every layer keeps SparseGPT's 50%; the excess is kept weights that GPTQ rounded to 0" if lo >= 0.5 else
           "MISSED") + ").",
        f"- C1 quality: perplexity increase {ratio:.2f}× SparseGPT-alone's (target ≤ {MAX_RATIO}×: "
        + ("met" if ratio is not None and ratio <= MAX_RATIO else "MISSED") + ").",
        f"- C1 storage: {c1.bits:.3f} bits per weight on disk (target ≤ {MAX_BITS}: "
        + ("met" if c1.bits <= MAX_BITS else "MISSED") + ").",
    ]


def render(rows: list[Row], env: dict[str, Any], seconds: float, settings: Settings) -> str:
    return "\n".join([
        "## C1 — 50% sparse + int4 on stdlib-coder (SparseGPT, then GPTQ keeping the zeros)",
        "",
        f"The whole run took {seconds:.0f} s. " + harness.environment_line(env),
        "",
        *[" ".join(part.split()) + "\n" for part in __doc__.split("\n\n")[2:]],
        table(rows).to_markdown(),
        "",
        *target_lines(rows),
    ])


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_compose", summary, quick="smoke test: fewer tokens and windows; never written")
    args = parser.parse_args(argv)
    harness.set_threads(THREADS)
    torch.manual_seed(0)
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()
    rows = build_rows()
    info = run_rows(rows, settings)
    harness.perplexity_rows(rows, info["eval_ids"])
    ort_decode(rows, info["eval_ids"], settings)
    markdown = render(rows, env, time.perf_counter() - start, settings)
    print(table(rows).to_text())
    print(markdown)
    own_failures = [f"{r.label}: {r.error}" for r in rows if r.error]
    return harness.publish(args, SECTION, markdown, own_failures)


if __name__ == "__main__":
    sys.exit(main())
