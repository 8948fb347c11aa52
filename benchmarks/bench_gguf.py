"""Q1/Q2/P8 — GGUF export of stdlib-coder: slimkit's GPTQ/AWQ/RTN weights in llama.cpp beside llama.cpp's own
quantizer at the same types, perplexity measured by llama.cpp itself, one run.

    python -m benchmarks.bench_gguf            # full run, writes the Q1-Q2-gguf section of BENCHMARKS.md
    python -m benchmarks.bench_gguf --quick    # smoke test: few windows and tokens; never written
    python -m benchmarks.bench_gguf --no-write # full run, printed only

Model: the zoo causal LM ``stdlib-coder`` (Llama architecture, 6.23M parameters, hidden 256, FFN 640, 6 blocks,
byte-level BPE vocabulary of 4096 tokens, untied lm_head). llama.cpp: llama-cpp-python (its vendored llama.cpp,
built from source) for every evaluation and timing; ``llama-quantize`` and ``llama-imatrix`` built from the same
source; ``convert_hf_to_gguf.py`` of that tree (``benchmarks.peers_generate.convert_to_gguf``) on the ``sk.save``
folder of the model.

Files (every 2-D weight, token embedding and output included; norms stay F32 everywhere):
- llama.cpp: f32 (the converter; the reference every gap is measured from); ``llama-quantize`` from it: Q4_0
  (its default mix, which writes output.weight as Q6_K), Q4_0 ``--pure`` (every weight Q4_0), Q4_0 ``--pure``
  with llama.cpp's importance matrix, Q4_K_S with the importance matrix (its documented way to make K-quants:
  a default mix with some Q5_K and output Q6_K), Q4_K ``--pure`` with and without it. The importance matrix:
  ``llama-imatrix -c 256 --chunks 64`` on the stdlib *calibration* split as text (64 chunks of 256 tokens, the
  same token budget as slimkit's calibration).
- slimkit: ``sk.quantize_`` on a copy of the model with ``RTN(grid=...)``, ``GPTQ(grid=...)`` (decoder blocks;
  lm_head stays float) or ``AWQ(grid="q4_0")``, then ``export_gguf(model, path, qtype=...)``, which copies the
  codes of every quantized layer and encodes float weights (token embedding; lm_head after GPTQ/AWQ) with
  the type's own rounding. Calibration: 64 windows of 256 tokens (seed 0) of the stdlib *calibration* split.
  Also slimkit's own importance matrix (``slimkit.export.imatrix`` on those 64 windows) handed to
  ``llama-quantize`` (a check of the file), and slimkit's f32 export (a check of the exporter). Two diagnostic
  files quantize the decoder blocks only (RTN on the blocks, GPTQ; token_embd and output written F32 with
  ``embedding_type`` / ``output_type="f32"``), to show where the q4_0 gap lies and how much of it GPTQ can reach.
- Like with like (same tensor types, same bytes): slimkit's exporter writes one type for every weight unless
  told otherwise, so its q4_0 file holds what llama.cpp's ``--pure`` Q4_0 holds and its q4_k file what
  ``--pure`` Q4_K holds (both fall back to Q5_0 where a row is not a multiple of 256 long: ffn_down's 640).
  llama.cpp's default Q4_0 mix writes output.weight as Q6_K: slimkit's GPTQ q4_0 exported with
  ``output_type="q6_k"`` is its like. Its Q4_K_S mix also raises some attn_v/ffn_down tensors to Q5_K, which
  slimkit's exporter does not do: that row holds more bytes than slimkit's q4_k and is listed for reference.

Quality: perplexity computed from llama.cpp's logits (``Llama(n_ctx=256, n_batch=256, logits_all=True,
n_threads=2)``, default f16 KV cache) on the same token ids for every file (tokenized once with the model's
Hugging Face tokenizer): non-overlapping windows of 256 tokens, the negative log-likelihood of each window's
tokens 2..256 from float64 log-softmax. Two texts: the first 32,768 tokens of the stdlib *eval* split
(disjoint from calibration) and 32,768 tokens of held-out Python that is not the stdlib: the sources of pip's
own ``pip/_internal`` package (files in sorted order, an eos token between them; ``--quick``: 2,048 tokens
of each). "Gap closed" = (ppl of llama.cpp's file − ppl of slimkit's) ÷ (ppl of llama.cpp's file − ppl of
f32). Weight error: Σ‖Ŵ − W‖² ÷ Σ‖W‖² over the blk.* weights of each file against the f32 file (dequantized by
the ``gguf`` package; both writers permute q/k rows alike).

Speed (Q2): decode tokens/s of slimkit's GPTQ q4_0 file and llama.cpp's Q4_0 files in llama-cpp-python
(``LlamaCppRunner``: 128-token prompt from the eval split, 128 new greedy tokens, tokens/s over the 127 one-token
steps after the first, 2 threads), in interleaved rounds (order reversed every other round; one warm-up
generation each); the median of 11 runs per file (``--quick``: 1), with the fastest run beside it: on this shared
2-core machine a run during which another process takes a core can be 10–100× slower (llama.cpp's two threads
wait for each other at every op), so single runs vary a lot.

Export time (P8): wall seconds of ``export_gguf`` on the float model for every type it writes, and on each
quantized model above (its codes copied).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import harness
from benchmarks import peers_generate as pg

SECTION = "Q1-Q2-gguf"
THREADS = 2
MODEL = "stdlib-coder"
CTX = 256
GAP_TARGET = 0.5  # Q1: slimkit's GPTQ q4_0 closes >= 50% of llama.cpp Q4_0's gap to f32
EXPORT_TARGET_S = 10.0  # P8
BIN = pg.BENCH_TOOLS / "llama-build" / "bin"


@dataclass(frozen=True)
class Settings:
    quick: bool
    eval_tokens: int
    pip_tokens: int
    n_calib: int
    imatrix_chunks: int
    decode_runs: int
    prompt_len: int
    new_tokens: int


FULL = Settings(quick=False, eval_tokens=32768, pip_tokens=32768, n_calib=64, imatrix_chunks=64, decode_runs=11,
                prompt_len=128, new_tokens=128)
QUICK = Settings(quick=True, eval_tokens=2048, pip_tokens=2048, n_calib=8, imatrix_chunks=8, decode_runs=1,
                 prompt_len=32, new_tokens=16)
TEXTS = ("stdlib eval", "pip/_internal")
SPEED_ROWS = ("sk-gptq-q4_0", "lc-q4_0-pure", "sk-gptq-q4_0-mix", "lc-q4_0")  # Q2: pairs of files of one type mix


@dataclass
class Row:
    """One GGUF file: how it is made, and what was measured."""

    id: str
    label: str
    family: str  # "fp32" (llama.cpp's f32 reference), "peer" (llama.cpp's quantizer) or "slimkit"
    qtype: str  # the type its weights are meant to have: f32, q4_0, q4_k
    ftype: str | None = None  # llama-quantize's type name
    pure: bool = False
    imatrix: str | None = None  # "llama" or "slimkit": whose importance matrix llama-quantize gets
    config: Any = None  # slimkit rows: the quantize config (None: the float model)
    output_type: str | None = None  # slimkit rows: export_gguf's output_type (llama.cpp's mixes: q6_k)
    embedding_type: str | None = None  # slimkit rows: export_gguf's embedding_type
    path: Path | None = None
    file_bytes: int | None = None
    types: str | None = None
    make_s: float | None = None  # convert / quantize / compress seconds
    export_s: float | None = None  # slimkit rows: export_gguf seconds
    ppl: dict[str, float] = field(default_factory=dict)
    weight_err: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def build_rows() -> list[Row]:
    import slimkit as sk

    return [
        Row("f32", "llama.cpp f32 (convert_hf_to_gguf)", "fp32", "f32"),
        Row("lc-q4_0", "llama.cpp Q4_0 (default mix)", "peer", "q4_0", "Q4_0"),
        Row("lc-q4_0-pure", "llama.cpp Q4_0 --pure", "peer", "q4_0", "Q4_0", pure=True),
        Row("lc-q4_0-pure-imx", "llama.cpp Q4_0 --pure + llama-imatrix", "peer", "q4_0", "Q4_0", True, "llama"),
        Row("sk-rtn-q4_0", "slimkit RTN(grid=q4_0) → q4_0", "slimkit", "q4_0", config=sk.RTN(grid="q4_0")),
        Row("sk-gptq-q4_0", "slimkit GPTQ(grid=q4_0) → q4_0", "slimkit", "q4_0", config=sk.GPTQ(grid="q4_0")),
        Row("sk-gptq-q4_0-mix", "slimkit GPTQ(grid=q4_0) → q4_0, output q6_k", "slimkit", "q4_0",
            config=sk.GPTQ(grid="q4_0"), output_type="q6_k"),
        Row("sk-rtn-q4_0-blocks", "slimkit RTN(grid=q4_0) → q4_0 blocks only (token_embd, output F32)", "slimkit",
            "q4_0", config=sk.RTN(grid="q4_0", include=(r"re:model\.layers\..*",)), output_type="f32",
            embedding_type="f32"),
        Row("sk-gptq-q4_0-blocks", "slimkit GPTQ(grid=q4_0) → q4_0 blocks only (token_embd, output F32)", "slimkit",
            "q4_0", config=sk.GPTQ(grid="q4_0"), output_type="f32", embedding_type="f32"),
        Row("sk-awq-q4_0", "slimkit AWQ(grid=q4_0) → q4_0", "slimkit", "q4_0", config=sk.AWQ(grid="q4_0")),
        Row("lc-q4_k_s-imx", "llama.cpp Q4_K_S (default mix) + llama-imatrix", "peer", "q4_k", "Q4_K_S",
            imatrix="llama"),
        Row("lc-q4_k-pure", "llama.cpp Q4_K --pure", "peer", "q4_k", "Q4_K", pure=True),
        Row("lc-q4_k-pure-imx", "llama.cpp Q4_K --pure + llama-imatrix", "peer", "q4_k", "Q4_K", True, "llama"),
        Row("lc-q4_k-pure-skimx", "llama.cpp Q4_K --pure + slimkit's imatrix", "slimkit", "q4_k", "Q4_K", True,
            "slimkit"),
        Row("sk-rtn-q4_k", "slimkit RTN(grid=q4_k) → q4_k", "slimkit", "q4_k", config=sk.RTN(grid="q4_k")),
        Row("sk-gptq-q4_k", "slimkit GPTQ(grid=q4_k) → q4_k", "slimkit", "q4_k", config=sk.GPTQ(grid="q4_k")),
        Row("sk-f32", "slimkit export_gguf f32 (check)", "slimkit", "f32"),
    ]


def row(rows: list[Row], rid: str) -> Row:
    return next(r for r in rows if r.id == rid)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def whole_windows(ids: list[int], limit: int) -> list[int]:
    ids = ids[:limit]
    return ids[: len(ids) // CTX * CTX]


def pip_token_ids(tokenizer: Any, limit: int) -> list[int]:
    """Token ids of pip's own ``pip/_internal`` sources (sorted files, eos between them), first ``limit``."""
    import pip

    from slimkit.core.calibration import tokenize_texts

    root = Path(pip.__file__).parent / "_internal"
    texts, chars = [], 0
    for f in sorted(root.rglob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
            chars += len(text)
        if chars > 8 * limit:  # a few characters per token: plenty
            break
    return whole_windows(tokenize_texts(texts, tokenizer).tolist(), limit)


# ---------------------------------------------------------------------------------------
# Making the files
# ---------------------------------------------------------------------------------------


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        found = shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"llama.cpp's {name} is not built ({path} missing, not on PATH)")
        path = Path(found)
    return path


def run_tool(cmd: list[str], timeout: float = 1800) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = " / ".join(log.strip().splitlines()[-3:])
        raise RuntimeError(f"{Path(cmd[0]).name} exit {proc.returncode}: {tail[:300]}")
    return log


def llama_imatrix(f32: Path, text_file: Path, out: Path, chunks: int) -> tuple[Path, float]:
    t = time.perf_counter()
    run_tool([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(text_file), "-o", str(out), "-c", str(CTX),
              "--chunks", str(chunks), "-t", str(THREADS), "--no-ppl"])
    return out, time.perf_counter() - t


def llama_quantize(r: Row, f32: Path, out: Path, imatrices: dict[str, Path]) -> None:
    cmd = [str(tool("llama-quantize"))]
    if r.pure:
        cmd.append("--pure")
    if r.imatrix:
        cmd += ["--imatrix", str(imatrices[r.imatrix])]
    cmd += [str(f32), str(out), r.ftype, str(THREADS)]
    t = time.perf_counter()
    log = run_tool(cmd)
    r.make_s = time.perf_counter() - t
    if r.imatrix:
        m = re.search(r"loaded (\d+) importance matrix entries", log)
        if not m:
            raise RuntimeError("llama-quantize did not report loading the importance matrix")
        r.notes.append(f"{m.group(1)} imatrix entries loaded")


def slimkit_file(r: Row, base: Any, calib: Any, out: Path, made: dict[str, tuple[Any, str]]) -> None:
    """Quantize a copy of ``base`` with the row's config (once per config: ``made``) and export it."""
    import slimkit as sk
    from slimkit.export.gguf import export_gguf

    key = repr(r.config)
    if key in made:
        model, first = made[key]
        r.notes.append(f"the model of \"{first}\"")
    else:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        if r.config is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sk.quantize_(model, r.config, data=calib if r.config.needs_data else None)
        r.make_s = time.perf_counter() - t
        made[key] = (model, r.label)
    t = time.perf_counter()
    res = export_gguf(model, out, qtype=r.qtype, output_type=r.output_type, embedding_type=r.embedding_type)
    r.export_s = time.perf_counter() - t
    if r.config is not None:
        r.notes.append(f"{res.copied} layers' codes copied, {res.requantized} re-quantized")
    r.notes += [n.split("; quantize them")[0] for n in res.notes[:2]]


def describe_file(r: Row) -> None:
    r.file_bytes = r.path.stat().st_size
    r.types = pg.gguf_tensor_types(r.path).replace("×", "x")


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def llama_perplexity(path: Path, token_sets: dict[str, list[int]]) -> dict[str, float]:
    """Perplexity of each token set from llama.cpp's logits: windows of CTX tokens, NLL of tokens 2..CTX."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False)
    out = {}
    try:
        for name, ids in token_sets.items():
            nll, count = 0.0, 0
            for start in range(0, len(ids), CTX):
                win = ids[start:start + CTX]
                llm.reset()
                llm.eval(win)
                logits = np.asarray(llm.scores[: len(win) - 1], dtype=np.float64)
                top = logits.max(axis=1, keepdims=True)
                lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
                nll += float((lse - logits[np.arange(len(win) - 1), win[1:]]).sum())
                count += len(win) - 1
            out[name] = float(np.exp(nll / count))
    finally:
        llm.close()
    return out


def dequantized_blk(path: Path) -> dict[str, np.ndarray]:
    """Every 2-D ``blk.*`` weight of a GGUF file, dequantized to float32 (numpy (rows, cols))."""
    gguf = pg.import_gguf()
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path), "r")
    out = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            out[t.name] = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(
                int(t.shape[1]), int(t.shape[0]))
    return out


def weight_error(path: Path, ref: dict[str, np.ndarray]) -> float:
    deq = dequantized_blk(path)
    num = sum(float(((deq[n] - w) ** 2).sum()) for n, w in ref.items())
    den = sum(float((w ** 2).sum()) for w in ref.values())
    return num / den


def identical_blocks(a: Path, b: Path) -> dict[str, Any]:
    """Blocks byte-identical between two GGUF files, over the quantized tensors of one type in both.

    For Q4_0 also: among the blocks that differ, the share with the same fp16 scale, and the largest
    difference between two codes.
    """
    gguf = pg.import_gguf()
    ta = {t.name: t for t in gguf.GGUFReader(str(a), "r").tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b), "r").tensors}
    same = total = diff_blocks = diff_same_scale = max_code = 0
    differ = []
    for name, x in ta.items():
        y = tb.get(name)
        if y is None or y.tensor_type != x.tensor_type:
            differ.append(name)
            continue
        if x.tensor_type.name in ("F32", "F16"):
            continue
        _, type_size = gguf.GGML_QUANT_SIZES[x.tensor_type]
        bx = np.asarray(x.data).reshape(-1, type_size)
        by = np.asarray(y.data).reshape(-1, type_size)
        eq = (bx == by).all(axis=1)
        same += int(eq.sum())
        total += bx.shape[0]
        if x.tensor_type.name == "Q4_0" and not eq.all():
            dx, dy = bx[~eq], by[~eq]
            diff_blocks += dx.shape[0]
            diff_same_scale += int((dx[:, :2] == dy[:, :2]).all(axis=1).sum())

            def codes(q: np.ndarray) -> np.ndarray:
                return np.concatenate([q[:, 2:] & 0xF, q[:, 2:] >> 4], axis=1).astype(np.int16)

            max_code = max(max_code, int(np.abs(codes(dx) - codes(dy)).max()))
    return {"same": same, "total": total, "differ": differ,
            "same_scale": diff_same_scale / diff_blocks if diff_blocks else None, "max_code_diff": max_code}


def decode_speed(paths: dict[str, Path], prompt: list[int], new_tokens: int, runs: int) -> dict[str, list[float]]:
    """Decode tokens/s of each file, ``runs`` interleaved rounds (order reversed on odd rounds), one warm-up each."""
    runners = {k: pg.LlamaCppRunner(p, threads=THREADS, n_ctx=512, n_batch=256) for k, p in paths.items()}
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for r in runners.values():
        r.generate(prompt, 8)
    for i in range(runs):
        for k in (list(runners) if i % 2 == 0 else list(reversed(runners))):
            _, dec_s, new = runners[k].generate(prompt, new_tokens)
            rates[k].append((len(new) - 1) / dec_s)
    for r in runners.values():
        r.llm.close()
    return rates


def export_times(base: Any, work: Path) -> dict[str, float]:
    """Wall seconds of export_gguf on the float model, per type."""
    from slimkit.export.gguf import export_gguf
    from slimkit.export.gguf_blocks import GGUF_TYPES

    out = {}
    for qtype in GGUF_TYPES:
        t = time.perf_counter()
        export_gguf(base, work / f"p8-{qtype}.gguf", qtype=qtype)
        out[qtype] = time.perf_counter() - t
        (work / f"p8-{qtype}.gguf").unlink()
    return out


# ---------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------


def run(rows: list[Row], s: Settings, work: Path) -> dict[str, Any]:
    import slimkit as sk
    from slimkit.core.calibration import CalibrationData
    from slimkit.evaluation.suite import resolve_eval_data
    from slimkit.export.imatrix import collect_imatrix, gguf_names_for, write_imatrix
    from slimkit.zoo.corpus import load_split

    info: dict[str, Any] = {}
    base = sk.load(MODEL).eval()
    tok = sk.tokenizer_of(base)
    calib_texts = load_split("calibration")
    calib = CalibrationData.from_texts(calib_texts, tok, seq_len=CTX, n=s.n_calib)
    eval_ids = whole_windows([int(i) for i in resolve_eval_data(base, max_tokens=s.eval_tokens).token_ids.reshape(-1)],
                             s.eval_tokens)
    token_sets = {TEXTS[0]: eval_ids, TEXTS[1]: pip_token_ids(tok, s.pip_tokens)}
    info["tokens"] = {k: len(v) for k, v in token_sets.items()}
    info["prompt"] = eval_ids[: s.prompt_len]

    f32 = row(rows, "f32")
    print("  f32: sk.save + convert_hf_to_gguf.py", flush=True)

    def convert() -> None:
        sk.save(base, work / "hf")
        t = time.perf_counter()
        f32.path = pg.convert_to_gguf(work / "hf", work / "f32.gguf", "f32")
        f32.make_s = time.perf_counter() - t

    harness.guard(f32, "convert", convert)
    if f32.error:
        return info

    imatrices: dict[str, Path] = {}
    text_file = work / "calibration.txt"
    text_file.write_text("\n".join(calib_texts), encoding="utf-8")
    print("  llama-imatrix", flush=True)
    try:
        imatrices["llama"], info["llama_imatrix_s"] = llama_imatrix(f32.path, text_file, work / "llama.imatrix.gguf",
                                                                    s.imatrix_chunks)
    except Exception as exc:  # noqa: BLE001 - the rows that need it say why
        info["llama_imatrix_error"] = harness.why("llama-imatrix", exc)
    print("  slimkit imatrix", flush=True)
    try:
        t = time.perf_counter()
        stats = collect_imatrix(base, calib)
        imatrices["slimkit"] = write_imatrix(stats, work / "slimkit.imatrix.gguf", gguf_names_for(base),
                                             dataset=f"stdlib calibration split, {calib.description}")
        info["slimkit_imatrix_s"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001
        info["slimkit_imatrix_error"] = harness.why("slimkit imatrix", exc)

    made: dict[str, tuple[Any, str]] = {}  # quantized models by config, shared by rows exporting them differently
    for r in rows:
        if r is f32:
            continue
        print(f"  {r.label}", flush=True)
        out = work / f"{r.id}.gguf"
        if r.ftype is not None:
            if r.imatrix and r.imatrix not in imatrices:
                r.error = info.get(f"{r.imatrix}_imatrix_error", "no importance matrix")
                continue
            harness.guard(r, "llama-quantize", lambda r=r, out=out: llama_quantize(r, f32.path, out, imatrices))
        else:
            harness.guard(r, "quantize/export", lambda r=r, out=out: slimkit_file(r, base, calib, out, made))
        if not r.error:
            r.path = out
    for r in rows:
        if r.path is not None:
            describe_file(r)

    ref = dequantized_blk(f32.path)
    for r in rows:
        if r.path is None:
            continue
        print(f"  perplexity: {r.label}", flush=True)
        harness.guard(r, "perplexity", lambda r=r: r.ppl.update(llama_perplexity(r.path, token_sets)))
        if r is not f32:
            harness.guard(r, "weight error", lambda r=r: setattr(r, "weight_err", weight_error(r.path, ref)))

    pairs = {"q4_0": ("sk-rtn-q4_0", "lc-q4_0-pure"), "q4_k": ("sk-rtn-q4_k", "lc-q4_k-pure")}
    info["identical"] = {}
    for qtype, (a, b) in pairs.items():
        ra, rb = row(rows, a), row(rows, b)
        if ra.path and rb.path:
            info["identical"][qtype] = identical_blocks(ra.path, rb.path)

    speed_rows = [row(rows, k) for k in SPEED_ROWS]
    if all(r.path for r in speed_rows):
        print("  decode speed", flush=True)
        try:
            with harness.OtherLoad() as load:
                info["decode"] = decode_speed({r.id: r.path for r in speed_rows}, info["prompt"], s.new_tokens,
                                              s.decode_runs)
            info["decode_load"] = load.fraction
        except Exception as exc:  # noqa: BLE001
            info["decode_error"] = harness.why("decode", exc)
    print("  export times", flush=True)
    try:
        info["export_s"] = export_times(base, work)
    except Exception as exc:  # noqa: BLE001
        info["export_error"] = harness.why("export", exc)
    return info


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _ppl_cell(r: Row, f32: Row, text: str) -> str:
    if text not in r.ppl:
        return "—"
    base = f32.ppl.get(text)
    delta = "" if r is f32 or base is None else f" ({100 * (r.ppl[text] / base - 1):+.2f}%)"
    return f"{r.ppl[text]:.3f}{delta}"


def quality_table(rows: list[Row]) -> harness.Table:
    f32 = row(rows, "f32")
    t = harness.Table(["file", "bytes", "tensor types", f"ppl {TEXTS[0]} (Δ vs f32)", f"ppl {TEXTS[1]} (Δ vs f32)",
                       "weight error vs f32", "make s", "export s", "notes"], align="lrlrrrrrl")
    for r in rows:
        if r.error:
            t.add(r.label, "", "", r.error, "", "", "", "", "")
            continue
        t.add(r.label, f"{r.file_bytes:,}" if r.file_bytes else "—", r.types, _ppl_cell(r, f32, TEXTS[0]),
              _ppl_cell(r, f32, TEXTS[1]), f"{r.weight_err:.5f}" if r.weight_err is not None else "—",
              f"{r.make_s:.1f}" if r.make_s is not None else "—",
              f"{r.export_s:.2f}" if r.export_s is not None else "—", "; ".join(r.notes)[:200])
    return t


def gap_closed(rows: list[Row], slim: str, peer: str, text: str) -> float | None:
    f32, s, p = row(rows, "f32"), row(rows, slim), row(rows, peer)
    if any(text not in r.ppl for r in (f32, s, p)) or p.ppl[text] == f32.ppl[text]:
        return None
    return (p.ppl[text] - s.ppl[text]) / (p.ppl[text] - f32.ppl[text])


def target_lines(rows: list[Row], info: dict[str, Any]) -> list[str]:
    lines = []
    pairs = (("sk-gptq-q4_0", "lc-q4_0-pure", "llama.cpp Q4_0 --pure (every weight Q4_0)"),
             ("sk-gptq-q4_0-mix", "lc-q4_0", "llama.cpp's default Q4_0 mix (output Q6_K; slimkit's file exported "
                                             "with output_type q6_k)"))
    for text in TEXTS:
        for slim, peer, what in pairs:
            g = gap_closed(rows, slim, peer, text)
            sb, pb = row(rows, slim).file_bytes, row(rows, peer).file_bytes
            verdict = "no number" if g is None else ("met" if g >= GAP_TARGET else "MISSED")
            lines.append(f"- Q1 q4_0, {text}, against {what}: slimkit GPTQ closes "
                         f"{'—' if g is None else f'{100 * g:.0f}%'} of llama.cpp's gap to f32 "
                         f"({'same bytes' if sb == pb else f'{sb:,} vs {pb:,} bytes'}; target ≥ "
                         f"{100 * GAP_TARGET:.0f}%: {verdict}).")
        g = gap_closed(rows, "sk-gptq-q4_0", "lc-q4_0-pure-imx", text)
        if g is not None:
            lines.append(f"- Q1 q4_0, {text}, against llama.cpp's best q4_0 here (--pure with llama-imatrix, same "
                         f"bytes): slimkit GPTQ closes {100 * g:.0f}% of its gap to f32.")
    for text in TEXTS:
        f32, pure, mix = row(rows, "f32"), row(rows, "lc-q4_0-pure"), row(rows, "lc-q4_0")
        rb, gb = row(rows, "sk-rtn-q4_0-blocks"), row(rows, "sk-gptq-q4_0-blocks")
        if all(text in r.ppl for r in (f32, pure, mix, rb, gb)):
            gap = pure.ppl[text] - f32.ppl[text]
            out_share = (pure.ppl[text] - mix.ppl[text]) / gap
            blk_share = (rb.ppl[text] - f32.ppl[text]) / gap
            closed = gap_closed(rows, "sk-gptq-q4_0-blocks", "sk-rtn-q4_0-blocks", text)
            lines.append(f"- Where the q4_0 gap lies, {text}: of llama.cpp Q4_0 --pure's {gap:.3f} ppl, output.weight "
                         f"at Q4_0 rather than Q6_K accounts for {100 * out_share:.0f}%, the decoder blocks (RTN grid, "
                         f"token_embd and output F32) for {100 * blk_share:.0f}%, token_embd for the rest; GPTQ, "
                         "which quantizes the blocks only, closes "
                         f"{'—' if closed is None else f'{100 * closed:.0f}%'} of the blocks' own gap "
                         "(blocks-only files).")
    for text in TEXTS:
        s, p, q = row(rows, "sk-gptq-q4_k"), row(rows, "lc-q4_k-pure-imx"), row(rows, "lc-q4_k_s-imx")
        if text not in s.ppl or text not in p.ppl:
            lines.append(f"- Q1 q4_k, {text}: no number ({s.error or p.error}).")
            continue
        verdict = "met" if s.ppl[text] < p.ppl[text] else "MISSED"
        mix = (f"; llama.cpp Q4_K_S + imatrix (its default mix, {q.file_bytes:,} bytes vs {s.file_bytes:,}): "
               f"{q.ppl[text]:.3f}" if text in q.ppl and q.file_bytes and s.file_bytes else "")
        lines.append(f"- Q1 q4_k, {text}: slimkit GPTQ q4_k {s.ppl[text]:.3f} vs llama.cpp Q4_K --pure + imatrix "
                     f"{p.ppl[text]:.3f} (same types, same bytes; target: lower: {verdict}){mix}.")
    for qtype, check in info.get("identical", {}).items():
        a, b = ("RTN(grid=q4_0)", "Q4_0 --pure") if qtype == "q4_0" else ("RTN(grid=q4_k)", "Q4_K --pure")
        same, total = check["same"], check["total"]
        detail = ""
        if check.get("same_scale") is not None:
            detail = (f"; of the blocks that differ, {100 * check['same_scale']:.1f}% have the same fp16 scale and "
                      f"their codes differ by at most {check['max_code_diff']}")
        lines.append(f"- Grid check, {qtype}: slimkit {a} and llama.cpp {b} (no imatrix) share {same:,} of "
                     f"{total:,} quantized blocks byte for byte ({100 * same / max(total, 1):.2f}%){detail}"
                     + (f"; tensors of another type: {', '.join(check['differ'][:4])}" if check["differ"] else "")
                     + ".")
    dec = info.get("decode")
    if dec:
        med = {k: statistics.median(v) for k, v in dec.items()}
        n = len(next(iter(dec.values())))
        pairs2 = (("sk-gptq-q4_0", "lc-q4_0-pure", "all Q4_0"), ("sk-gptq-q4_0-mix", "lc-q4_0", "Q4_0 + output Q6_K"))
        best = {k: max(v) for k, v in dec.items()}
        parts = [f"{what}: slimkit {med[a]:.0f} vs llama.cpp {med[b]:.0f} tok/s (ratio {med[a] / med[b]:.2f}; fastest "
                 f"runs {best[a]:.0f} vs {best[b]:.0f}, ratio {best[a] / best[b]:.2f})"
                 for a, b, what in pairs2 if a in med and b in med]
        lines.append(f"- Q2 decode (llama-cpp-python, 2 threads, median of {n}; same tensor types, expected equal "
                     f"within noise): " + "; ".join(parts) + ". Runs (tok/s): "
                     + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in v) for k, v in dec.items())
                     + (f"; other processes took {100 * info['decode_load']:.0f}% of the CPUs meanwhile"
                        if info.get("decode_load") is not None else "") + ".")
    elif "decode_error" in info:
        lines.append(f"- Q2: {info['decode_error']}")
    ex = info.get("export_s")
    if ex:
        copies = [r.export_s for r in rows if r.family == "slimkit" and r.export_s is not None]
        worst = max([*ex.values(), *copies])
        lines.append("- P8 export_gguf wall time on stdlib-coder, float model: "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in ex.items())
                     + (f"; quantized models (codes copied): {min(copies):.2f}–{max(copies):.2f} s" if copies else "")
                     + f" (target ≤ {EXPORT_TARGET_S:.0f} s: {'met' if worst <= EXPORT_TARGET_S else 'MISSED'}).")
    elif "export_error" in info:
        lines.append(f"- P8: {info['export_error']}")
    return lines


def render(rows: list[Row], info: dict[str, Any], env: dict[str, Any], seconds: float) -> str:
    tokens = info.get("tokens", {})
    imx = [f"llama-imatrix {info['llama_imatrix_s']:.0f} s" if "llama_imatrix_s" in info else
           info.get("llama_imatrix_error", ""),
           f"slimkit collect+write {info['slimkit_imatrix_s']:.1f} s" if "slimkit_imatrix_s" in info else
           info.get("slimkit_imatrix_error", "")]
    return "\n".join([
        "## Q1/Q2/P8 — GGUF export of stdlib-coder: slimkit's quantizers vs llama.cpp's, measured in llama.cpp",
        "",
        f"The whole run took {seconds / 60:.1f} min. {harness.environment_line(env)}; llama-cpp-python "
        f"{pg.llama_cpp_version()} (llama.cpp vendored in its sdist; llama-quantize / llama-imatrix built from it).",
        "",
        *[re.sub(r"\s*\n(?!- )\s*", " ", part.strip()) + "\n" for part in __doc__.split("\n\n")[2:]],
        "Tokens evaluated: " + ", ".join(f"{k} {v:,}" for k, v in tokens.items())
        + f". Importance matrices: {'; '.join(x for x in imx if x)}.",
        "",
        quality_table(rows).to_markdown(),
        "",
        *target_lines(rows, info),
    ])


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = harness.bench_parser("bench_gguf", summary, quick="smoke test: few windows and tokens; never written")
    parser.add_argument("--keep-work", action="store_true", help="keep the folder of GGUF files")
    args = parser.parse_args(argv)
    harness.set_threads(THREADS)
    # GGUF files run in llama.cpp: slimkit's own int kernels are not what is measured, and probing them would
    # add their one-time measurement to the first quantized row's seconds
    os.environ["SLIMKIT_KERNELS"] = "reference"
    torch.manual_seed(0)
    s = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()
    rows = build_rows()
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        info = run(rows, s, work)
    finally:
        if args.keep_work:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    markdown = render(rows, info, env, time.perf_counter() - start)
    return harness.publish_rows(args, SECTION, rows, quality_table(rows).to_text(), markdown)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
