"""digits-cnn at 8, 4, 2 and 1 bit: slimkit PTQ and QAT beside fp32 and torch.ao / ONNX Runtime peers, one run.

    python -m benchmarks.bench_quant_digits            # full run (3 QAT seeds), writes BENCHMARKS.md
    python -m benchmarks.bench_quant_digits --quick    # smoke test: 1 seed, 30 steps, never written
    python -m benchmarks.bench_quant_digits --no-write # full run, printed only

Model: the zoo's digits-cnn (``slimkit.zoo.digits.load_pretrained``: three conv3x3-BN-ReLU
blocks, 94k parameters). Data: scikit-learn's 8x8 digits split by ``load_digits_split``
into train (1077), calibration (180) and test (540) images, disjoint. Quality: top-1
accuracy on the 540 test images (one image = 0.185 points); nothing is tuned on them.
Calibration (every PTQ row, and the input ranges QAT starts from): the calibration split,
3 batches of 60. QAT fine-tuning: the train split only, with labels.

Rows (all measured in this run):
- fp32; slimkit ``StaticQuant()`` (int8 weights per output channel, uint8 inputs per
  tensor, BatchNorm folded) with the minmax and the mse input observer;
- 4 bit: PTQ with ``RTN(bits=4)`` on every conv and the classifier (weights only) and with
  ``StaticQuant(bits=4)`` (int8 inputs); QAT with the ``StaticQuant(bits=4)`` base,
  learned (LSQ) and min/max weight scales;
- 2 bit: PTQ RTN and QAT with the ``RTN(bits=2)`` base (weights only);
- 1 bit (sign × per-channel scale): the first conv and the classifier kept at 8 bits
  (``bits={"features.0": 8, "classifier": 8, "default": 1}``, as binary nets usually do);
  PTQ and QAT with that RTN base; also PTQ with every layer at 1 bit, for scale.
- peers: torch.ao FX graph-mode static PTQ (``get_default_qconfig_mapping("x86")``,
  same calibration batches), torch.ao ``quantize_dynamic`` (covers nn.Linear only: here the
  classifier), ONNX Runtime ``quantize_static`` (QDQ, MinMax; per_channel False = its
  default, and True) on the same fp32 export, fed the same calibration batches.

``RTN`` on its own (``quantize_(model, RTN(...))``) quantizes nn.Linear layers only, so the
"RTN" PTQ rows are built as ``examples/qat_digits.py`` builds them: ``QAT(base=RTN(...))``
prepare then convert with no training step between (BatchNorm folded, every conv and the
classifier round-to-nearest on a per-channel min/max grid).

QAT loop (the same for every QAT row): ``QAT(step="prepare")`` with calibration data,
then Adam (lr 3e-4, cosine decay to 0) over ``model.parameters()`` for 300 steps of 64
random train images (each batch shifted by up to one pixel, the augmentation digits-cnn was
trained with), cross-entropy on the labels, then ``QAT(step="convert")``. Seeds 0, 1, 2
(``torch.manual_seed`` and the batch generator); accuracy as mean ± sample std over seeds.

Size: bytes on disk of ``slimkit.save`` (all files) vs the fp32 model saved the same way;
peers in their own format (``torch.save`` of the state dict; the ONNX file) vs fp32 in that
format. Latency: one batch of 256 test images; ONNX Runtime with 2 intra-op threads
(``ort_session``) for the fp32 and int8 StaticQuant exports (and the ORT peers), PyTorch
eager with 1 thread (this run's torch thread count) for fp32, slimkit int8 and the torch.ao
FX model; warm-up 3, median of 20 calls interleaved in 4 rounds over all of them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
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
import torch.nn.functional as F
from torch import nn

from benchmarks import harness

SECTION = "quant-digits"
TORCH_THREADS = 1
ORT_THREADS = 2
BATCH = 256
CALIB_BATCH = 60
LR = 3e-4
TRAIN_BATCH = 64
BINARY_BITS = {"features.0": 8, "classifier": 8, "default": 1}
INT8_TARGET_PT = 0.3
QAT4_TARGET_PT = 1.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    seeds: tuple[int, ...]
    steps: int
    warmup: int
    runs: int
    rounds: int


FULL = Settings(False, (0, 1, 2), 300, 3, 20, 4)
QUICK = Settings(True, (0,), 30, 1, 4, 2)


@dataclass
class Row:
    label: str
    bits: str
    training: str
    accs: list[float] = field(default_factory=list)
    size: int | None = None
    size_ref: int | None = None
    size_format: str = "slimkit.save"
    target: str = "—"
    verdict: str = "—"
    latency: str = ""
    error: str | None = None
    model: Any = None  # the (first seed's) model, kept for latency rows






def _mean(accs: list[float]) -> float:
    return sum(accs) / len(accs)


def _acc_text(accs: list[float]) -> str:
    if len(accs) == 1:
        return f"{100 * accs[0]:.2f}%"
    each = ", ".join(f"{100 * a:.2f}" for a in accs)
    return f"{100 * _mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}% ({each})"


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch moved by up to one pixel on each axis (zero fill), as examples/qat_digits.py does."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def _ort_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from slimkit.export.onnx import ort_session

    session = ort_session(path, threads=ORT_THREADS)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _ort_accuracy(run: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(x), BATCH):
        logits = run(x[i:i + BATCH].numpy())
        correct += int((torch.from_numpy(np.asarray(logits)).argmax(-1) == y[i:i + BATCH]).sum())
    return correct / len(x)


def _session_config(path: Path) -> dict[str, str]:
    """The ORT session options slimkit recorded in an exported file."""
    import json

    import onnx

    for prop in onnx.load(str(path), load_external_data=False).metadata_props:
        if prop.key == "slimkit.ort_session_config":
            return json.loads(prop.value)
    return {}


class _Reader:
    """ORT CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: list[np.ndarray], name: str):
        self.batches, self.name, self.i = batches, name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def _vs_fp32(drop: float) -> str:
    """A drop in points as words: "0.19 pt below fp32", "0.06 pt above fp32", "level with fp32"."""
    if abs(drop) < 1e-9:
        return "level with fp32"
    return f"{abs(drop):.2f} pt {'below' if drop > 0 else 'above'} fp32"


def build(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import slimkit as sk
    from slimkit.tasks.metrics import accuracy
    from slimkit.export.onnx import export_onnx
    from slimkit.quantization.modules import QuantConv2d, QuantLinear
    from slimkit.zoo.digits import load_digits_split, load_pretrained

    x_train, y_train = load_digits_split("train")
    x_cal, _ = load_digits_split("calibration")
    x_test, y_test = load_digits_split("test")
    fp32 = load_pretrained()
    calib = sk.CalibrationData.from_tensors(x_cal, batch_size=CALIB_BATCH)
    notes: list[str] = []
    info: dict[str, Any] = {"notes": notes, "data": (
        f"test: {len(x_test)} images; calibration: {len(x_cal)} images ({len(calib.batches)} batches of {CALIB_BATCH}); "
        f"QAT training: {len(x_train)} train images — three disjoint splits of `load_digits_split`")}

    fp32_size = harness.saved_size(fp32)
    fp32_row = Row("fp32 (zoo digits-cnn)", "32 / 32", "— (shipped weights)", [accuracy(fp32, x_test, y_test)],
                   fp32_size, fp32_size, model=fp32)
    rows = [fp32_row]
    fp32_acc = fp32_row.accs[0]

    def finish(row: Row, model: nn.Module) -> None:
        row.accs.append(accuracy(model, x_test, y_test))
        if row.size is None:
            row.size, row.size_ref = harness.saved_size(model), fp32_size
        if row.model is None:
            row.model = model

    def ptq_row(label: str, bits: str, make: Callable[[], nn.Module]) -> Row:
        row = Row(label, bits, f"none ({len(x_cal)} calibration images)" if "StaticQuant" in label else "none")
        harness.guard(row, "quantize", lambda: finish(row, make()))
        rows.append(row)
        return row

    def static(**kw: Any) -> nn.Module:
        m = copy.deepcopy(fp32)
        sk.quantize_(m, sk.StaticQuant(**kw), data=calib)
        return m

    def rtn_ptq(bits: int | dict) -> nn.Module:
        """RTN on every conv and the classifier: QAT prepare -> convert with no training in between."""
        m = copy.deepcopy(fp32)
        base = sk.RTN(bits=bits)
        sk.quantize_(m, sk.QAT(base=base, step="prepare"))
        sk.quantize_(m, sk.QAT(base=base, step="convert"))
        return m

    def qat(base: Any, lsq: bool, seed: int) -> nn.Module:
        m = copy.deepcopy(fp32)
        torch.manual_seed(seed)
        sk.quantize_(m, sk.QAT(base=base, step="prepare", learnable_scales=lsq), data=calib)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(m.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
        m.train()
        for step in range(settings.steps):
            idx = torch.randint(0, len(x_train), (TRAIN_BATCH,), generator=gen)
            loss = F.cross_entropy(m(_random_shift(x_train[idx], gen)), y_train[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        m.eval()
        sk.quantize_(m, sk.QAT(base=base, step="convert", learnable_scales=lsq), data=calib)
        return m

    training = (f"{settings.steps} steps × {TRAIN_BATCH} (Adam {LR:g}, cosine), "
                f"seeds {', '.join(map(str, settings.seeds))}")

    def qat_row(label: str, bits: str, base: Any, lsq: bool) -> Row:
        row = Row(label, bits, training)
        t = time.perf_counter()
        for seed in settings.seeds:
            harness.guard(row, f"QAT seed {seed}", lambda seed=seed: finish(row, qat(base, lsq, seed)))
        info.setdefault("qat_seconds", []).append((time.perf_counter() - t) / len(settings.seeds))
        print(f"  {label}: {_acc_text(row.accs) if row.accs else row.error}", file=sys.stderr)
        rows.append(row)
        return row

    # --- int8 -----------------------------------------------------------------------------
    int8 = ptq_row("slimkit StaticQuant() — minmax inputs", "8 / u8", lambda: static())
    int8_mse = ptq_row('slimkit StaticQuant(act_observer="mse")', "8 / u8", lambda: static(act_observer="mse"))
    for r in (int8, int8_mse):
        r.target = f"int8 PTQ within {INT8_TARGET_PT} pt of fp32"
    fx = Row("peer: torch.ao FX static PTQ (x86 qconfig)", "8 / u8", f"none ({len(x_cal)} calibration images)",
             size_format="torch.save")
    dyn = Row("peer: torch.ao quantize_dynamic (Linear only)", "8 (classifier only) / dyn u8", "none",
              size_format="torch.save")

    def torch_size(m: nn.Module) -> int:
        return harness.saved_size(lambda folder: torch.save(m.state_dict(), folder / "sd.pt"))

    fp32_torch = torch_size(fp32)

    def ao_fx() -> None:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(fp32).eval(), get_default_qconfig_mapping("x86"), (x_cal[:2],))
        with torch.no_grad():
            for b in calib.batches:
                prepared(b)
        m = convert_fx(prepared)
        fx.size, fx.size_ref = torch_size(m), fp32_torch
        fx.accs.append(accuracy(m, x_test, y_test))
        fx.model = m

    def ao_dyn() -> None:
        from torch.ao.quantization import quantize_dynamic

        m = quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
        dyn.size, dyn.size_ref = torch_size(m), fp32_torch
        dyn.accs.append(accuracy(m, x_test, y_test))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation warnings
        harness.guard(fx, "torch.ao FX", ao_fx)
        harness.guard(dyn, "torch.ao quantize_dynamic", ao_dyn)
    rows += [fx, dyn]

    # ONNX: fp32 and slimkit int8 exports, ORT's own static quantizer on the fp32 file.
    fp32_path, int8_path = work / "fp32.onnx", work / "int8.onnx"
    ort_runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    try:
        export_onnx(fp32, fp32_path)
        ort_runs["ORT fp32"] = _ort_runner(fp32_path)
        fp32_onnx = fp32_path.stat().st_size
        info["ort_fp32_acc"] = _ort_accuracy(ort_runs["ORT fp32"], x_test, y_test)
    except Exception as exc:
        notes.append(f"fp32 ONNX export/run: {harness.why('export', exc)}")
        fp32_onnx = None
    if int8.model is not None:
        try:
            export_onnx(int8.model, int8_path)
            ort_runs["ORT slimkit int8"] = _ort_runner(int8_path)
            info["ort_int8_acc"] = _ort_accuracy(ort_runs["ORT slimkit int8"], x_test, y_test)
            info["int8_session"] = _session_config(int8_path)
            info["int8_onnx"] = int8_path.stat().st_size
            from slimkit.export.onnx import ort_op_counts

            info["int8_ops"] = ort_op_counts(int8_path, threads=ORT_THREADS)
        except Exception as exc:
            notes.append(f"slimkit int8 ONNX export/run: {harness.why('export', exc)}")
    ort_peers: list[tuple[Row, str]] = []
    if fp32_onnx is not None:
        from onnxruntime.quantization import quantize_static

        cal_np = [b.numpy() for b in calib.batches]
        for per_channel in (False, True):
            row = Row(f"peer: ORT quantize_static QDQ MinMax, per_channel={per_channel}", "8 / s8",
                      f"none ({len(x_cal)} calibration images)", size_format="ONNX")
            path = work / f"ort-static-{per_channel}.onnx"

            def ort_static(row=row, path=path, per_channel=per_channel) -> None:
                quantize_static(str(fp32_path), str(path), _Reader(cal_np, "input"), per_channel=per_channel)
                run = _ort_runner(path)
                row.accs.append(_ort_accuracy(run, x_test, y_test))
                row.size, row.size_ref = path.stat().st_size, fp32_onnx
                ort_runs[row.label] = run

            harness.guard(row, "quantize_static", ort_static)
            rows.append(row)
            ort_peers.append((row, row.label))

    # --- 4 bit ----------------------------------------------------------------------------
    rtn4 = ptq_row("slimkit RTN(bits=4), PTQ (convs + classifier)", "4 / 32", lambda: rtn_ptq(4))
    st4 = ptq_row("slimkit StaticQuant(bits=4), PTQ", "4 / u8", lambda: static(bits=4))
    qat4 = [qat_row(f"slimkit QAT, StaticQuant(bits=4) base, {'LSQ scales' if lsq else 'min/max scales'}",
                    "4 / u8", sk.StaticQuant(bits=4), lsq) for lsq in (True, False)]
    # --- 2 bit ----------------------------------------------------------------------------
    ptq_row("slimkit RTN(bits=2), PTQ (convs + classifier)", "2 / 32", lambda: rtn_ptq(2))
    for lsq in (True, False):
        qat_row(f"slimkit QAT, RTN(bits=2) base, {'LSQ scales' if lsq else 'min/max scales'}", "2 / 32",
                sk.RTN(bits=2), lsq)
    # --- 1 bit ----------------------------------------------------------------------------
    ptq_row("slimkit RTN(bits=1), PTQ, every layer binary", "1 / 32", lambda: rtn_ptq(1))
    ptq_row("slimkit RTN(bits=1 map), PTQ", "1 (first conv, classifier 8) / 32", lambda: rtn_ptq(BINARY_BITS))
    bin_rows = [qat_row(f"slimkit QAT, RTN(bits=1 map) base, {'LSQ scales' if lsq else 'min/max scales'}",
                        "1 (first conv, classifier 8) / 32", sk.RTN(bits=BINARY_BITS), lsq) for lsq in (True, False)]

    # --- verdicts -------------------------------------------------------------------------
    for r in (int8, int8_mse):
        if r.accs:
            drop = round(100 * (fp32_acc - _mean(r.accs)), 6) + 0.0
            r.verdict = f"{'met' if drop <= INT8_TARGET_PT + 1e-9 else 'missed'} ({_vs_fp32(drop)})"
    ptq4 = [r for r in (rtn4, st4) if r.accs]
    best_ptq4 = max(_mean(r.accs) for r in ptq4) if ptq4 else None
    for r in qat4:
        r.target = f"within {QAT4_TARGET_PT} pt of fp32 and above the best 4-bit PTQ"
        if r.accs and best_ptq4 is not None:
            drop = round(100 * (fp32_acc - _mean(r.accs)), 6) + 0.0
            gain = round(100 * (_mean(r.accs) - best_ptq4), 6) + 0.0
            ok = drop <= QAT4_TARGET_PT + 1e-9 and gain > 1e-9
            images = gain / 100 * len(x_test)
            r.verdict = (f"{'met' if ok else 'missed'} ({_vs_fp32(drop)}; {gain:+.2f} pt = {images:+.2g} test "
                         f"image(s) vs best 4-bit PTQ, "
                         f"{sum(a > best_ptq4 for a in r.accs)}/{len(r.accs)} seeds above it)")
    for r in bin_rows:
        r.target = "binary-weight QAT reported"
        r.verdict = "reported" if r.accs else "missed (did not run)"

    # What plain quantize_(RTN) covers on this model (the reason the RTN rows go through QAT).
    m = copy.deepcopy(fp32)
    sk.quantize_(m, sk.RTN(bits=4))
    n_q = sum(isinstance(x, (QuantLinear, QuantConv2d)) for x in m.modules())
    n_all = sum(isinstance(x, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)) for x in m.modules())
    notes.append(f"`quantize_(model, RTN(bits=4))` alone quantizes {n_q} of {n_all} weight layers here (nn.Linear "
                 f"only: the classifier; test accuracy {100 * accuracy(m, x_test, y_test):.2f}%), so the RTN rows are "
                 "built with QAT(base=RTN) prepare → convert and no training step, which covers the convs too.")

    # --- latency --------------------------------------------------------------------------
    xb = x_test[:BATCH].contiguous()
    xb_np = xb.numpy()

    def eager(model: nn.Module) -> Callable[[], Any]:
        @torch.inference_mode()
        def run() -> Any:
            return model(xb)

        return run

    fns: dict[str, Callable[[], Any]] = {name: (lambda run=run: run(xb_np)) for name, run in ort_runs.items()}
    fns["eager fp32"] = eager(fp32)
    if int8.model is not None:
        fns["eager slimkit int8"] = eager(int8.model)
    if fx.model is not None:
        fns["eager torch.ao FX int8"] = eager(fx.model)
    result = harness.timed_interleaved(fns, warmup=settings.warmup, runs=settings.runs, rounds=settings.rounds,
                                       batch_size=BATCH)
    ms = {name: s.median_ms for name, s in result.stats.items()}
    info["other_load"] = result.other_load
    info["latency"] = ms

    def cell(name: str, ref: str, what: str) -> str:
        if name not in ms:
            return ""
        ratio = "" if name == ref or ref not in ms else f" = {ms[name] / ms[ref]:.2f}× fp32"
        return f"{what} {ms[name]:.2f} ms{ratio}"

    ort_what, eager_what = f"ORT {ORT_THREADS} thr", f"eager {TORCH_THREADS} thr"
    fp32_row.latency = "; ".join(c for c in (cell("ORT fp32", "ORT fp32", ort_what),
                                             cell("eager fp32", "eager fp32", eager_what)) if c)
    int8.latency = "; ".join(c for c in (cell("ORT slimkit int8", "ORT fp32", ort_what),
                                         cell("eager slimkit int8", "eager fp32", eager_what)) if c)
    fx.latency = cell("eager torch.ao FX int8", "eager fp32", eager_what)
    for row, name in ort_peers:
        row.latency = cell(name, "ORT fp32", ort_what)
    for r in rows:
        r.model = None
    return rows, info


def render(rows: list[Row], info: dict[str, Any], settings: Settings) -> str:
    from slimkit.export.onnx import cpu_saturates_u8s8

    fp32 = rows[0].accs[0]
    table = harness.Table(["method", "bits (weights / inputs)", "training", "test accuracy", "Δ vs fp32 (pt)",
                           "size on disk", "× fp32", "latency, batch 256 (median)", "target", "met / missed"],
                          align="lllrrrrlll")
    for r in rows:
        if r.error and not r.accs:
            table.add(r.label, r.bits, r.training, r.error, "", "", "", "", r.target, "missed" if r.target != "—" else "—")
            continue
        acc = _acc_text(r.accs) + (f" [{r.error}]" if r.error else "")
        delta = f"{100 * (_mean(r.accs) - fp32):+.2f}"
        size = f"{r.size / 1e3:.1f} kB ({r.size_format})" if r.size else ""
        ratio = f"{r.size / r.size_ref:.3f}×" if r.size and r.size_ref else ""
        table.add(r.label, r.bits, r.training, acc, delta, size, ratio, r.latency, r.target, r.verdict)

    load = info.get("other_load")
    notes = [
        f"- Data: {info['data']}. One test image = {100 / 540:.3f} pt. Δ is against fp32 in PyTorch. "
        "QAT rows: mean ± sample std over the seeds, each seed's accuracy in brackets; size of the first seed's model "
        "(the same for every seed).",
        "- Bits: `u8` = uint8 inputs with a zero point, per tensor, frozen from calibration (QAT: learned/tracked in "
        "training); `s8` = ORT's default int8 activations; `32` = float inputs (weight-only). Weights are per output "
        "channel everywhere. 1 bit = sign × per-channel scale; in the `1 map` rows `features.0` and `classifier` stay "
        "at 8 bits (`bits={\"features.0\": 8, \"classifier\": 8, \"default\": 1}`), the usual practice for binary nets.",
    ]
    if "ort_int8_acc" in info:
        sess = info.get("int8_session") or {}
        notes.append(
            f"- ONNX: the fp32 export scores {100 * info['ort_fp32_acc']:.2f}% and the slimkit int8 export "
            f"{100 * info['ort_int8_acc']:.2f}% under ORT; int8 file {info['int8_onnx'] / 1e3:.1f} kB. "
            + (f"slimkit recorded session options {sess} (int8 weight codes beyond ±63: exact, slower int8 kernel), "
               + ("applied on this CPU (its u8s8 kernel saturates)." if cpu_saturates_u8s8() else
                  "not applied on this CPU (VNNI/AMX: the fast kernel is exact).")
               if sess else "No extra session options recorded.")
            + (f" Ops ORT runs for it after graph optimization: {info['int8_ops']}." if info.get("int8_ops") else ""))
    notes.append(
        f"- Latency: one batch of {BATCH} test images; ORT at {ORT_THREADS} intra-op threads, PyTorch eager at "
        f"{TORCH_THREADS} thread (this run's torch setting, 1 thread because the machine was shared); "
        "ratios are within one runtime only. slimkit's int8 model in PyTorch dequantizes its codes to float on every "
        "call and fake-quantizes its inputs (BatchNorm folded away), so its eager time is not an int8-kernel time; "
        "torch.ao FX runs fbgemm int8 kernels. "
        f"Warm-up {settings.warmup}, median of {settings.runs} calls interleaved in {settings.rounds} rounds"
        + (f"; other processes took {load:.0%} of the CPU meanwhile." if load is not None else "."))
    notes.append(
        "- Peers: torch.ao eager-mode static PTQ needs QuantStub/DeQuantStub edits to the model, so FX graph mode "
        "(same backend and qconfig, no edits) stands in for it; torch.ao `quantize_dynamic` covers nn.Linear only "
        "(1.3k of 94k parameters here). torchao's pt2e static PTQ gives int8 speed only through torch.compile / "
        "Inductor, and torchao's QAT quantizers target Linear layers, so neither is run. No peer does 4/2/1-bit "
        "PTQ or QAT of Conv2d layers on CPU here.")
    if info.get("qat_seconds"):
        notes.append(f"- QAT wall time: {statistics.mean(info['qat_seconds']):.1f} s per seed on average "
                     f"(1 torch thread), prepare + {settings.steps} steps + convert.")
    notes += [f"- {n}" for n in info["notes"]]
    return "\n".join([
        f"Model: zoo digits-cnn (94k parameters). {info['data']}. Torch threads {TORCH_THREADS}; ORT intra-op "
        f"threads {ORT_THREADS}.",
        "",
        table.to_markdown(),
        "",
        "Notes:",
        *notes,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, few timing runs; never written")
    parser.add_argument("--no-write", action="store_true", help="full run, printed only")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    harness.set_threads(TORCH_THREADS)
    env = harness.environment()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        rows, info = build(settings, Path(tmp))
    text = render(rows, info, settings)
    text += f"\n- Whole run: {time.perf_counter() - start:.0f} s wall time.\n"
    print(text)
    if rows[0].error or not rows[0].accs:
        print("not writing: the fp32 row failed", file=sys.stderr)
        return 1
    if not (args.quick or args.no_write):
        harness.write_section(harness.BENCHMARKS_FILE, SECTION,
                              f"## digits-cnn: int8 PTQ, 4/2/1-bit PTQ and QAT\n\n{harness.environment_line(env)}\n\n"
                              f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
