"""G4 — KV-cache quantization on stdlib-coder at its longest context: slimkit int8 / int4 beside the fp32 cache
and transformers' QuantizedCache (quanto, HQQ and fp8 backends), measured in one run.

    python -m benchmarks.bench_kv_cache            # full run, writes the G4 section of BENCHMARKS.md
    python -m benchmarks.bench_kv_cache --quick    # smoke test: few windows, one timing run; never written
    python -m benchmarks.bench_kv_cache --no-write # full run, printed only

Model: the zoo causal LM ``stdlib-coder`` (LlamaForCausalLM, 6 layers, 8 query heads sharing 4 kv heads,
head_dim 32, max_position_embeddings 1024), weights in fp32 and untouched: only the cache changes.

Rows (a fresh cache per sequence):
- fp32: transformers' ``DynamicCache`` (what ``generate`` makes by default);
- slimkit ``make_kv_cache("int8")`` and ``("int4")`` (per token and kv head over head_dim; fp16 scale,
  and fp16 offset at 4 bit), int4 with ``group_size=16``, and int4 with a 128-token fp32 residual
  window (transformers' QuantizedCache default, to show what a residual buys and costs);
- peers, from their public API with their documented defaults (``QuantizedCache(backend, config, nbits=...)``:
  q_group_size 64, residual_length 128, axis 0): quanto nbits 4 and 2 (the only ones it takes), HQQ
  nbits 8 and 4 with axis 1 for keys and values (the setting transformers' docs recommend for HQQ)
  and nbits 4 at its defaults (axis 0), and the fp8 backend (per-tensor float8_e4m3 scale frozen on
  the first update, no residual).

Columns:
- cache bytes at 1024 tokens: ``kv_cache_nbytes`` (every tensor the cache holds, each storage counted
  once: codes, scales, zero points / offsets, residual windows) after the first 896 eval tokens fed in
  chunks of 128 and 128 one-token decode steps, batch 1; × fp32 = ratio to the DynamicCache's bytes;
- peak × fp32 while decoding: the largest ratio to fp32's bytes at the same length over those 128
  one-token steps (a residual window fills between flushes);
- perplexity at context 1024: windows of 1024 tokens, each fed in chunks of 128 through its own cache
  (``kv_cache_perplexity``), so attention from every chunk after the first reads the earlier chunks
  back from the cache (quantized, then dequantized); pooled over the windows, with % increase over
  fp32. Two held-out texts: the stdlib corpus's *eval* split (code, the split every stdlib-coder
  perplexity uses) and Python's documentation prose (``pydoc_data.topics``, English text that the
  stdlib corpus excludes from every split, so the model never trained on it);
- decode tokens/s: greedy, batch 1, 128 new tokens after a 128-token prompt (the first 128 eval tokens),
  ``slimkit.tasks.generation.decode_loop`` (decode steps timed apart from the prefill); one warm-up,
  then the median of 3 runs interleaved over the rows, and 1 / the median of all their one-token steps;
  2 threads. "same tokens": how many of the 128 greedy tokens equal the fp32 cache's.

A peer that cannot run is a row with the stage and the exception; a failed fp32 or slimkit row stops
the run from writing BENCHMARKS.md.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import harness

SECTION = "g4-kv-cache"
THREADS = 2
MODEL = "stdlib-coder"
CHUNK = 128
PROMPT, NEW = 128, 128
DECODE_PREFILL = 896  # peak-bytes probe: prompt, then 128 single-token steps to reach 1024
G4_RATIO, G4_PPL = 0.27, 0.005  # target G4: int8 cache ≤ 0.27× fp32's bytes, perplexity +≤ 0.5%
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


@dataclass(frozen=True)
class Settings:
    quick: bool
    code_windows: int
    prose_windows: int
    runs: int


FULL = Settings(quick=False, code_windows=8, prose_windows=4, runs=3)
QUICK = Settings(quick=True, code_windows=2, prose_windows=1, runs=1)


@dataclass
class Row:
    """One cache: how to make a fresh one, and what was measured with it."""

    label: str
    family: str  # "fp32", "slimkit" or "peer"
    make: Callable[[], Any]
    layout: str = ""
    error: str | None = None
    nbytes: int | None = None
    peak_ratio: float | None = None
    ppl: dict[str, float] = field(default_factory=dict)
    decode_tps: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # every timed one-token decode step
    new_ids: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


def _isa() -> str:
    flags = harness._cpu_flags()
    return ", ".join(f.upper() for f in ISA_FLAGS if f in flags) or "unknown"


def build_rows(model: Any) -> list[Row]:
    """Every cache of the run; a peer whose constructor fails becomes a row with the reason."""
    from transformers import DynamicCache
    from transformers.cache_utils import QuantizedCache

    from slimkit.quantization.kv_cache import kv_bits_per_element, make_kv_cache

    cfg = model.config
    head_dim = cfg.head_dim
    rows = [Row("fp32 (transformers DynamicCache)", "fp32", DynamicCache, "32 bits/element")]

    def slimkit(label: str, spec: str, **kw: Any) -> Row:
        bits = kv_bits_per_element(8 if spec == "int8" else 4, head_dim, kw.get("group_size"))
        layout = f"{bits:g} bits/element" + (f" + {kw['residual']} fp32 tokens" if kw.get("residual") else "")
        return Row(label, "slimkit", lambda: make_kv_cache(spec, model, **kw), layout)

    rows += [
        slimkit("slimkit int8 (per token+head, fp16 scale)", "int8"),
        slimkit("slimkit int4 (per token+head, fp16 scale+offset)", "int4"),
        slimkit("slimkit int4, group 16", "int4", group_size=16),
        slimkit("slimkit int4, residual 128", "int4", residual=128),
    ]

    def peer(label: str, backend: str, layout: str, **kw: Any) -> Row:
        row = Row(label, "peer", lambda: QuantizedCache(backend, cfg, **kw), layout)
        harness.guard(row, "QuantizedCache()", row.make)  # a backend that cannot even be built
        return row

    res = "g64 + ≤128 fp32 residual tokens"
    rows += [
        peer("transformers QuantizedCache quanto nbits=4", "quanto", f"4-bit, {res}", nbits=4),
        peer("transformers QuantizedCache quanto nbits=2", "quanto", f"2-bit, {res}", nbits=2),
        peer("transformers QuantizedCache HQQ nbits=8 axis 1", "hqq", f"8-bit, {res}", nbits=8, axis_key=1,
             axis_value=1),
        peer("transformers QuantizedCache HQQ nbits=4 axis 1", "hqq", f"4-bit, {res}", nbits=4, axis_key=1,
             axis_value=1),
        peer("transformers QuantizedCache HQQ nbits=4 (defaults, axis 0)", "hqq", f"4-bit, {res}", nbits=4),
        peer("transformers QuantizedCache fp8", "fp8", "float8_e4m3, one scale per tensor"),
    ]
    return rows


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def eval_windows(model: Any, settings: Settings, context: int) -> dict[str, tuple[torch.Tensor, str]]:
    """(windows, context) token ids and a description for each held-out text."""
    from pydoc_data.topics import topics

    from slimkit.core.io import tokenizer_of
    from slimkit.evaluation.suite import resolve_eval_data
    from slimkit.tasks.causal_lm import token_stream

    out = {}
    n = settings.code_windows * context
    code = resolve_eval_data(model, max_tokens=n).token_ids[:n]
    out["stdlib eval"] = (code.view(-1, context), f"stdlib corpus eval split, first {code.numel():,} tokens")
    n = settings.prose_windows * context
    text = "\n\n".join(topics[k] for k in sorted(topics))
    prose = token_stream([text], tokenizer_of(model), max_tokens=n)[:n]
    if prose.numel() < n:
        raise RuntimeError(f"pydoc topics gave {prose.numel()} tokens, {n} needed")
    out["docs prose"] = (prose.view(-1, context), (f"Python docs prose (pydoc_data.topics, sorted by topic, outside "
                                                   f"every stdlib split), first {prose.numel():,} tokens"))
    return out


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def _forward(model: Any, ids: torch.Tensor, cache: Any) -> Any:
    """One forward through ``cache``; returns the (possibly new) cache and the logits."""
    from slimkit.tasks.generation import cache_keyword, returned_cache

    out = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    return returned_cache(out), out.logits


@torch.no_grad()
def measure_bytes(model: Any, row: Row, ids: torch.Tensor, fp32_bytes: int | None) -> None:
    """Bytes held at 1024 tokens, and the peak ratio to fp32's bytes at the same length on the way there.

    One pass: the first 896 tokens fed in chunks of 128, then 128 one-token decode steps (where a
    residual window fills between flushes); ``fp32_bytes`` is the fp32 cache's at 1024 tokens
    (None for the fp32 row itself: its own bytes, measured the same way).
    """
    from slimkit.quantization.kv_cache import kv_cache_nbytes

    n = ids.shape[1]
    cache = row.make()
    for start in range(0, DECODE_PREFILL, CHUNK):
        cache, _ = _forward(model, ids[:, start:min(start + CHUNK, DECODE_PREFILL)], cache)
    sizes = []
    for t in range(DECODE_PREFILL, n):
        cache, _ = _forward(model, ids[:, t:t + 1], cache)
        sizes.append((t + 1, kv_cache_nbytes(cache)))
    row.nbytes = sizes[-1][1]
    ref = fp32_bytes or row.nbytes
    row.peak_ratio = max(b / (ref * length / n) for length, b in sizes)  # fp32's bytes grow linearly with length


def measure_decode(model: Any, rows: list[Row], prompt: torch.Tensor, settings: Settings) -> float | None:
    """Decode tokens/s of every row: one warm-up each, then ``runs`` rounds over the rows (greedy, batch 1)."""
    from slimkit.tasks.generation import decode_loop

    def run(row: Row, steps: list[float] | None = None) -> Any:
        def step(new_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            start = time.perf_counter()
            cache, logits = _forward(model, new_ids, cache)
            if steps is not None and new_ids.shape[1] == 1:  # decode steps only, not the prefill
                steps.append(time.perf_counter() - start)
            return logits, cache

        with torch.no_grad():
            return decode_loop(step, prompt, NEW, state=row.make(), eos_token_id=None, runtime="pytorch eager")

    live = [r for r in rows if not r.error]
    for row in live:
        result = harness.guard(row, "decode", lambda row=row: run(row))
        if result is not None:
            row.new_ids = result.new_ids[0]
    with harness.OtherLoad() as load:
        for r in range(settings.runs):
            for row in live if r % 2 == 0 else list(reversed(live)):
                result = harness.guard(row, "decode", lambda row=row: run(row, row.step_s))
                if result is not None:
                    row.decode_tps.append(result.decode_tokens_per_s)
    return load.fraction


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def _pct(value: float, ref: float) -> str:
    return f"{100 * (value / ref - 1):+.3f}%"


def table(rows: list[Row], texts: list[str]) -> harness.Table:
    """The results table."""
    fp32 = rows[0]
    heads = ["cache", "layout", "bytes at 1024 tokens", "× fp32", "peak × fp32 while decoding"]
    for t in texts:
        heads += [f"perplexity ({t})", "Δ vs fp32"]
    heads += ["decode tok/s (median of runs)", "× fp32", "1 / median step", "× fp32", "same greedy tokens"]
    t = harness.Table(heads, align="ll" + "r" * (len(heads) - 2))
    fp32_tps = statistics.median(fp32.decode_tps) if fp32.decode_tps else None
    fp32_step = 1 / statistics.median(fp32.step_s) if fp32.step_s else None
    for r in rows:
        if r.error and r.nbytes is None:
            t.add(r.label, r.layout, f"**could not run** — {r.error}", *([None] * (len(heads) - 3)))
            continue
        cells: list[Any] = [r.label, r.layout + (f" ({r.error})" if r.error else ""),
                            None if r.nbytes is None else f"{r.nbytes:,}",
                            None if r.nbytes is None or not fp32.nbytes else f"{r.nbytes / fp32.nbytes:.4f}",
                            None if r.peak_ratio is None else f"{r.peak_ratio:.4f}"]
        for text in texts:
            p, ref = r.ppl.get(text), fp32.ppl.get(text)
            cells += [None if p is None else f"{p:.4f}",
                      None if p is None or ref is None or r is fp32 else _pct(p, ref)]
        tps = statistics.median(r.decode_tps) if r.decode_tps else None
        same = None
        if r.new_ids is not None and fp32.new_ids is not None:
            same = f"{int((r.new_ids == fp32.new_ids).sum())}/{len(fp32.new_ids)}"
        by_step = 1 / statistics.median(r.step_s) if r.step_s else None
        cells += [None if tps is None else f"{tps:.1f}", None if tps is None or not fp32_tps else f"{tps / fp32_tps:.2f}×",
                  None if by_step is None else f"{by_step:.1f}",
                  None if by_step is None or not fp32_step else f"{by_step / fp32_step:.2f}×", same]
        t.add(*cells)
    return t


def target_lines(rows: list[Row], texts: list[str]) -> list[str]:
    """G4 for the int8 row (and what int4 gets), met or missed, with the numbers."""
    fp32 = rows[0]
    lines = []
    for r in rows:
        if r.family != "slimkit" or r.nbytes is None:
            continue
        ratio = r.nbytes / fp32.nbytes
        checks = [f"{ratio:.4f}× fp32 bytes ≤ {G4_RATIO}: " + ("**met**" if ratio <= G4_RATIO else "**missed**")]
        for text in texts:
            if text in r.ppl and text in fp32.ppl:
                inc = r.ppl[text] / fp32.ppl[text] - 1
                checks.append(f"perplexity {100 * inc:+.3f}% on {text} ≤ +{100 * G4_PPL:.1f}%: "
                              + ("**met**" if inc <= G4_PPL else "**missed**"))
        kind = "G4" if "int8" in r.label else "G4's bar applied to this row (the target is for int8)"
        lines.append(f"- {r.label} — {kind}: " + "; ".join(checks))
    return lines


def render(rows: list[Row], info: dict[str, Any], env: dict[str, Any], seconds: float, load: float | None) -> str:
    """The BENCHMARKS.md section."""
    texts = list(info["data"])
    cfg = info["config"]
    return "\n".join([
        ("## G4 — KV-cache quantization (stdlib-coder at its 1024-token context: slimkit int8 / int4 beside the fp32 "
         "cache and transformers' QuantizedCache)"),
        "",
        f"The whole run took {seconds:.0f} s. ISA: {_isa()}. " + harness.environment_line(env)
        + f"; optimum-quanto {harness._version('optimum-quanto')}, hqq {harness._version('hqq')}.",
        "",
        f"Model: {MODEL} (fp32 weights, {cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} kv heads × head_dim "
        f"{cfg.head_dim}, {cfg.num_attention_heads} query heads). Perplexity: "
        + "; ".join(f"{name}: {desc}, as {info['data'][name][0].shape[0]} windows of {info['context']} tokens"
                    for name, desc in ((k, v[1]) for k, v in info["data"].items()))
        + f". Each window is fed in chunks of {CHUNK} through a fresh cache, so every chunk after the first attends "
        "over the earlier ones as read back from the cache; with the fp32 cache this equals the one-shot "
        "full-forward perplexity. Decode: batch 1, greedy, "
        f"{NEW} new tokens after a {PROMPT}-token prompt, {env['threads']} threads, one warm-up then the median of "
        f"{info['runs']} runs interleaved over the rows"
        + (f"; other processes took {100 * load:.0f}% of the machine's CPU time meanwhile." if load is not None
           else "."),
        "",
        table(rows, texts).to_markdown(),
        "",
        "**Target G4** (int8 cache memory ≤ 0.27× fp32's and perplexity increase ≤ 0.5% at the longest context):",
        "",
        *target_lines(rows, texts),
        "",
        "**Reading the table.**",
        "",
        ("- bytes: `kv_cache_nbytes`, every tensor the cache holds (codes, scales, zero points or offsets, the "
         "full-precision residual), each storage once, after 896 tokens fed in chunks of 128 and 128 one-token decode "
         "steps (batch 1). transformers' QuantizedCache moves its residual (up to 128 fp32 tokens) into the quantized "
         "store when it fills, by dequantizing the whole past and quantizing all of it again (so older tokens are "
         "re-quantized at every flush); one flush falls on the 1024th token here, so its residual is empty in the "
         "bytes column, and the peak column (the largest ratio to fp32 at the same length over the 128 one-token "
         "steps) shows it holding 127 fp32 tokens. slimkit's residual is a sliding window: always the last 128 "
         "tokens."),
        ("- slimkit's layout: per token and kv head, over head_dim — int8 symmetric with an fp16 scale (8 + 16/32 = "
         "8.5 bits per element), int4 asymmetric packed two per byte with an fp16 scale and fp16 offset (4 + 32/32 "
         "= 5 bits; group 16: 6 bits). Tokens are quantized once, on arrival, and appended; attention reads the "
         "dequantized past and the current call's own tokens exact (as transformers' quantized caches do)."),
        ("- decode tok/s: decode_loop's tokens/s of each run (127 one-token steps after the prefill), median of the "
         "runs; 1 / median step: the median wall time of all those steps pooled, inverted, which a burst of other "
         "processes moves less. Every quantized cache dequantizes the whole past at every step (eager PyTorch, no "
         "fused quantized-attention kernel), and slimkit's also quantizes each new token as it arrives (a few dozen "
         "small tensor ops per layer and step), where QuantizedCache quantizes once per 128 tokens (and then the "
         "whole past again). This machine is shared: timings move with the other processes' CPU share stated above; "
         "compare rows of one run only."),
        "",
    ]).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_kv_cache", summary, quick="smoke test: few windows, one timing run; never written")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)

    harness.set_threads(THREADS)
    torch.manual_seed(0)
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()

    import slimkit as sk
    from slimkit.quantization.kv_cache import kv_cache_perplexity

    model = sk.load(MODEL).eval()
    context = model.config.max_position_embeddings
    data = eval_windows(model, settings, context)
    rows = build_rows(model)
    first = data["stdlib eval"][0][:1]

    fp32_bytes = None
    for row in rows:
        if row.error:
            continue
        print(f"  {row.label}", flush=True)
        t = time.perf_counter()
        harness.guard(row, "bytes", lambda row=row, ref=fp32_bytes: measure_bytes(model, row, first, ref))
        if row.family == "fp32":
            fp32_bytes = row.nbytes
        for name, (windows, _) in data.items():
            ppl = harness.guard(row, f"perplexity ({name})",
                                lambda row=row, windows=windows: kv_cache_perplexity(model, windows, row.make, CHUNK))
            if ppl is not None:
                row.ppl[name] = ppl
        print(f"    bytes {row.nbytes}, ppl {row.ppl}, {time.perf_counter() - t:.1f} s", flush=True)
    print("  decoding", flush=True)
    load = measure_decode(model, rows, first[:, :PROMPT], settings)
    seconds = time.perf_counter() - start

    info = {"data": data, "context": context, "config": model.config, "runs": settings.runs}
    markdown = render(rows, info, env, seconds, load)
    own_failures = [f"{r.label}: {r.error}" for r in rows if r.error and r.family != "peer"]
    own_failures += [f"{r.label}: perplexity {p}" for r in rows if r.family != "peer" for p in r.ppl.values()
                     if not math.isfinite(p)]
    print()
    print(table(rows, list(data)).to_text())
    print()
    print(markdown)
    return harness.publish(args, SECTION, markdown, own_failures)


if __name__ == "__main__":
    sys.exit(main())
