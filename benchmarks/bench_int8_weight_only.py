"""int8 weight-only quantization: slimkit RTN vs fp32, torchao and torch.ao, measured in one run.

    python -m benchmarks.bench_int8_weight_only            # full run, writes BENCHMARKS.md
    python -m benchmarks.bench_int8_weight_only --quick    # smoke test: few runs/tokens, never written
    python -m benchmarks.bench_int8_weight_only --no-write # full run, printed only
    (--no-compile skips the torch.compile latency rows)

Two models, each as fp32 and as every variant below, all measured in this process:

- stdlib-coder (zoo causal LM): perplexity on the stdlib eval split (first 65,536 tokens,
  context 256, stride 128); latency of one forward at batch 1 x seq 256 and batch 8 x seq 256.
- MiniLM (all-MiniLM-L6-v2): mean/min cosine and top-1 neighbour agreement of mean-pooled
  sentence embeddings vs fp32 on 256 eval-split docstring sentences; latency at batch 32 x
  seq 128 (padded to max_length 128).

Variants: slimkit ``RTN(bits=8)`` (per output channel, symmetric; every nn.Linear incl.
lm_head) and ``RTN(bits=8, embeddings=True)``; torchao ``quantize_(m, Int8WeightOnlyConfig())``
(its default: per-row int8 weights of every nn.Linear); torch.ao ``quantize_dynamic`` with
dtype qint8 (dynamic int8 activations too: a different technique), default per-tensor
qconfig and per-channel qconfig.

Sizes are bytes on disk of each tool's own saved artifact, compared with fp32 saved the
same way: slimkit rows the ``slimkit.save`` folder, torchao safetensors through its
``torchao.prototype.safetensors`` flattening, torch.ao ``torch.save(state_dict)``.
Timings run on 2 threads, warm-up 3, median of 20 timed calls (``--quick``: 1 and 4), on
the same inputs for all variants, interleaved in 4 rounds (``--quick``: 2) that alternate
over the variants so that a machine slowing down mid-run weighs on all of them alike. The
main tables are eager PyTorch; fp32, slimkit RTN and torchao are also timed under
``torch.compile`` (torchao's documented speed path) in a table of their own.

A peer that fails is reported in its row with the stage and the exception; a failure of
the fp32 or slimkit rows stops the run from writing BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
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

SECTION = "int8-weight-only"
THREADS = 2
LM_NAME, ENCODER_NAME = "stdlib-coder", "minilm"
LM_SHAPES = ((1, 256), (8, 256))  # (batch, seq) of one timed LM forward
ENCODER_SHAPE = (32, 128)


@dataclass(frozen=True)
class Settings:
    quick: bool
    warmup: int
    runs: int
    lm_tokens: int
    n_texts: int
    rounds: int  # timed calls are spread over this many interleaved rounds (runs % rounds == 0)


FULL = Settings(quick=False, warmup=3, runs=20, lm_tokens=65536, n_texts=256, rounds=4)
QUICK = Settings(quick=True, warmup=1, runs=4, lm_tokens=4096, n_texts=64, rounds=2)


@dataclass
class Variant:
    """One row: a model variant and everything measured on it."""

    label: str
    family: str  # "fp32", "slimkit", "torchao", "torch.ao"
    model: nn.Module | None = None
    error: str | None = None  # why it could not run (stage: exception)
    artifact: str = ""
    size: int | None = None
    size_ref: int | None = None  # fp32 saved in the same format
    bits: float | None = None
    quality: dict[str, float] = field(default_factory=dict)
    latency: dict[tuple[int, int], Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _load(name: str) -> nn.Module:
    """A fresh fp32 copy of zoo model ``name`` (eval mode); the only place models are loaded."""
    import slimkit

    model = slimkit.load(name)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"{name} loaded with parameter dtypes {dtypes}, expected float32 only")
    return model.eval()






# ---------------------------------------------------------------------------------------
# Building the variants
# ---------------------------------------------------------------------------------------


def _slimkit_rtn(name: str, embeddings: bool) -> Callable[[Variant], nn.Module]:
    def build(v: Variant) -> nn.Module:
        import slimkit
        from slimkit.core.registry import Context

        ctx = Context()
        model = slimkit.quantize_(_load(name), slimkit.RTN(bits=8, embeddings=embeddings), ctx=ctx)
        v.notes += ctx.notes
        return model

    return build


def _torchao_int8wo(name: str) -> Callable[[Variant], nn.Module]:
    def build(v: Variant) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = _load(name)
        quantize_(model, Int8WeightOnlyConfig())  # documented default: PerRow() granularity, nn.Linear only
        return model

    return build


def _torch_ao_dynamic(name: str, per_channel: bool) -> Callable[[Variant], nn.Module]:
    def build(v: Variant) -> nn.Module:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {nn.Linear: per_channel_dynamic_qconfig} if per_channel else {nn.Linear}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = quantize_dynamic(_load(name), spec, dtype=torch.qint8)
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, FutureWarning, UserWarning)) and "deprecated" in str(w.message):
                line = str(w.message).strip().splitlines()[0]
                if line not in v.notes:
                    v.notes.append(line)
        return model

    return build


def build_variants(name: str) -> list[tuple[Variant, Callable[[Variant], nn.Module]]]:
    return [
        (Variant("fp32", "fp32"), lambda v: _load(name)),
        (Variant("slimkit RTN int8 w-only, Linear (lm_head incl.)" if name == LM_NAME
                 else "slimkit RTN int8 w-only, Linear", "slimkit"), _slimkit_rtn(name, embeddings=False)),
        (Variant("slimkit RTN int8 w-only, Linear + embeddings", "slimkit"), _slimkit_rtn(name, embeddings=True)),
        (Variant("torchao Int8WeightOnlyConfig()", "torchao"), _torchao_int8wo(name)),
        (Variant("torch.ao quantize_dynamic qint8, per-tensor (default) — dynamic W8A8", "torch.ao"),
         _torch_ao_dynamic(name, per_channel=False)),
        (Variant("torch.ao quantize_dynamic qint8, per-channel — dynamic W8A8", "torch.ao"),
         _torch_ao_dynamic(name, per_channel=True)),
    ]


# ---------------------------------------------------------------------------------------
# Size on disk and bits per weight
# ---------------------------------------------------------------------------------------


def _slimkit_save(model: nn.Module, record: dict[str, int]) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        import slimkit

        out = slimkit.save(model, folder / "model")
        record["weights"] = (out / "model.safetensors").stat().st_size

    return save


def _torch_save(model: nn.Module) -> Callable[[Path], None]:
    return lambda folder: torch.save(model.state_dict(), folder / "state_dict.pt")


def _torchao_safetensors(model: nn.Module) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict(model.state_dict())
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / "model.safetensors"), metadata=metadata)

    return save


def measure_size(v: Variant, fp32: nn.Module) -> None:
    """Bytes on disk of ``v``'s artifact and of fp32 saved the same way."""
    if v.family in ("fp32", "slimkit"):
        rec: dict[str, int] = {}
        v.size = harness.saved_size(_slimkit_save(v.model, rec))
        ref: dict[str, int] = {}
        v.size_ref = harness.saved_size(_slimkit_save(fp32, ref))
        v.artifact = f"`slimkit.save` folder (model.safetensors: {rec['weights']:,} B)"
    elif v.family == "torchao":
        try:
            v.size = harness.saved_size(_torchao_safetensors(v.model))
            v.size_ref = harness.saved_size(_torchao_safetensors(fp32))
            v.artifact = "safetensors via `torchao.prototype.safetensors`"
        except Exception as exc:  # prototype API: fall back to torchao's documented torch.save path
            v.notes.append(f"torchao safetensors export failed ({harness.why('save', exc)}); size is torch.save")
            v.size = harness.saved_size(_torch_save(v.model))
            v.size_ref = harness.saved_size(_torch_save(fp32))
            v.artifact = "`torch.save(state_dict)`"
    else:
        v.size = harness.saved_size(_torch_save(v.model))
        v.size_ref = harness.saved_size(_torch_save(fp32))
        v.artifact = "`torch.save(state_dict)`"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_bits(v: Variant) -> None:
    """Stored bits per weight element of the quantized layers, from the tensors each tool keeps.

    slimkit: codes + float32 scales (``weight_bits_per_element``); torchao: the Int8Tensor's
    qdata + scale; torch.ao: the int8 qtensor's codes + its scale(s) and zero point(s) as
    torch stores them (float64 / int64). fp32: 32.
    """
    if v.family == "fp32":
        v.bits = 32.0
        return
    bits = elems = 0.0
    for module in v.model.modules():
        if hasattr(module, "weight_bits_per_element"):  # slimkit QuantLinear / QuantEmbedding
            n = module.slimkit_param_counts()[0]
            bits += module.weight_bits_per_element() * n
            elems += n
        elif v.family == "torchao" and isinstance(module, nn.Linear):
            w = module.weight
            names = getattr(w, "tensor_data_names", None)
            if names:  # a torchao tensor subclass
                stored = list(names) + [n for n in getattr(w, "optional_tensor_data_names", []) if getattr(w, n) is not None]
                bits += 8 * sum(_nbytes(getattr(w, n)) for n in stored)
                elems += w.numel()
        elif v.family == "torch.ao" and hasattr(module, "_packed_params") and hasattr(module._packed_params, "_weight_bias"):
            wq, _ = module._packed_params._weight_bias()
            if wq.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                meta = 8 + 8  # one float64 scale and one int64 zero point
            else:
                meta = _nbytes(wq.q_per_channel_scales()) + _nbytes(wq.q_per_channel_zero_points())
            bits += 8 * (_nbytes(wq.int_repr()) + meta)
            elems += wq.numel()
    v.bits = bits / elems if elems else None


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------


def _build_all(name: str, settings: Settings) -> list[Variant]:
    variants = []
    for v, build in build_variants(name):
        print(f"  building: {v.label}", flush=True)
        v.model = harness.guard(v, "quantize", lambda: build(v))
        variants.append(v)
    return variants


def _measure_common(variants: list[Variant]) -> None:
    fp32 = variants[0].model
    for v in variants:
        harness.guard(v, "save", lambda: measure_size(v, fp32))
        harness.guard(v, "bits", lambda: measure_bits(v))


def _forward(model: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            model(**inputs)

    return call


def _time_all(variants: list[Variant], shape: tuple[int, int], inputs: dict[str, torch.Tensor],
              settings: Settings) -> harness.Interleaved:
    """Time every variant that runs on the same inputs, interleaved in rounds (stats go on the variants)."""
    ok = []
    for v in variants:  # one guarded call first: a peer that fails here is reported, not timed
        harness.guard(v, f"forward at {shape[0]}x{shape[1]}", _forward(v.model, inputs))
        if not v.error:
            ok.append(v)
    print(f"  timing {shape[0]}x{shape[1]}: {len(ok)} variants, {settings.rounds} interleaved rounds", flush=True)
    result = harness.timed_interleaved({v.label: _forward(v.model, inputs) for v in ok}, warmup=settings.warmup,
                                       runs=settings.runs, rounds=settings.rounds,
                                       batch_size=shape[0], seq_len=shape[1])
    for v in ok:
        v.latency[shape] = result.stats[v.label]
    return result


@dataclass
class CompiledRow:
    """Latency of one variant under ``torch.compile`` at one shape."""

    label: str
    shape: tuple[int, int]
    first_call_s: float | None = None
    latency: Any = None
    error: str | None = None


def _time_compiled(variants: list[Variant], shape_inputs: list[tuple[tuple[int, int], dict[str, torch.Tensor]]],
                   settings: Settings) -> tuple[list[CompiledRow], dict[tuple[int, int], float | None]]:
    """torchao's documented speed path, applied alike to fp32, slimkit RTN (Linear) and torchao.

    ``torch.compile(model, dynamic=False)``: inductor, default mode, one static graph per
    shape. Dynamo's caches are reset before each shape, so each row is a fresh compile
    (and three models per shape stay far below the recompile limit that would silently
    fall back to eager); graph breaks are counted and noted. The first call (tracing +
    compiling) is timed apart; then the compiled models are timed interleaved like the
    eager ones.
    """
    from torch._dynamo.utils import counters

    rows = []
    compiled_load: dict[tuple[int, int], float | None] = {}
    chosen = [variants[0], next(v for v in variants if v.family == "slimkit"),
              next(v for v in variants if v.family == "torchao")]
    for shape, inputs in shape_inputs:
        torch._dynamo.reset()
        ready = {}
        for v in chosen:
            row = CompiledRow(f"{v.label} + torch.compile", shape)
            rows.append(row)
            if v.error:
                row.error = f"eager row could not run ({v.error})"
                continue
            print(f"  compiling {shape[0]}x{shape[1]}: {v.label}", flush=True)
            try:
                counters.clear()
                compiled = torch.compile(v.model, dynamic=False)
                start = time.perf_counter()
                _forward(compiled, inputs)()
                row.first_call_s = time.perf_counter() - start
                breaks = sum(counters["graph_break"].values())
                if breaks:
                    reasons = "; ".join(list(counters["graph_break"])[:3])
                    v.notes.append(f"torch.compile at {shape[0]}×{shape[1]}: {breaks} graph break(s): {reasons}")
                ready[row.label] = (row, _forward(compiled, inputs))
            except Exception as exc:  # e.g. no C++ compiler for inductor: a result to report
                row.error = harness.why("torch.compile", exc)
                print(f"  ! {row.label}: {row.error}", file=sys.stderr)
        if ready:
            print(f"  timing compiled {shape[0]}x{shape[1]}: {len(ready)} variants", flush=True)
            result = harness.timed_interleaved({k: fn for k, (_, fn) in ready.items()}, warmup=settings.warmup,
                                               runs=settings.runs, rounds=settings.rounds,
                                               batch_size=shape[0], seq_len=shape[1])
            for label, (row, _) in ready.items():
                row.latency = result.stats[label]
            compiled_load[shape] = result.other_load
    torch._dynamo.reset()
    return rows, compiled_load


def run_lm(settings: Settings, compile_rows: bool) -> dict[str, Any]:
    from slimkit.tasks.metrics import perplexity
    from slimkit.evaluation.suite import PPL_CONTEXT, PPL_STRIDE, resolve_eval_data

    print(f"[{LM_NAME}] building variants", flush=True)
    variants = _build_all(LM_NAME, settings)
    fp32 = variants[0].model
    data = resolve_eval_data(fp32, max_tokens=settings.lm_tokens)
    _measure_common(variants)
    for v in variants:
        print(f"  perplexity: {v.label}", flush=True)
        res = harness.guard(v, "perplexity", lambda: perplexity(v.model, data.token_ids, context=PPL_CONTEXT, stride=PPL_STRIDE))
        if res is not None:
            v.quality["perplexity"] = res.perplexity
    vocab = int(fp32.config.vocab_size)
    drift, shape_inputs = {}, []
    for shape in LM_SHAPES:
        g = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, vocab, shape, generator=g)}
        shape_inputs.append((shape, inputs))
        drift[shape] = _time_all(variants, shape, inputs, settings)
    compiled, compiled_load = _time_compiled(variants, shape_inputs, settings) if compile_rows else ([], {})
    n_params = sum(p.numel() for p in fp32.parameters())
    return {"variants": variants, "data": data.description, "drift": drift, "params": n_params,
            "compiled": compiled, "compiled_load": compiled_load, "shapes": LM_SHAPES}


def run_encoder(settings: Settings, compile_rows: bool) -> dict[str, Any]:
    from slimkit.core.io import tokenizer_of
    from slimkit.tasks.metrics import embedding_fidelity, encode_sentences
    from slimkit.evaluation.suite import latency_inputs, resolve_eval_data

    print(f"[{ENCODER_NAME}] building variants", flush=True)
    variants = _build_all(ENCODER_NAME, settings)
    fp32 = variants[0].model
    tokenizer = tokenizer_of(fp32)
    data = resolve_eval_data(fp32)  # 256 eval-split docstring sentences, seed 0
    data.texts = data.texts[: settings.n_texts]
    _measure_common(variants)
    reference = encode_sentences(fp32, tokenizer, data.texts, batch_size=32, max_length=128)
    for v in variants:
        print(f"  embeddings: {v.label}", flush=True)
        emb = harness.guard(v, "embed", lambda: encode_sentences(v.model, tokenizer, data.texts, batch_size=32, max_length=128))
        if emb is not None:
            fid = embedding_fidelity(emb, reference)
            v.quality.update(mean_cosine=fid.mean_cosine, min_cosine=fid.min_cosine, top1=fid.top1_agreement)
    inputs, batch, seq = latency_inputs(fp32, data)  # texts cycled to 32, padding="max_length" 128
    assert (batch, seq) == ENCODER_SHAPE and inputs["input_ids"].shape == ENCODER_SHAPE
    drift = {ENCODER_SHAPE: _time_all(variants, ENCODER_SHAPE, inputs, settings)}
    compiled, compiled_load = (_time_compiled(variants, [(ENCODER_SHAPE, inputs)], settings) if compile_rows
                               else ([], {}))
    n_params = sum(p.numel() for p in fp32.parameters())
    return {"variants": variants, "n_texts": len(data.texts), "drift": drift, "params": n_params,
            "compiled": compiled, "compiled_load": compiled_load, "shapes": (ENCODER_SHAPE,)}


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _ratio(x: float | None, ref: float | None) -> str | None:
    if x is None or ref is None or ref == 0:
        return None
    return f"{x / ref:.2f}×"


def _ms(stats: Any) -> str | None:
    return None if stats is None else f"{stats.median_ms:.1f}"


def _size_cells(v: Variant) -> list[Any]:
    return [v.artifact, None if v.size is None else f"{v.size:,}",
            None if v.size_ref is None else f"{v.size_ref:,}", _ratio(v.size, v.size_ref),
            None if v.bits is None else f"{v.bits:.2f}"]


def _failed_row(v: Variant, n_cols: int) -> list[Any]:
    return [v.label, f"**could not run** — {v.error}"] + [None] * (n_cols - 2)


def lm_table(result: dict[str, Any]) -> harness.Table:
    variants = result["variants"]
    fp32 = variants[0]
    headers = ["method", "artifact measured", "size on disk (B)", "fp32 saved alike (B)", "size vs fp32",
               "bits/weight (quantized layers)",
               "perplexity (Δ vs fp32)"]
    for b, s in LM_SHAPES:
        headers += [f"latency b{b}×{s} (ms)", f"vs fp32 b{b}"]
    t = harness.Table(headers, align="ll" + "r" * (len(headers) - 2))
    base_ppl = fp32.quality.get("perplexity")
    for v in variants:
        if v.error:
            t.add(*_failed_row(v, len(headers)))
            continue
        ppl = v.quality.get("perplexity")
        if ppl is None:
            ppl_cell = None
        elif v is fp32 or base_ppl is None:
            ppl_cell = f"{ppl:.3f}"
        else:
            ppl_cell = f"{ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%)"
        cells = [v.label, *_size_cells(v), ppl_cell]
        for shape in LM_SHAPES:
            stats, ref = v.latency.get(shape), fp32.latency.get(shape)
            cells += [_ms(stats), _ratio(stats and stats.median_ms, ref and ref.median_ms)]
        t.add(*cells)
    return t


def encoder_table(result: dict[str, Any]) -> harness.Table:
    variants = result["variants"]
    fp32 = variants[0]
    b, s = ENCODER_SHAPE
    headers = ["method", "artifact measured", "size on disk (B)", "fp32 saved alike (B)", "size vs fp32",
               "bits/weight (quantized layers)",
               "mean cosine", "min cosine", "top-1 agreement", f"latency b{b}×{s} (ms)", "vs fp32"]
    t = harness.Table(headers, align="ll" + "r" * (len(headers) - 2))
    for v in variants:
        if v.error:
            t.add(*_failed_row(v, len(headers)))
            continue
        q = v.quality
        stats, ref = v.latency.get(ENCODER_SHAPE), fp32.latency.get(ENCODER_SHAPE)
        t.add(v.label, *_size_cells(v),
              None if "mean_cosine" not in q else f"{q['mean_cosine']:.5f}",
              None if "min_cosine" not in q else f"{q['min_cosine']:.5f}",
              None if "top1" not in q else f"{q['top1']:.3f}",
              _ms(stats), _ratio(stats and stats.median_ms, ref and ref.median_ms))
    return t


def _notes(model: str, variants: list[Variant]) -> list[str]:
    """One line per distinct note, naming the rows it came from."""
    by_note: dict[str, list[str]] = {}
    for v in variants:
        for n in v.notes:
            # torch's deprecation warnings end in a "(Triggered internally at <build path>)" aside.
            n = n.split(" (Triggered internally")[0].strip()
            labels = by_note.setdefault(n, [])
            if v.label not in labels:
                labels.append(v.label)
    return [f"- {model}, {'; '.join(labels)}: {n}" for n, labels in by_note.items()]


def compiled_table(result: dict[str, Any]) -> harness.Table:
    fp32 = result["variants"][0]
    eager = {v.label: v for v in result["variants"]}
    base = {row.shape: row.latency for row in result["compiled"] if row.label.startswith(fp32.label + " ")}
    t = harness.Table(["method", "batch × seq", "first call incl. compile (s)", "latency (ms)",
                       "vs fp32 eager", "vs fp32 compiled", "vs same method eager"], align="llrrrrr")
    for row in result["compiled"]:
        b, s = row.shape
        if row.error:
            t.add(row.label, f"{b}×{s}", f"**could not run** — {row.error}", None, None, None, None)
            continue
        ms = row.latency.median_ms
        own = eager.get(row.label.removesuffix(" + torch.compile"))
        own_ms = own.latency.get(row.shape) if own else None
        ref, ref_c = fp32.latency.get(row.shape), base.get(row.shape)
        t.add(row.label, f"{b}×{s}", f"{row.first_call_s:.1f}", f"{ms:.1f}",
              _ratio(ms, ref and ref.median_ms), _ratio(ms, ref_c and ref_c.median_ms),
              _ratio(ms, own_ms and own_ms.median_ms))
    return t


def _load_text(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{100 * fraction:.0f}%"


def _drift_line(result: dict[str, Any], shapes: tuple[tuple[int, int], ...]) -> str:
    fp32 = result["variants"][0]
    parts = []
    for shape in shapes:
        timing = result["drift"].get(shape)
        medians = timing.round_medians.get(fp32.label) if timing else None
        if medians:
            parts.append(f"b{shape[0]}×{shape[1]}: fp32's median per round " + ", ".join(f"{m:.1f}" for m in medians)
                         + f" ms; other processes took {_load_text(timing.other_load)} of the CPUs meanwhile")
    if not parts:
        return ""
    return ("Drift check (every row is timed in every round, so drift falls on all rows alike): "
            + "; ".join(parts) + ".")


def _compiled_block(result: dict[str, Any], settings: Settings) -> list[str]:
    if not result["compiled"]:
        return []
    return [
        "Under `torch.compile(model, dynamic=False)` (inductor, default mode, a fresh compile per row with "
        "a cold private cache; torchao's `quantize_` also set its recommended inductor options, which then "
        "hold for every compiled row), same inputs, timed like the eager rows (interleaved among "
        "themselves) after the first call; quality and size are those of the eager rows:",
        "",
        compiled_table(result).to_markdown(),
        "",
        "Share of the CPUs other processes took while the compiled rows were timed: "
        + ", ".join(f"{_load_text(f)} ({b}×{s_})" for (b, s_), f in result["compiled_load"].items()) + ".",
        "",
    ]


def render(lm: dict[str, Any], enc: dict[str, Any], env: dict[str, Any], settings: Settings,
           seconds: float) -> str:
    b, s = ENCODER_SHAPE
    timing = (f"{THREADS} threads, warm-up {settings.warmup}, median of {settings.runs} timed calls "
              f"(`slimkit.core.measure.measure_latency`) taken in {settings.rounds} rounds that "
              f"alternate over all rows ({settings.runs // settings.rounds} calls per row per round)")
    out = [
        "## int8 weight-only: slimkit RTN vs fp32, torchao and torch.ao",
        "",
        f"The whole run took {seconds:.0f} s (1-min load average at its end, its own 2 threads included: {harness.load_average()}). "
        + harness.environment_line(env),
        "",
        f"### stdlib-coder (zoo causal LM, {lm['params'] / 1e6:.2f}M parameters)",
        "",
        f"Perplexity: {lm['data']} (sliding windows, every token predicted once). "
        f"Latency (eager PyTorch): one forward of seeded random token ids at batch 1 × seq 256 and batch 8 × seq 256, {timing}.",
        "",
        lm_table(lm).to_markdown(),
        "",
        _drift_line(lm, LM_SHAPES),
        "",
        *_compiled_block(lm, settings),
        f"### MiniLM (all-MiniLM-L6-v2, {enc['params'] / 1e6:.2f}M parameters)",
        "",
        f"Quality: mean-pooled sentence embeddings of {enc['n_texts']} eval-split docstring sentences "
        "(`sample_texts(\"eval\", 256, seed=0)`, max_length 128) vs the fp32 model's: mean and min cosine, "
        f"and top-1 nearest-neighbour agreement. Latency (eager PyTorch): one forward at batch {b} × seq {s} "
        f"(padding to max_length {s}), {timing}.",
        "",
        encoder_table(enc).to_markdown(),
        "",
        _drift_line(enc, (ENCODER_SHAPE,)),
        "",
        *_compiled_block(enc, settings),
    ]
    notes = _notes("stdlib-coder", lm["variants"]) + _notes("MiniLM", enc["variants"])
    if notes:
        out += ["Notes from the run:", "", *notes, ""]
    out += [
        "**Reading the table.** All figures come from this one run; every \"vs fp32\" ratio compares rows "
        "of that run. *Size on disk*: bytes of every file of each tool's saved artifact, divided by fp32 "
        "saved the same way (slimkit: the `slimkit.save` folder, whose config, tokenizer and slimkit.json "
        "files raise its ratio a little above the weights-only one; torchao: safetensors through its "
        "prototype flattening; torch.ao: `torch.save` of the state dict). *Bits/weight*: stored codes plus "
        "scales (and zero points) of the quantized layers only; float tensors left unquantized count in "
        "the size, not here. Quality is measured against fp32 on held-out data that nothing was tuned on. "
        f"Latency is eager PyTorch on {THREADS} threads: slimkit's `QuantLinear` dequantizes its int8 "
        "weight to float32 on every forward and then runs the float matmul, so it is expected to be "
        "*slower* than fp32; it is reported as measured, untuned. `torch.compile`, torchao's documented "
        "speed path, is timed apart for fp32, slimkit and torchao alike. torch.ao `quantize_dynamic` is a "
        "different technique (activations quantized to int8 at run time, int8 GEMM through fbgemm), shown "
        "for orientation. slimkit's int8 speed is to come from ONNX Runtime's int8 kernels through the "
        "ONNX export (a later issue), not from these PyTorch modules.",
    ]
    return "\n".join(out).replace("\n\n\n", "\n\n")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser("bench_int8_weight_only", __doc__.split("\n")[0], quick="smoke test: fewer runs and tokens; never written", no_write="print the tables only; leave BENCHMARKS.md alone")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile latency rows")
    args = parser.parse_args(argv)

    harness.set_threads(THREADS)
    torch.manual_seed(0)
    # A cold, private inductor cache: "first call incl. compile" never reuses an earlier run's work.
    inductor_cache = tempfile.mkdtemp(prefix="slimkit-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()
    try:
        lm = run_lm(settings, compile_rows=not args.no_compile)
        enc = run_encoder(settings, compile_rows=not args.no_compile)
    finally:
        shutil.rmtree(inductor_cache, ignore_errors=True)
    seconds = time.perf_counter() - start
    markdown = render(lm, enc, env, settings, seconds)

    print()
    print(lm_table(lm).to_text())
    print()
    print(encoder_table(enc).to_text())
    print()
    for result in (lm, enc):
        if result["compiled"]:
            print(compiled_table(result).to_text())
            print()
    print(markdown)
    print(f"\nrun took {seconds:.0f} s")
    own_failures = [f"{v.label}: {v.error}" for r in (lm, enc) for v in r["variants"]
                    if v.error and v.family in ("fp32", "slimkit")]
    return harness.publish(args, SECTION, markdown, own_failures)


if __name__ == "__main__":
    sys.exit(main())
