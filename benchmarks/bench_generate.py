"""G1/G3: LLM generation speed on CPU — slimkit (PyTorch eager, torch.compile, ONNX Runtime) beside its peers, one run.

    python -m benchmarks.bench_generate                  # full run (stdlib-coder, Llama 134M, Llama 853M); writes G1/G3
    python -m benchmarks.bench_generate --no-write       # full run, printed only
    python -m benchmarks.bench_generate --quick          # smoke test: tiny model + stdlib-coder, few tokens; never written
    python -m benchmarks.bench_generate --models 120m --rows 'eager-*,llamacpp-*'   # a subset

Models: ``stdlib-coder`` from the zoo (``sk.load``); random-init ``LlamaForCausalLM`` from a config with
seed 0 — ``120m`` (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000, untied: 134M
parameters, P9's config) and ``1b`` (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 5632,
vocab 32000, untied: 853M parameters, the config of the llama.cpp numbers in the shared notes) —
saved once with ``save_pretrained`` under /work/bench-tools/gen-models so every runtime reads the
same weights. Random models: speed and memory only, never quality.

Measured per row (protocol of the shared BENCHMARKS.md: 2 threads everywhere): decode tokens/s with a
KV cache at batch 1 (128 new greedy tokens after a 128-token prompt; tokens/s over the 127 one-token
steps after the first), prefill latency at batch 1 × 256 (the step over the prompt up to the first
token's logits), peak RSS while generating (VmHWM reset after loading, quantizing and warm-up), and
the memory-bandwidth bound: measured copy bandwidth (read + write bytes of a 1 GiB numpy copy, the
best of 1 and 2 threads, at the start and at the end of the run) ÷ bytes of weights one decode step
reads (every weight but the embedding table; KV-cache reads left out). Every row runs in its own
process (clean peak RSS, no compile or allocator state carried over; ORT rows quantize and export in
one more); rows of a model run one after another, so ratios to fp32 eager are taken in the same run
but not interleaved — the fp32 eager row runs again at the end of each model (full runs) and the
ratios divide by the faster of its two runs. Timed decode runs per row: as many as fit 40 s (1–3;
a row too slow for one run of 128 tokens in 80 s times fewer tokens and says so).

Setup that is not measured: model folders and GGUF files are written once and reused by later runs
(keyed by the config and the safetensors' size and mtime); within a run, each slimkit quantized
kind is made once per model (``sk.save``) and loaded by the other rows that need it (``sk.load``).

Rows (ids for ``--rows``; shell-style patterns, comma separated):
- ``eager-fp32`` (the baseline), ``eager-int8`` (``sk.RTN(bits=8)``), ``eager-int4`` (``sk.RTN(bits=4,
  group_size=128)``), ``eager-gptq4`` (stdlib-coder only: ``sk.GPTQ(bits=4, group_size=128)`` on the
  decoder blocks + RTN int4 g128 on lm_head; 32 windows of 256 tokens of the stdlib calibration split):
  PyTorch eager through ``sk.generate`` (a local ``decode_loop`` + DynamicCache step where
  ``sk.generate`` does not exist yet);
- ``compile-fp32/int8/int4``: the same models, decode steps through ``torch.compile(model.forward)``
  (inductor, dynamic=False) with a transformers ``StaticCache`` (what HF ``generate`` does with
  ``cache_implementation="static"``; prefill runs eager, as HF's does); on ``--compile-models`` only;
- ``ort-fp32/int8/int4``: ``slimkit.export.onnx_decoder.export_decoder_onnx`` then
  ``OrtDecoder(path, threads=2).generate`` (rows say "not yet available" until that module exists);
- peers: ``torchao-int8`` (``Int8WeightOnlyConfig``), ``torchao-int4`` (``PrototypeInt4WeightOnlyConfig``,
  torchao 0.18's CPU int4 layout, bf16), each eager and ``-compile`` (static cache, as above);
  ``ort-peer-int4`` (``MatMulNBitsQuantizer`` block 128, accuracy_level 4, on slimkit's fp32 with-past
  graph, run by ``OrtDecoder``); ``llamacpp-f32/f16/q8_0/q4_0`` (llama-cpp-python; files from llama.cpp's
  own ``convert_hf_to_gguf.py`` and quantizer, cached under /work/bench-tools/gguf; same prompt ids);
- ``slimkit-gguf-q8_0/q4_0``: slimkit's weights on llama.cpp's block grid, written by ``export_gguf`` and run by
  llama-cpp-python like the llamacpp rows: ``sk.GPTQ(grid=...)`` on stdlib-coder (32 windows of 256 calibration
  tokens), ``sk.RTN(grid=...)`` on the random models (GPTQ's file would have the same types, hence the same
  speed); the tensor types of llama.cpp's own file of that type (Q4_0: output.weight Q6_K); random models take
  llama.cpp's llama-spm vocabulary (``vocab_from``). Made in a process of its own, as the ORT rows' files.
All rows pick tokens greedily from the last position's logits and never stop at EOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import peers_generate as pg

SECTION = "G1-G3-generation"
THREADS = 2
GROUP = 128
MODELS_DIR = pg.BENCH_TOOLS / "gen-models"
GGUF_DIR = pg.BENCH_TOOLS / "gguf"
WORK_ROOT = pg.BENCH_TOOLS / "gen-work"

# G1 / G3 targets (BENCHMARKS.md)
G1_INT4 = 3.0
G1_INT8 = 1.8
G1_BOUND = 0.5  # within 2x of the bandwidth bound
G3_PREFILL = 1.1


# ---------------------------------------------------------------------------------------
# Settings, models, rows
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    prompt_len: int  # decode prompt
    new_tokens: int
    prefill_len: int
    warm_tokens: int
    decode_budget_s: float  # timed decode runs per row: as many as fit (1..max_runs)
    max_runs: int
    prefill_budget_s: float
    max_prefill_runs: int
    row_timeout_s: float
    again: bool  # re-run fp32 eager at the end of each model


FULL = Settings(prompt_len=128, new_tokens=128, prefill_len=256, warm_tokens=8, decode_budget_s=40, max_runs=3,
                prefill_budget_s=15, max_prefill_runs=5, row_timeout_s=1200, again=True)
QUICK = Settings(prompt_len=32, new_tokens=16, prefill_len=64, warm_tokens=4, decode_budget_s=6, max_runs=1,
                 prefill_budget_s=3, max_prefill_runs=2, row_timeout_s=600, again=False)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    config: dict[str, Any] | None  # LlamaConfig fields; None: the zoo's stdlib-coder


_LLAMA = {"max_position_embeddings": 1024, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
MODELS = {
    "tiny": ModelSpec("tiny", "random Llama tiny (smoke test)",
                      dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=512, vocab_size=32000, **_LLAMA)),
    "coder": ModelSpec("coder", "stdlib-coder (zoo)", None),
    "120m": ModelSpec("120m", "random Llama 134M",
                      dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                           intermediate_size=2048, vocab_size=32000, **_LLAMA)),
    "1b": ModelSpec("1b", "random Llama 853M (~1B)",
                    dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=5632, vocab_size=32000, **_LLAMA)),
}


@dataclass(frozen=True)
class RowSpec:
    id: str
    label: str
    family: str  # "fp32" (the baseline), "slimkit", "reference" (other fp32 runtimes) or "peer"
    runtime: str
    bits: int  # 32, 16, 8, 4


ROWS = [
    RowSpec("eager-fp32", "fp32, PyTorch eager (baseline)", "fp32", "pytorch eager", 32),
    RowSpec("eager-int8", "slimkit RTN int8 per-channel, PyTorch eager", "slimkit", "pytorch eager", 8),
    RowSpec("eager-int4", f"slimkit RTN int4 g{GROUP}, PyTorch eager", "slimkit", "pytorch eager", 4),
    RowSpec("eager-gptq4", f"slimkit GPTQ int4 g{GROUP} (+RTN lm_head), PyTorch eager", "slimkit", "pytorch eager", 4),
    RowSpec("compile-fp32", "fp32, torch.compile + static cache", "reference", "torch.compile", 32),
    RowSpec("compile-int8", "slimkit RTN int8, torch.compile + static cache", "slimkit", "torch.compile", 8),
    RowSpec("compile-int4", f"slimkit RTN int4 g{GROUP}, torch.compile + static cache", "slimkit", "torch.compile", 4),
    RowSpec("ort-fp32", "fp32, ONNX Runtime (slimkit export_decoder_onnx)", "slimkit", "onnxruntime", 32),
    RowSpec("ort-int8", "slimkit RTN int8, ONNX Runtime", "slimkit", "onnxruntime", 8),
    RowSpec("ort-int4", f"slimkit RTN int4 g{GROUP}, ONNX Runtime", "slimkit", "onnxruntime", 4),
    RowSpec("ort-peer-int4", f"ORT MatMulNBitsQuantizer int4 block {GROUP}, acc. level 4", "peer", "onnxruntime", 4),
    RowSpec("torchao-int8", "torchao Int8WeightOnlyConfig, eager", "peer", "pytorch eager", 8),
    RowSpec("torchao-int4", f"torchao int4 g{GROUP} CPU layout (bf16), eager", "peer", "pytorch eager", 4),
    RowSpec("torchao-int8-compile", "torchao Int8WeightOnlyConfig, torch.compile + static cache", "peer",
            "torch.compile", 8),
    RowSpec("torchao-int4-compile", f"torchao int4 g{GROUP} CPU layout (bf16), torch.compile + static cache", "peer",
            "torch.compile", 4),
    RowSpec("llamacpp-f32", "llama.cpp f32", "peer", "llama.cpp", 32),
    RowSpec("llamacpp-f16", "llama.cpp f16", "peer", "llama.cpp", 16),
    RowSpec("llamacpp-q8_0", "llama.cpp Q8_0", "peer", "llama.cpp", 8),
    RowSpec("llamacpp-q4_0", "llama.cpp Q4_0", "peer", "llama.cpp", 4),
    RowSpec("slimkit-gguf-q8_0", "slimkit GPTQ→GGUF q8_0 (llama.cpp; RTN grid on random models)", "slimkit",
            "llama.cpp", 8),
    RowSpec("slimkit-gguf-q4_0", "slimkit GPTQ→GGUF q4_0 + output q6_k (llama.cpp; RTN grid on random models)",
            "slimkit", "llama.cpp", 4),
    RowSpec("eager-fp32-again", "fp32, PyTorch eager, again at the end (drift check)", "reference", "pytorch eager", 32),
]
ROW_BY_ID = {r.id: r for r in ROWS}
GGUF_ROWS = ("llamacpp-", "slimkit-gguf-")  # rows run by llama-cpp-python
COMPILE_ROWS = {"compile-fp32", "compile-int8", "compile-int4", "torchao-int8-compile", "torchao-int4-compile"}


@dataclass
class Result:
    """What one row measured (filled by its worker process), or why it has no numbers."""

    model: str
    row: str
    label: str
    family: str
    runtime: str
    bits: int
    error: str | None = None
    skipped: str | None = None  # not an error: e.g. a runtime not written yet
    setup_s: float | None = None
    decode_tok_s: float | None = None
    decode_runs: list[float] = field(default_factory=list)
    decode_tokens: int | None = None
    prefill_ms: float | None = None
    prefill_runs: list[float] = field(default_factory=list)
    peak_rss: int | None = None
    weight_bytes: int | None = None
    new_ids: list[int] = field(default_factory=list)
    what: str | None = None
    notes: list[str] = field(default_factory=list)
    wall_s: float | None = None
    other_load: float | None = None


def wanted_rows(model: str, patterns: list[str] | None, compile_models: set[str],
                s: Settings) -> list[tuple[RowSpec, str | None]]:
    """The rows to run on ``model``, each with None or the reason it is listed but not run."""
    out: list[tuple[RowSpec, str | None]] = []
    for r in ROWS:
        if r.id == "eager-gptq4" and model != "coder":
            continue  # GPTQ on random weights: meaningless for quality, and RTN gives the same speed
        if r.id == "eager-fp32-again" and not s.again:
            continue
        if patterns and r.id != "eager-fp32" and not any(fnmatch.fnmatch(r.id, p) for p in patterns):
            continue
        skip = None
        if r.id in COMPILE_ROWS and model not in compile_models:
            skip = (f"skipped: torch.compile rows ran on {', '.join(sorted(compile_models)) or 'no model'} only "
                    "(compiling costs minutes per row on 2 cores; --compile-models adds models)")
        out.append((r, skip))
    return out


# ---------------------------------------------------------------------------------------
# Model folders, prompts, GGUF files (parent process)
# ---------------------------------------------------------------------------------------


def _folder_stamp(folder: Path) -> list[list[Any]]:
    return sorted([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.glob("*.safetensors")])


def model_folder(spec: ModelSpec) -> Path:
    """An HF folder of the model (config, safetensors; tokenizer for stdlib-coder), written once under bench-tools."""
    folder = MODELS_DIR / spec.key
    marker = folder / "slimkit-bench.json"
    want = {"config": spec.config, "seed": 0}
    if marker.exists() and json.loads(marker.read_text())["want"] == want:
        return folder
    import torch
    import transformers as tf

    import slimkit as sk

    print(f"  writing {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.config is None:
        model = sk.load("stdlib-coder")
        model.save_pretrained(folder)
        sk.tokenizer_of(model).save_pretrained(folder)
    else:
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**spec.config)).eval()
        model.save_pretrained(folder)
    del model
    marker.write_text(json.dumps({"want": want, "stamp": _folder_stamp(folder)}))
    return folder


def prompt_ids(spec: ModelSpec, n: int) -> list[int]:
    """``n`` prompt token ids: the start of the stdlib eval split for stdlib-coder, seeded random ids otherwise."""
    import torch

    if spec.config is None:
        import slimkit as sk
        from slimkit.zoo.corpus import load_split

        tok = sk.tokenizer_of(sk.load("stdlib-coder"))
        text = "\n".join(load_split("eval"))[: 40 * n]
        ids = tok(text)["input_ids"][:n]
        if len(ids) < n:
            raise RuntimeError(f"the eval split gave {len(ids)} tokens, {n} wanted")
        return [int(i) for i in ids]
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, spec.config["vocab_size"], (n,), generator=g).tolist()


def gguf_file(spec: ModelSpec, kind: str, log: list[str]) -> Path:
    """The model's GGUF file of ``kind`` (f32, f16 by llama.cpp's converter; q8_0, q4_0 by its quantizer), cached."""
    folder = model_folder(spec)
    stamp = json.loads((folder / "slimkit-bench.json").read_text())["stamp"]
    out_dir = GGUF_DIR / spec.key
    out = out_dir / f"{spec.key}-{kind}.gguf"
    marker = out_dir / f"{kind}.json"
    if out.exists() and marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    t = time.perf_counter()
    if kind in ("f32", "f16"):
        print(f"  convert_hf_to_gguf.py --outtype {kind} ({spec.key})", flush=True)
        pg.convert_to_gguf(folder, out, kind)
    else:
        src = gguf_file(spec, "f32", log)
        print(f"  llama_model_quantize {kind} ({spec.key})", flush=True)
        pg.quantize_gguf(src, out, kind, threads=THREADS)
    marker.write_text(json.dumps(stamp))
    log.append(f"{spec.key} {kind}: {time.perf_counter() - t:.0f} s")
    return out


# ---------------------------------------------------------------------------------------
# Runners (worker process): generate(prompt ids, new tokens) -> (prefill s, decode s, new ids)
# ---------------------------------------------------------------------------------------


def _greedy_kwargs(fn: Any) -> dict[str, Any]:
    """Keyword arguments that make ``fn`` (sk.generate, OrtDecoder.generate) greedy and never stop at EOS."""
    import inspect

    from slimkit.tasks.generation import GREEDY, Sampling

    params = inspect.signature(fn).parameters
    if "sampling" in params and any(f.name == "stop_at_eos" for f in dataclasses.fields(Sampling)):
        return {"sampling": Sampling(stop_at_eos=False)}
    kw: dict[str, Any] = {"sampling": GREEDY} if "sampling" in params else {}
    if "stop_at_eos" in params:
        kw["stop_at_eos"] = False
    return kw


def _cache_kwarg(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TorchEager:
    """A PyTorch model, eager: ``sk.generate`` (slimkit rows, if it exists) or ``decode_loop`` + DynamicCache."""

    def __init__(self, model: Any, use_sk_generate: bool) -> None:
        import slimkit as sk

        self.model = model
        self.sk_generate = getattr(sk, "generate", None) if use_sk_generate else None
        self.kw = _greedy_kwargs(self.sk_generate) if self.sk_generate else {}
        self.cache_kw = _cache_kwarg(model)
        self.how = "sk.generate" if self.sk_generate else "decode_loop + DynamicCache (HF forward)"

    def _step(self, ids: Any, cache: Any) -> tuple[Any, Any]:
        import torch
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache})
        return out.logits, cache

    def generate(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        import torch

        from slimkit.tasks.generation import decode_loop

        prompt = torch.tensor([ids], dtype=torch.long)
        if self.sk_generate is not None:
            r = self.sk_generate(self.model, prompt, max_new_tokens=n, **self.kw)
        else:
            r = decode_loop(self._step, prompt, n, runtime="pytorch eager", threads=torch.get_num_threads())
        return r.prefill_s, r.decode_s, r.new_ids[0].tolist()


class TorchCompiled(TorchEager):
    """Decode steps through ``torch.compile(model.forward)`` with a StaticCache; prefill eager (as HF generate does)."""

    def __init__(self, model: Any, max_len: int) -> None:
        import torch
        from transformers import StaticCache

        super().__init__(model, use_sk_generate=False)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compiled = torch.compile(model.forward, dynamic=False, fullgraph=False)
        self.how = "decode_loop + StaticCache, torch.compile(model.forward) on one-token steps"

    def _step(self, ids: Any, state: Any) -> tuple[Any, Any]:
        import torch

        n = ids.shape[1]
        fwd = self.compiled if n == 1 else self.model.forward
        with torch.inference_mode():  # the cache's tensors are made in inference mode: reset them there too
            if state is None:
                self.cache.reset()
                state = 0
            out = fwd(input_ids=ids, cache_position=torch.arange(state, state + n), use_cache=True,
                      **{self.cache_kw: self.cache})
        return out.logits, state + n


class OrtRunner:
    def __init__(self, path: Path) -> None:
        from slimkit.export.onnx_decoder import OrtDecoder

        self.decoder = OrtDecoder(path, threads=THREADS)
        self.kw = _greedy_kwargs(self.decoder.generate)
        self.how = "slimkit OrtDecoder.generate"

    def generate(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        import torch

        r = self.decoder.generate(torch.tensor([ids], dtype=torch.long), n, **self.kw)
        new = r.new_ids[0].tolist() if hasattr(r.new_ids, "tolist") and r.new_ids.dim() == 2 else list(r.new_ids)
        return r.prefill_s, r.decode_s, new


class LlamaCppRow:
    def __init__(self, path: Path, n_ctx: int, n_batch: int) -> None:
        self.runner = pg.LlamaCppRunner(path, threads=THREADS, n_ctx=n_ctx, n_batch=n_batch)
        self.how = f"llama-cpp-python {pg.llama_cpp_version()}: Llama.eval + argmax"

    def generate(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        return self.runner.generate(ids, n)


def _load_torch(spec: dict[str, Any]) -> Any:
    import torch

    if spec["model"] == "coder":
        import slimkit as sk

        return sk.load("stdlib-coder").eval()
    import transformers as tf

    return tf.LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()


def _model_of_kind(spec: dict[str, Any], kind: str) -> tuple[Any, str]:
    """The fp32 model, or slimkit's ``kind`` of it: saved (``sk.save``) in the run's work folder by the first row that
    makes it and loaded (``sk.load``) by the next rows of the model, so a model is quantized once per kind."""
    import slimkit as sk

    if kind == "fp32":
        return _load_torch(spec), "fp32"
    folder = Path(spec["work"]) / f"sk-{kind}"
    done = folder / "bench-what.txt"
    if done.exists():
        return sk.load(folder).eval(), done.read_text() + " (quantized by an earlier row: sk.save, then sk.load here)"
    model, what = _slimkit_quantize(_load_torch(spec), kind)
    with contextlib.suppress(Exception):  # a model sk.save refuses is simply quantized again by the next row
        sk.save(model, folder)
        done.write_text(what)
    return model, what


def _slimkit_quantize(model: Any, kind: str) -> tuple[Any, str]:
    import slimkit as sk

    if kind == "int8":
        return sk.quantize_(model, sk.RTN(bits=8)), "sk.RTN(bits=8)"
    if kind == "int4":
        return sk.quantize_(model, sk.RTN(bits=4, group_size=GROUP)), f"sk.RTN(bits=4, group_size={GROUP})"
    if kind == "gptq4":
        from slimkit.zoo.corpus import load_split

        calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model), seq_len=256, n=32)
        model = sk.quantize_(model, sk.GPTQ(bits=4, group_size=GROUP), data=calib)
        model = sk.quantize_(model, sk.RTN(bits=4, group_size=GROUP, include=("lm_head",)))
        return model, f"sk.GPTQ(bits=4, group_size={GROUP}) on 32×256 calibration tokens + RTN int4 lm_head"
    raise ValueError(kind)


class NotYetAvailable(Exception):
    """A runtime slimkit does not have yet: the row is skipped, not failed."""


def _onnx_decoder_api() -> tuple[Any, Any]:
    try:
        from slimkit.export.onnx_decoder import OrtDecoder, export_decoder_onnx
    except ImportError as exc:
        raise NotYetAvailable(f"not yet available: slimkit.export.onnx_decoder ({exc})") from exc
    return export_decoder_onnx, OrtDecoder


def _onnx_path(folder: Path) -> Path:
    onnx = sorted(folder.glob("*.onnx"))
    if not onnx:
        raise FileNotFoundError(f"no .onnx file in {folder}")
    return onnx[0]


def build_runner(spec: dict[str, Any]) -> tuple[Any, int | None, str]:
    """The row's runner, bytes of weights read per decode step, and what was built (worker process)."""
    row = spec["row"]
    max_len = spec["prefill_len"] + spec["new_tokens"] + 8
    if row.startswith(GGUF_ROWS):
        path = Path(spec["gguf"] if row.startswith("llamacpp-") else spec["artifact"])
        r = LlamaCppRow(path, n_ctx=max(512, max_len), n_batch=spec["prefill_len"])
        made = "" if row.startswith("llamacpp-") else spec["export_what"] + " → "
        return r, pg.gguf_weight_bytes_per_token(path), f"{made}{path.name}: {pg.gguf_tensor_types(path)}"
    if row.startswith("ort-"):
        _onnx_decoder_api()
        path = Path(spec["artifact"])
        return OrtRunner(path), pg.onnx_weight_bytes_per_token(path), spec["export_what"]
    # PyTorch rows
    kind = row.split("-")[1]  # fp32 / int8 / int4 / gptq4
    if row.startswith("torchao-"):
        model, what = pg.torchao_quantize(_load_torch(spec), 8 if kind == "int8" else 4)
    else:
        model, what = _model_of_kind(spec, kind)
    weight_bytes = pg.torch_weight_bytes_per_token(model)
    if row.startswith("compile-") or row.endswith("-compile"):
        return TorchCompiled(model, max_len), weight_bytes, what
    return TorchEager(model, use_sk_generate=not row.startswith("torchao-")), weight_bytes, what


def build_onnx(spec: dict[str, Any]) -> tuple[Path, str]:
    """The ORT row's decoder-with-past file (export phase, a process of its own so the run phase's RSS is clean)."""
    export_decoder_onnx, _ = _onnx_decoder_api()
    row, work = spec["row"], Path(spec["work"])
    fp32_dir = work / "ort-fp32"
    if row == "ort-peer-int4":
        if not fp32_dir.exists() or not list(fp32_dir.glob("*.onnx")):
            fp32_dir.mkdir(parents=True, exist_ok=True)
            export_decoder_onnx(_load_torch(spec), fp32_dir / "model.onnx")
        dst = work / "ort-peer-int4" / "model.onnx"
        pg.ort_int4_quantize(_onnx_path(fp32_dir), dst, block_size=GROUP, accuracy_level=4)
        return dst, f"MatMulNBitsQuantizer(block_size={GROUP}, accuracy_level=4) on slimkit's fp32 with-past graph"
    model, what = _model_of_kind(spec, row.split("-", 1)[1])
    dst = work / row / "model.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    export_decoder_onnx(model, dst)
    return _onnx_path(dst.parent), what + " → export_decoder_onnx"


def build_gguf(spec: dict[str, Any]) -> tuple[Path, str]:
    """A slimkit-gguf row's file (export phase): the model on the row's GGUF grid, written with the tensor types of
    llama.cpp's own file of that type (its Q4_0 keeps output.weight at Q6_K)."""
    import slimkit as sk
    from slimkit.export.gguf import export_gguf

    qtype = spec["row"].rsplit("-", 1)[1]
    model = _load_torch(spec)
    vocab = None
    if spec["model"] == "coder":
        from slimkit.zoo.corpus import load_split

        calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model), seq_len=256, n=32)
        sk.quantize_(model, sk.GPTQ(grid=qtype), data=calib)
        what = f"sk.GPTQ(grid={qtype!r}) on 32×256 calibration tokens"
    else:
        sk.quantize_(model, sk.RTN(grid=qtype))
        what = f"sk.RTN(grid={qtype!r}) (random weights: GPTQ would give the same types, hence the same speed)"
        root = pg.llama_cpp_dir()
        vocab = None if root is None else root / "models" / "ggml-vocab-llama-spm.gguf"
    output_type = "q6_k" if qtype == "q4_0" else None
    dst = Path(spec["work"]) / spec["row"] / "model.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    res = export_gguf(model, dst, qtype=qtype, vocab_from=vocab, output_type=output_type)
    return dst, (f"{what}, export_gguf(qtype={qtype!r}" + (f", output_type={output_type!r}" if output_type else "")
                 + f") in {res.seconds:.1f} s")


def run_worker(spec_path: Path) -> int:
    """One row in this process: build, warm up, time decode and prefill, write the result JSON."""
    spec = json.loads(spec_path.read_text())
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[key] = str(THREADS)
    if spec.get("phase") == "export" or not spec["row"].startswith(GGUF_ROWS):
        # llama.cpp rows never import torch when they run: its pages would count in RSS
        import torch

        torch.set_num_threads(THREADS)

    out: dict[str, Any] = {"notes": []}
    result_path = Path(spec["result"])

    def save() -> None:
        pg.json_dump(out, result_path)

    if spec.get("phase") == "export":
        try:
            t = time.perf_counter()
            path, what = build_gguf(spec) if spec["row"].startswith("slimkit-gguf-") else build_onnx(spec)
            out.update(artifact=str(path), export_what=what, export_s=time.perf_counter() - t)
        except NotYetAvailable as exc:
            out["skipped"] = str(exc)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc(limit=6, file=sys.stderr)
            out["error"] = _short(exc, "export")
        save()
        return 0
    try:
        t = time.perf_counter()
        runner, weight_bytes, what = build_runner(spec)
        out.update(setup_s=time.perf_counter() - t, weight_bytes=weight_bytes, what=f"{what}; {runner.how}")
        save()
        ids = spec["prompt"]
        p_dec, p_pre = ids[: spec["prompt_len"]], ids[: spec["prefill_len"]]
        with pg.OtherLoad() as load:
            # warm-up: a short generation (compiles the decode step where compiled) and one long prefill
            runner.generate(p_dec, spec["warm_tokens"])
            pre_s, _, _ = runner.generate(p_pre, 1)
            pg.reset_peak_rss()
            # speed probe -> how many timed runs (and tokens) fit the row's budget
            k = spec["warm_tokens"] + 1
            _, dec_s, _ = runner.generate(p_dec, k)
            rate = (k - 1) / dec_s
            n = spec["new_tokens"]
            one_run = (n - 1) / rate
            if one_run > 2 * spec["decode_budget_s"]:
                n = max(17, int(2 * spec["decode_budget_s"] * rate) + 1)
                out["notes"].append(f"slow row: decode timed over {n} new tokens, not {spec['new_tokens']}")
                one_run = (n - 1) / rate
            runs = max(1, min(spec["max_runs"], int(spec["decode_budget_s"] // max(one_run, 1e-9))))
            rates, first_ids = [], None
            for _ in range(runs):
                _, dec_s, new = runner.generate(p_dec, n)
                rates.append((len(new) - 1) / dec_s)
                first_ids = first_ids or new
            out.update(decode_runs=rates, decode_tok_s=statistics.median(rates), decode_tokens=len(first_ids),
                       new_ids=first_ids)
            save()
            k_pre = max(2, min(spec["max_prefill_runs"], int(spec["prefill_budget_s"] // max(pre_s, 1e-9))))
            pres = [runner.generate(p_pre, 1)[0] * 1000 for _ in range(k_pre)]
            out.update(prefill_runs=pres, prefill_ms=statistics.median(pres), peak_rss=pg.peak_rss_bytes())
        out["other_load"] = load.fraction
    except NotYetAvailable as exc:
        out["skipped"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run is a result
        import traceback

        traceback.print_exc(limit=6, file=sys.stderr)
        out["error"] = _short(exc, "row")
    save()
    return 0


# ---------------------------------------------------------------------------------------
# Parent: run rows, tables
# ---------------------------------------------------------------------------------------


def run_row(model: ModelSpec, row: RowSpec, s: Settings, prompt: list[int], work: Path, gguf_log: list[str]) -> Result:
    res = Result(model=model.key, row=row.id, label=row.label, family=row.family, runtime=row.runtime, bits=row.bits)
    spec: dict[str, Any] = {"model": model.key, "row": row.id, "prompt": prompt, "work": str(work),
                            "result": str(work / f"{row.id}.result.json"), **dataclasses.asdict(s)}
    t0 = time.perf_counter()
    try:
        spec["hf_dir"] = str(model_folder(model))
        if row.id.startswith("llamacpp-"):
            import llama_cpp  # noqa: F401  (the peer must import before files are made for it)

            spec["gguf"] = str(gguf_file(model, row.id.split("-", 1)[1], gguf_log))
    except Exception as exc:  # noqa: BLE001
        res.error = _short(exc, "preparing")
        print(f"  {row.id} ...", end="", flush=True)
        return res
    print(f"  {row.id} ...", end="", flush=True)
    if row.id == "eager-fp32-again":
        spec["row"] = "eager-fp32"  # the same worker; its own result file
    root = str(Path(__file__).resolve().parent.parent)

    def spawn(phase: str, spec: dict[str, Any]) -> Any:
        spec_path = work / f"{row.id}.{phase}.spec.json"
        pg.json_dump(spec, spec_path)
        cmd = [sys.executable, "-m", "benchmarks.bench_generate", "--worker", str(spec_path)]
        try:
            with open(work / f"{row.id}.{phase}.log", "w") as log:
                return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=s.row_timeout_s,
                                      cwd=root, check=False).returncode
        except subprocess.TimeoutExpired:
            return "timeout"

    log_path = work / f"{row.id}.run.log"
    export_s = 0.0
    if row.id.startswith(("ort-", "slimkit-gguf-")):
        exp = dict(spec, phase="export", result=str(work / f"{row.id}.export.json"))
        rc = spawn("export", exp)
        done = json.loads(Path(exp["result"]).read_text()) if Path(exp["result"]).exists() else {}
        if rc != 0 or "artifact" not in done:
            res.wall_s = time.perf_counter() - t0
            res.skipped = done.get("skipped")
            if not res.skipped:
                tail = (work / f"{row.id}.export.log").read_text(errors="replace").strip().splitlines()[-2:]
                res.error = done.get("error") or (f"export timed out after {s.row_timeout_s:.0f} s" if rc == "timeout"
                                                  else f"export worker exit {rc}: {' / '.join(tail)[:240]}")
            return res
        spec.update(artifact=done["artifact"], export_what=done["export_what"])
        export_s = done["export_s"]
    rc = spawn("run", spec)
    res.wall_s = time.perf_counter() - t0
    data: dict[str, Any] = {}
    if Path(spec["result"]).exists():
        data = json.loads(Path(spec["result"]).read_text())
    for key, value in data.items():
        if hasattr(res, key) and key not in ("row", "label", "family", "runtime", "bits", "model"):
            setattr(res, key, value)
    if export_s and res.setup_s is not None:
        res.setup_s += export_s
        res.notes.append(f"setup includes {export_s:.0f} s of quantizing/exporting in a process of its own")
    if rc == "timeout":
        res.error = res.error or f"timed out after {s.row_timeout_s:.0f} s (partial numbers kept)"
    elif rc != 0 and not res.error:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-2:]
        res.error = f"worker exit {rc}: {' / '.join(tail)[:240]}"
    elif res.decode_tok_s is None and not res.error and not res.skipped:
        res.error = "worker wrote no numbers"
    return res


def _short(exc: BaseException, stage: str) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{stage} failed: {type(exc).__name__}: {first}"


def _mb(n: int | None) -> str | None:
    return None if n is None else f"{n / 1e6:,.0f}"


@dataclass
class Baseline:
    """fp32 eager's numbers the ratios divide by: the faster of its two runs (start and end of the model's rows)."""

    decode_tok_s: float
    prefill_ms: float | None
    new_ids: list[int]


def baseline(results: list[Result]) -> Baseline | None:
    runs = [r for r in results if r.row in ("eager-fp32", "eager-fp32-again") and r.decode_tok_s]
    if not runs:
        return None
    first = next((r for r in runs if r.row == "eager-fp32"), runs[0])
    prefills = [r.prefill_ms for r in runs if r.prefill_ms]
    return Baseline(max(r.decode_tok_s for r in runs), min(prefills) if prefills else None, first.new_ids)


def model_table(results: list[Result], bw: float, prefill_len: int) -> Any:
    from benchmarks import harness

    base = baseline(results)
    ref_ids = base.new_ids[:32] if base else []
    t = harness.Table(["row", "decode tok/s", "× fp32 eager", "bound tok/s", "% of bound", f"prefill 1×{prefill_len} ms",
                       "× fp32 prefill", "peak RSS MB", "weights MB/token", "tokens = fp32 before the first difference",
                       "setup s", "what ran / notes"], align="lrrrrrrrrrrl")
    for r in results:
        if r.error or r.skipped:
            t.add(r.label, f"**{'not run' if r.skipped else 'could not run'}** — {r.skipped or r.error}",
                  *([None] * 10))
            continue
        bound = bw / r.weight_bytes if r.weight_bytes else None
        same = None
        if ref_ids and r.new_ids:
            prefix = next((i for i, (a, b) in enumerate(zip(ref_ids, r.new_ids)) if a != b),
                          min(len(ref_ids), len(r.new_ids)))
            same = f"{prefix}/{min(32, len(r.new_ids))}"
        spread = f" ({min(r.decode_runs):.1f}–{max(r.decode_runs):.1f}, {len(r.decode_runs)} runs)" if len(
            r.decode_runs) > 1 else " (1 run)"
        t.add(r.label,
              f"{r.decode_tok_s:.2f}{spread}" if r.decode_tok_s else None,
              f"{r.decode_tok_s / base.decode_tok_s:.2f}×" if base and r.decode_tok_s else None,
              f"{bound:.1f}" if bound else None,
              f"{100 * r.decode_tok_s / bound:.0f}%" if bound and r.decode_tok_s else None,
              f"{r.prefill_ms:.0f}" if r.prefill_ms else None,
              f"{r.prefill_ms / base.prefill_ms:.2f}×" if base and base.prefill_ms and r.prefill_ms else None,
              _mb(r.peak_rss), _mb(r.weight_bytes), same,
              f"{r.setup_s:.0f}" if r.setup_s is not None else None,
              "; ".join([r.what or ""] + r.notes))
    return t


def _best(results: list[Result], family: str, bits: int) -> Result | None:
    """The fastest row of ``family`` and ``bits``; slimkit's GGUF files run by llama.cpp are not slimkit's runtime."""
    rows = [r for r in results if r.family == family and r.bits == bits and r.decode_tok_s and not r.error
            and not r.row.startswith("slimkit-gguf-")]
    return max(rows, key=lambda r: r.decode_tok_s) if rows else None


def verdicts(results: list[Result], bw: float) -> list[str]:
    base = baseline(results)
    if base is None:
        return ["- no fp32 eager baseline: no verdicts."]
    out = []
    for bits, target in ((4, G1_INT4), (8, G1_INT8)):
        own, peer = _best(results, "slimkit", bits), _best(results, "peer", bits)
        if own is None:
            out.append(f"- G1 int{bits}: no slimkit int{bits} row ran — not measured.")
            continue
        ratio = own.decode_tok_s / base.decode_tok_s
        bound = bw / own.weight_bytes if own.weight_bytes else None
        line = (f"- G1 int{bits}: best slimkit row \"{own.label}\" {own.decode_tok_s:.2f} tok/s = {ratio:.2f}× fp32 "
                f"eager (floor ≥ {target}×: {'met' if ratio >= target else 'MISSED'})")
        if peer is not None:
            rel = own.decode_tok_s / peer.decode_tok_s
            line += (f"; best peer \"{peer.label}\" {peer.decode_tok_s:.2f} tok/s → slimkit at {rel:.2f}× of it "
                     f"(goal ≥ 1.0×: {'met' if rel >= 1 else 'MISSED'})")
        if bound:
            frac = own.decode_tok_s / bound
            line += (f"; {100 * frac:.0f}% of its bandwidth bound {bound:.1f} tok/s (goal ≥ {100 * G1_BOUND:.0f}%: "
                     f"{'met' if frac >= G1_BOUND else 'MISSED'})")
        out.append(line + ".")
        if own.prefill_ms and base.prefill_ms:
            pr = own.prefill_ms / base.prefill_ms
            best_pre = min((r for r in results if r.family == "slimkit" and r.bits == bits and r.prefill_ms),
                           key=lambda r: r.prefill_ms)
            out.append(f"- G3 int{bits}: prefill 1×256 of that row {own.prefill_ms:.0f} ms = {pr:.2f}× fp32 eager "
                       f"{base.prefill_ms:.0f} ms (target ≤ {G3_PREFILL}×: {'met' if pr <= G3_PREFILL else 'MISSED'}); "
                       f"fastest slimkit int{bits} prefill: \"{best_pre.label}\" "
                       f"{best_pre.prefill_ms / base.prefill_ms:.2f}×.")
    for qtype in ("q8_0", "q4_0"):
        own = next((r for r in results if r.row == f"slimkit-gguf-{qtype}" and r.decode_tok_s), None)
        peer = next((r for r in results if r.row == f"llamacpp-{qtype}" and r.decode_tok_s), None)
        if own and peer:
            out.append(f"- GGUF {qtype}: slimkit's file in llama.cpp {own.decode_tok_s:.2f} tok/s = "
                       f"{own.decode_tok_s / base.decode_tok_s:.2f}× fp32 eager, {own.decode_tok_s / peer.decode_tok_s:.2f}× "
                       f"llama.cpp's own {qtype.upper()} file (same tensor types: expected 1.0× within noise).")
    again = next((r for r in results if r.row == "eager-fp32-again" and r.decode_tok_s), None)
    if again:
        first = next(r for r in results if r.row == "eager-fp32")
        out.append(f"- drift: fp32 eager decoded {first.decode_tok_s:.2f} tok/s at the start and {again.decode_tok_s:.2f} "
                   f"at the end ({again.decode_tok_s / first.decode_tok_s:.2f}×); the ratios divide by the faster "
                   "of the two (and the shorter prefill).")
    return out


def render(by_model: dict[str, list[Result]], env: dict[str, Any], s: Settings, bw: dict[str, float],
           info: dict[str, Any], seconds: float) -> str:
    from benchmarks import harness

    run = (f"The whole run took {seconds / 60:.1f} min. {harness.environment_line(env)}; llama-cpp-python "
           f"{pg.llama_cpp_version()} (llama.cpp vendored in its sdist, built from source here).")
    protocol = (
        f"Protocol: batch 1, {THREADS} threads in every runtime (torch intra-op, ORT intra-op, llama.cpp n_threads "
        f"and n_threads_batch); greedy, never stopping at EOS. Decode: {s.new_tokens} new tokens after a "
        f"{s.prompt_len}-token prompt with a KV cache; tokens/s over the {s.new_tokens - 1} one-token steps after the "
        f"first; median of 1–{s.max_runs} runs (as many as fit {s.decode_budget_s:.0f} s; slower rows time fewer "
        f"tokens and say so). Prefill: batch 1 × {s.prefill_len}, median of 2–{s.max_prefill_runs} runs. Warm-up: "
        f"one {s.warm_tokens}-token generation and one prefill. Each row in its own process (ORT rows quantize and "
        "export in another one); peak RSS = VmHWM after load, quantization and warm-up (what generating holds, "
        "not what quantizing needed; PyTorch and ORT rows include ~0.3 GB of torch libraries, llama.cpp rows do "
        f"not import torch). Bandwidth bound = copy bandwidth {bw['best'] / 1e9:.1f} GB/s (read + write bytes of a "
        f"{bw['size_mb']:.0f} MiB numpy copy, median of 5, the best of 1 and 2 threads and of the measurements at "
        f"the start ({bw.get('start', bw['best']) / 1e9:.1f}) and the end ({bw.get('end', bw['best']) / 1e9:.1f}) of "
        "the run; a decode step only reads, so a runtime can beat a bound set by copies) ÷ bytes of weights one decode step reads (all but the "
        "embedding table, lm_head included; KV cache not counted). Other processes took "
        f"{info.get('load_text', 'unknown')} of the CPUs during the timed parts.")
    eager = ("`sk.generate`" if info.get("sk_generate")
             else "a local `decode_loop` + DynamicCache (no `sk.generate` yet)")
    compiled_on = ", ".join(sorted(info["compile_models"])) or "no model"
    rows = (
        "Rows: slimkit int8 = `sk.RTN(bits=8)` (per output channel), int4 = `sk.RTN(bits=4, group_size=128)` "
        f"(symmetric), every Linear incl. lm_head; eager rows through {eager}; torchao rows through the same "
        "`decode_loop` with the HF forward. Compiled rows: `torch.compile(model.forward)` (inductor, dynamic=False) "
        "on the one-token decode steps with a transformers StaticCache, prefill eager (as HF `generate` with a "
        f"static cache does) — on {compiled_on} only (compiling costs minutes per row on 2 cores). llama.cpp "
        "files: `convert_hf_to_gguf.py` (f32, f16), `llama_model_quantize` (Q8_0, Q4_0, from f32; for Q4_0 it "
        "keeps output.weight at Q6_K); random models carry llama.cpp's bundled 32000-token llama-spm vocabulary "
        "(the converter's `_set_vocab_builtin`, as for Mamba/OpenELM folders without a tokenizer), stdlib-coder "
        "its own byte-level BPE written with pre-tokenizer `gpt-2`; token ids are fed directly, so the vocabulary "
        "only has to load. slimkit-gguf rows: slimkit's weights on llama.cpp's block grid (`sk.GPTQ(grid=...)` on "
        "stdlib-coder, `sk.RTN(grid=...)` on random models), written by `slimkit.export.gguf.export_gguf` with the "
        "tensor types of llama.cpp's own file (Q4_0: output.weight Q6_K) and run like the llama.cpp rows; they "
        "are not counted as slimkit's runtime in the G1 verdicts. torchao int4 on CPU in 0.18 is `PrototypeInt4WeightOnlyConfig` (Int4OpaqueTensor, bf16 "
        "model): `Int4WeightOnlyConfig`'s packing formats are GPU/XPU kernels. The \"tokens = fp32\" column counts the "
        "greedy tokens equal to fp32 eager's before the first difference, of the first 32 (a plumbing check; on "
        "random weights nearly flat logits make any rounding flip a token, so it says nothing of quality).")
    lines = ["## G1/G3 — generation: decode tokens/s, prefill, memory, bandwidth bound (slimkit beside its peers)",
             "", run, "", protocol, "", rows]
    if info.get("gguf_log"):
        lines += ["", "GGUF files made in this run: " + "; ".join(info["gguf_log"]) + "."]
    for key, results in by_model.items():
        params = info.get("params", {}).get(key)
        title = f"### {MODELS[key].label}" + (f" — {params / 1e6:.0f}M parameters" if params else "")
        lines += ["", title, "", model_table(results, bw["best"], s.prefill_len).to_markdown(), ""]
        lines += verdicts(results, bw["best"])
    targets = (f"G1 targets (~1B model, batch 1): int4 ≥ {G1_INT4}× and int8 ≥ {G1_INT8}× fp32 eager decode "
               "tokens/s in slimkit's best runtime as a floor; goal no slower than the best peer of the same bit "
               f"width; within 2× of the bandwidth bound. G3: prefill 1×256 of int8 and int4 ≤ {G3_PREFILL}× fp32 "
               "eager latency. The verdicts under the 853M table are the ones that count; the others are for "
               "orientation.")
    lines += ["", targets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return run_worker(Path(sys.argv[2]))
    from benchmarks import harness

    parser = harness.bench_parser("bench_generate", __doc__.split("\n")[0],
                                  quick="smoke test: tiny model + stdlib-coder, few tokens, one run; never written")
    parser.add_argument("--models", type=harness.parts_type(list(MODELS)), default=None,
                        help="models to run, comma separated: tiny, coder, 120m, 1b (default: coder,120m,1b; "
                             "--quick: tiny,coder)")
    parser.add_argument("--rows", default=None, help="row ids or shell patterns, comma separated (default: all); "
                                                     "eager-fp32 always runs. Ids: " + ", ".join(ROW_BY_ID))
    parser.add_argument("--compile-models", type=harness.parts_type(list(MODELS)), default=None,
                        help="models that get the torch.compile rows (default: 120m; --quick: tiny)")
    parser.add_argument("--keep-work", action="store_true", help="keep the per-run work folder (ONNX files, logs)")
    parser.add_argument("--worker", type=Path, help=__import__("argparse").SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)

    harness.set_threads(THREADS)
    s = QUICK if args.quick else FULL
    models = args.models or (("tiny", "coder") if args.quick else ("coder", "120m", "1b"))
    compile_models = set(args.compile_models or (("tiny",) if args.quick else ("120m",)))
    patterns = [p.strip() for p in args.rows.split(",")] if args.rows else None
    env = harness.environment()
    start = time.perf_counter()
    print("copy bandwidth", flush=True)
    bw = pg.copy_bandwidth(threads=THREADS)
    print(f"  {bw['best'] / 1e9:.1f} GB/s (1 thread {bw['one_thread'] / 1e9:.1f}, 2 threads "
          f"{bw.get('2_threads', 0) / 1e9:.1f})", flush=True)
    import slimkit as sk

    info: dict[str, Any] = {"compile_models": compile_models & set(models), "gguf_log": [], "params": {},
                            "sk_generate": hasattr(sk, "generate")}
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[Result]] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="run-", dir=WORK_ROOT) as tmp:
        for key in models:
            spec = MODELS[key]
            print(f"model {key}: {spec.label}", flush=True)
            work = Path(tmp) / key
            work.mkdir()
            folder = model_folder(spec)
            from safetensors import safe_open

            n = 0
            for f in folder.glob("*.safetensors"):
                with safe_open(str(f), "pt") as st:
                    n += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (safe_open has no __iter__)
            info["params"][key] = n
            prompt = prompt_ids(spec, max(s.prompt_len, s.prefill_len))
            results = []
            for row, skip in wanted_rows(key, patterns, compile_models, s):
                if skip:
                    results.append(Result(model=key, row=row.id, label=row.label, family=row.family,
                                          runtime=row.runtime, bits=row.bits, skipped=skip))
                    continue
                res = run_row(spec, row, s, prompt, work, info["gguf_log"])
                results.append(res)
                if res.other_load is not None:
                    loads.append(res.other_load)
                status = (f"{res.decode_tok_s:.2f} tok/s, prefill {res.prefill_ms:.0f} ms" if res.decode_tok_s
                          and res.prefill_ms else res.skipped or res.error or "no numbers")
                print(f" {status} [{res.wall_s or 0:.0f} s]", flush=True)
            by_model[key] = results
            print(model_table(results, bw["best"], s.prefill_len).to_text(), flush=True)
        if args.keep_work:
            keep = WORK_ROOT / time.strftime("kept-%Y%m%d-%H%M%S")
            os.rename(tmp, keep)
            os.makedirs(tmp)
            print(f"work folder kept: {keep}")
    info["load_text"] = f"{100 * statistics.mean(loads):.0f}% on average" if loads else "unknown"
    print("copy bandwidth again", flush=True)
    end = pg.copy_bandwidth(threads=THREADS)
    bw = {**{k: max(v, end.get(k, 0.0)) for k, v in bw.items()}, "start": bw["best"], "end": end["best"]}
    print(f"  {end['best'] / 1e9:.1f} GB/s; the bound uses {bw['best'] / 1e9:.1f}", flush=True)
    seconds = time.perf_counter() - start
    markdown = render(by_model, env, s, bw, info, seconds)
    all_rows = [r for rs in by_model.values() for r in rs]

    class _Row:  # publish_rows wants label / error / family
        def __init__(self, r: Result) -> None:
            self.label, self.family = f"{r.model}: {r.label}", r.family
            self.error = r.error if r.family in ("fp32", "slimkit") else None

    text = "\n\n".join(model_table(rs, bw["best"], s.prefill_len).to_text() for rs in by_model.values())
    return harness.publish_rows(args, SECTION, [_Row(r) for r in all_rows], text, markdown)


def _prod(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    sys.exit(main())
