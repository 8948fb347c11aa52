"""int8 PTQ with activations on stdlib-coder (causal LM): slimkit DynamicQuant / StaticQuant through
ONNX Runtime beside ORT's and torch.ao's quantizers, measured in one run.

    python -m benchmarks.bench_int8_coder            # full run, writes BENCHMARKS.md
    python -m benchmarks.bench_int8_coder --quick    # smoke test: few tokens and runs, never written
    python -m benchmarks.bench_int8_coder --no-write # full run, printed only

Model: the zoo causal LM ``stdlib-coder`` (Llama architecture, ~6.2M parameters).
Quality: sliding-window perplexity (context 256, stride 128) on the first 65,536 tokens of
the stdlib eval split (``--quick``: 4,096). Calibration: 64 windows of 256 tokens from the
disjoint calibration split (``CalibrationData.from_texts``, seed 0; ``--quick``: 16), the
same windows for every tool that calibrates.

Rows, ONNX Runtime (every file from the same fp32 export, ``slimkit.export.onnx.export_onnx``):
- ORT fp32;
- slimkit ``DynamicQuant(embeddings=True)``; ``StaticQuant`` with the minmax and mse
  activation observers; ``StaticQuant(smooth_alpha=0.5, reduce_range=True, embeddings=True)``;
  ``StaticQuant(act_observer="mse", embeddings=True, attention=True)`` (the attention
  matmuls' operands quantized too) — each exported by ``export_onnx`` with slimkit's own codes and scales (QDQ int8);
- ORT ``quantize_dynamic`` (QInt8 weights, per_channel False = default, and True) and
  ``quantize_static`` (QDQ, MinMax, per_channel True) on the fp32 file.
Rows, PyTorch (eager): fp32; the slimkit StaticQuant minmax model itself (fake-quant, whose
perplexity should match its ORT row); torch.ao ``quantize_dynamic({nn.Linear}, qint8)``.

ORT rows are scored by running their session (the runtime that is timed), not PyTorch.
Latency: one prefill forward of 8 × 256 eval tokens, no KV cache (``use_cache=False``,
full sequence), 2 threads (torch and ORT intra-op), warm-up 3 and the median of 20 timed
calls interleaved in 4 rounds over all rows of the same runtime (``--quick``: 1, 4, 2).
Size: bytes on disk of each artifact vs the fp32 artifact of the same format. Every ratio
compares rows of one runtime. A peer that fails is a row with its reason; a failure of an
fp32 or slimkit row stops the run from writing BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks import harness

SECTION = "int8-ptq-coder"
THREADS = 2
MODEL = "stdlib-coder"
SHAPE = (8, 256)  # (batch, seq) of one timed prefill; also the calibration window length
NOTE_KEYS = ("fallback", "tolerance", "skipped", "kept ", "session option")  # ctx/export notes worth a line
STATIC_LABEL = "slimkit StaticQuant minmax"
FAKE_LABEL = f"{STATIC_LABEL} in PyTorch (fake-quant, eager)"


@dataclass(frozen=True)
class Settings:
    eval_tokens: int
    n_calib: int
    warmup: int
    runs: int
    rounds: int


FULL = Settings(eval_tokens=65536, n_calib=64, warmup=3, runs=20, rounds=4)
QUICK = Settings(eval_tokens=4096, n_calib=16, warmup=1, runs=4, rounds=2)


@dataclass
class Row:
    """One variant: what perplexity runs (a torch model or an ORT session wrapper) and what was measured."""

    label: str
    runtime: str  # "pytorch" or "onnxruntime"
    family: str  # "fp32", "slimkit" or "peer"
    lm: nn.Module | None = None
    size: int | None = None
    size_ref: int | None = None
    build: str | None = None
    ppl: float | None = None
    latency: Any = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    quantized: nn.Module | None = None  # slimkit rows: the PyTorch model quantize_ returned


class _OrtLM(nn.Module):
    """An ONNX Runtime session as a causal LM: ``forward(input_ids)`` returns the logits tensor."""

    def __init__(self, path: Path):
        super().__init__()
        from slimkit.export.onnx import ort_session

        self.session = ort_session(path, threads=THREADS)

    @staticmethod
    def feeds(input_ids: torch.Tensor) -> dict[str, np.ndarray]:
        """The session's inputs for ``input_ids``: int64 ids and an all-ones attention mask."""
        ids = input_ids.numpy().astype(np.int64, copy=False)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], self.feeds(input_ids))[0])


class _Reader:
    """ORT CalibrationDataReader over slimkit's calibration windows (ids + all-ones mask, int64)."""

    def __init__(self, calib: Any):
        self.batches = [_OrtLM.feeds(b["input_ids"]) for b in calib]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _timed_call(lm: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    """One full-sequence forward of ``ids`` (no KV cache) in ``lm``'s runtime."""
    if isinstance(lm, _OrtLM):
        feeds = lm.feeds(ids)
        return lambda: lm.session.run(["logits"], feeds)
    mask = torch.ones_like(ids)

    def call() -> Any:
        with torch.inference_mode():
            return lm(input_ids=ids, attention_mask=mask, use_cache=False)

    return call


def build_rows(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    """Load stdlib-coder, build every variant (failures recorded in their rows), return rows and run facts."""
    import slimkit as sk
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_dynamic, quantize_static

    from slimkit.core.registry import Context
    from slimkit.core.measure import size_on_disk
    from slimkit.evaluation.suite import resolve_eval_data
    from slimkit.export.onnx import export_onnx
    from slimkit.zoo.corpus import load_split

    model = sk.load(MODEL).eval()
    calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model), seq_len=SHAPE[1],
                                          n=settings.n_calib)
    data = resolve_eval_data(model, max_tokens=settings.eval_tokens)
    info = {"data": data, "calib": f"stdlib calibration split, {calib.description}",
            "params": sum(p.numel() for p in model.parameters())}

    fp32_dir = Path(tempfile.mkdtemp(dir=work))
    t = time.perf_counter()
    fp32_path = export_onnx(model, fp32_dir / "model.onnx", past=False).path
    fp32_export_s, fp32_size = time.perf_counter() - t, size_on_disk(fp32_dir)

    def torch_size(m: nn.Module) -> int:
        return harness.saved_size(lambda folder: torch.save(m.state_dict(), folder / "state_dict.pt"))

    fp32_torch_size = torch_size(model)
    rows = [Row("PyTorch fp32 (eager)", "pytorch", "fp32", model, fp32_torch_size, fp32_torch_size),
            Row("ORT fp32", "onnxruntime", "fp32", _OrtLM(fp32_path), fp32_size, fp32_size,
                f"(export {fp32_export_s:.1f})")]

    def slimkit_row(label: str, cfg: Any) -> Row:
        row = Row(label, "onnxruntime", "slimkit")
        ctx = Context()
        t = time.perf_counter()
        q = row.quantized = harness.guard(row, "quantize_",
                                          lambda: sk.quantize_(copy.deepcopy(model), cfg, data=calib, ctx=ctx))
        quant_s, t = time.perf_counter() - t, time.perf_counter()
        folder = Path(tempfile.mkdtemp(dir=work))
        export = harness.guard(row, "export_onnx", lambda: export_onnx(q, folder / "model.onnx", past=False))
        export_s = time.perf_counter() - t
        lm = harness.guard(row, "ort_session", lambda: _OrtLM(export.path))
        if lm is not None:
            row.build = f"{quant_s:.1f} (+{export_s:.1f} export)"
            row.lm, row.size, row.size_ref = lm, size_on_disk(folder), fp32_size
            row.notes += [n for n in (*ctx.notes, *export.notes) if any(k in n for k in NOTE_KEYS)]
        return row

    rows += [
        slimkit_row("slimkit DynamicQuant (+ embeddings)", sk.DynamicQuant(embeddings=True)),
        slimkit_row(STATIC_LABEL, sk.StaticQuant(act_observer="minmax")),
        slimkit_row("slimkit StaticQuant mse", sk.StaticQuant(act_observer="mse")),
        slimkit_row("slimkit StaticQuant minmax, smooth_alpha 0.5, reduce_range, + embeddings",
                    sk.StaticQuant(smooth_alpha=0.5, reduce_range=True, embeddings=True)),
        slimkit_row("slimkit StaticQuant mse, + embeddings, + attention matmuls (Q·Kᵀ, P·V int8)",
                    sk.StaticQuant(act_observer="mse", embeddings=True, attention=True)),
    ]

    def ort_row(label: str, stage: str, quantize: Callable[[str, str], None]) -> Row:
        row = Row(label, "onnxruntime", "peer")
        folder = Path(tempfile.mkdtemp(dir=work))

        def build() -> None:
            t = time.perf_counter()
            quantize(str(fp32_path), str(folder / "model.onnx"))
            row.build = f"{time.perf_counter() - t:.1f}"
            row.lm, row.size, row.size_ref = _OrtLM(folder / "model.onnx"), size_on_disk(folder), fp32_size

        harness.guard(row, stage, build)
        return row

    for per_channel in (False, True):
        rows.append(ort_row(f"ORT quantize_dynamic QInt8, per_channel={per_channel}", "quantize_dynamic",
                            lambda src, dst, pc=per_channel: quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                                                                              per_channel=pc)))
    rows.append(ort_row("ORT quantize_static QDQ MinMax, per_channel=True", "quantize_static",
                        lambda src, dst: quantize_static(src, dst, _Reader(calib), per_channel=True,
                                                         calibrate_method=CalibrationMethod.MinMax)))

    static = next(r for r in rows if r.label == STATIC_LABEL)
    fake = Row(FAKE_LABEL, "pytorch", "slimkit")
    if static.quantized is None:
        fake.error = f"not built: {static.error}"
    else:
        fake.lm, fake.size = static.quantized, harness.saved_size(static.quantized)
        fake.size_ref = harness.saved_size(model)
    rows.append(fake)

    ao = Row("torch.ao quantize_dynamic qint8 (nn.Linear, per-tensor default)", "pytorch", "peer")

    def ao_build() -> None:
        from torch.ao.quantization import quantize_dynamic as ao_dynamic

        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = ao_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        ao.build = f"{time.perf_counter() - t:.1f}"
        # first line only, without torch's "(Triggered internally at <build path>)" aside
        ao.notes += sorted({str(w.message).strip().splitlines()[0].split(" (Triggered internally")[0].strip()
                            for w in caught if "deprecat" in str(w.message)})
        ao.lm, ao.size, ao.size_ref = m, torch_size(m), fp32_torch_size

    harness.guard(ao, "quantize_dynamic", ao_build)
    rows.append(ao)
    return rows, info


def measure(rows: list[Row], info: dict[str, Any], settings: Settings) -> None:
    """Perplexity of every row that was built, then latency interleaved over the rows of each runtime."""
    from slimkit.tasks.metrics import perplexity
    from slimkit.evaluation.suite import PPL_CONTEXT, PPL_STRIDE

    ids = info["data"].token_ids
    for row in rows:
        print(f"  perplexity: {row.label}", flush=True)
        result = harness.guard(row, "perplexity",
                               lambda row=row: perplexity(row.lm, ids, context=PPL_CONTEXT, stride=PPL_STRIDE))
        row.ppl = None if result is None else result.perplexity
    batch = ids[: SHAPE[0] * SHAPE[1]].reshape(SHAPE).contiguous()
    info["other_load"] = {}
    for runtime in ("pytorch", "onnxruntime"):
        live = [r for r in rows if r.runtime == runtime and not r.error]
        print(f"  latency: {len(live)} {runtime} rows", flush=True)
        result = harness.timed_interleaved({r.label: _timed_call(r.lm, batch) for r in live}, warmup=settings.warmup,
                                           runs=settings.runs, rounds=settings.rounds, batch_size=SHAPE[0],
                                           seq_len=SHAPE[1])
        for r in live:
            r.latency = result.stats[r.label]
        info["other_load"][runtime] = result.other_load


def _ref(rows: list[Row], runtime: str) -> Row:
    return next(r for r in rows if r.runtime == runtime and r.family == "fp32")


def table(rows: list[Row]) -> harness.Table:
    """The results: perplexity, size, latency and build time, each ratio against fp32 of the row's runtime."""
    b, s = SHAPE
    t = harness.Table(["variant", "runtime", "perplexity (Δ vs fp32)", "size on disk (B)", "× fp32 size",
                       f"latency b{b}×{s} (ms)", "× fp32 latency", "build s"], align="llrrrrrr")
    for r in rows:
        if r.error:
            t.add(r.label, r.runtime, f"**could not run** — {r.error}", None, None, None, None, None)
            continue
        ref = _ref(rows, r.runtime)
        ppl = None if r.ppl is None else f"{r.ppl:.3f}"
        if ppl and r is not ref and ref.ppl:
            ppl += f" ({100 * (r.ppl / ref.ppl - 1):+.2f}%)"
        lat = r.latency and r.latency.median_ms
        ref_lat = ref.latency and ref.latency.median_ms
        t.add(r.label, r.runtime, ppl, f"{r.size:,}", f"{r.size / r.size_ref:.3f}×",
              None if lat is None else f"{lat:.1f}", f"{lat / ref_lat:.2f}×" if lat and ref_lat else None, r.build)
    return t


def render(rows: list[Row], info: dict[str, Any], env: dict[str, Any], settings: Settings, seconds: float) -> str:
    """The BENCHMARKS.md section: environment, table, reading notes and the notes the run produced."""
    by_label = {r.label: r for r in rows}
    ort_static, fake = by_label[STATIC_LABEL], by_label[FAKE_LABEL]
    match = (f"{STATIC_LABEL} perplexity in PyTorch (fake-quant) {fake.ppl:.4f} vs its ONNX Runtime file "
             f"{ort_static.ppl:.4f} ({100 * (ort_static.ppl / fake.ppl - 1):+.3f}%)." if fake.ppl and ort_static.ppl
             else f"The PyTorch / ORT perplexity comparison of {STATIC_LABEL} is missing (a row failed).")
    load = ", ".join(f"{'unknown' if f is None else f'{100 * f:.0f}%'} ({rt})" for rt, f in info["other_load"].items())
    b, s = SHAPE
    by_note: dict[str, list[str]] = {}
    for r in rows:
        for n in r.notes:
            by_note.setdefault(n, []).append(r.label)
    notes = [f"- {'; '.join(labels)}: {n}" for n, labels in by_note.items()]
    works = [f"{r.label} {100 * (r.ppl / _ref(rows, r.runtime).ppl - 1):+.2f}%" for r in rows
             if r.family == "slimkit" and r.runtime == "onnxruntime" and r.ppl and _ref(rows, r.runtime).ppl]
    return "\n".join([
        f"## int8 PTQ on {MODEL}: slimkit DynamicQuant / StaticQuant through ONNX Runtime beside ORT and torch.ao",
        "",
        f"The whole run took {seconds:.0f} s. " + harness.environment_line(env),
        "",
        f"Model: {MODEL} ({info['params'] / 1e6:.2f}M parameters). Perplexity: {info['data'].description}. "
        f"Calibration: {info['calib']} (the corpus assigns each file to one split by its path: calibration and eval "
        f"are disjoint). Latency: one prefill forward at batch {b} × seq {s} (eval tokens), no KV cache "
        f"(full-sequence forward, `use_cache=False` in the export and in PyTorch), {THREADS} threads (torch; ORT "
        f"intra-op), warm-up {settings.warmup}, median of {settings.runs} timed calls in {settings.rounds} rounds "
        f"interleaved over all rows of the same runtime; other processes took {load} of the CPUs meanwhile.",
        "",
        table(rows).to_markdown(),
        "",
        f"Dynamic and static PTQ on {MODEL} (quantize_, export_onnx, run in ONNX Runtime): "
        + ("; ".join(works) if works else "no slimkit row ran") + " perplexity vs ORT fp32.",
        "",
        "**Reading the table.**",
        "",
        "- Every ratio compares a row with fp32 *of its own runtime* in this run: ORT rows with ORT fp32 (perplexity, "
        "latency, bytes of the ONNX file), PyTorch rows with eager PyTorch fp32 (bytes of `torch.save(state_dict)`; "
        "the fake-quant row: its `slimkit.save` folder vs fp32 saved alike).",
        "- ORT rows are scored by running their own session (`slimkit.export.onnx.ort_session`, with the session "
        "options the file records), so each perplexity is that of the runtime that is timed.",
        "- slimkit rows: `quantize_` on a copy of the fp32 model, then `export_onnx` (QDQ int8 from slimkit's own "
        "codes and scales); build s is quantize_ (+ export). StaticQuant minmax / mse keep the embedding table in "
        "float (default `embeddings=False`); the other slimkit rows store it as int8 rows.",
        "- ORT peers quantize the same fp32 ONNX file (its export time is on the ORT fp32 row) with their documented "
        "defaults apart from the per_channel named in the row; `quantize_static` is fed the same calibration "
        "windows (ids and an all-ones mask).",
        "- The fake-quant row is the StaticQuant minmax model itself in eager PyTorch, which simulates int8 in float "
        "(hence slower than fp32). " + match,
        "- torch.ao `quantize_dynamic` is PyTorch's dynamic int8 Linear (fbgemm), lm_head included.",
        "",
        *(["Notes from the run:", "", *notes, ""] if notes else []),
    ]).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser("bench_int8_coder", __doc__.split("\n")[0], quick="smoke test: fewer tokens, windows, runs; never written")
    args = parser.parse_args(argv)

    harness.set_threads(THREADS)
    torch.manual_seed(0)
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-coder-") as tmp:
        print(f"[{MODEL}] building variants", flush=True)
        rows, info = build_rows(settings, Path(tmp))
        measure(rows, info, settings)
    seconds = time.perf_counter() - start
    markdown = render(rows, info, env, settings, seconds)

    return harness.publish_rows(args, SECTION, rows, table(rows).to_text(), markdown)


if __name__ == "__main__":
    sys.exit(main())
