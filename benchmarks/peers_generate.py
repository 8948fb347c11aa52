"""The peers of ``bench_generate`` (llama.cpp, torchao, ONNX Runtime's int4 quantizer) and the measuring helpers it shares.

Nothing here is timed by itself; ``bench_generate`` calls these from its per-row worker
processes. Kept apart so the bench reads as protocol and table, and the glue each peer
needs (where llama.cpp's converter lives, how its vocabulary is supplied, which torchao
config runs on this CPU) is written down in one place.

llama.cpp (through llama-cpp-python):

- converter: ``convert_hf_to_gguf.py`` of the llama.cpp tree vendored in the llama-cpp-python
  sdist (found under ``$SLIMKIT_LLAMA_CPP_DIR`` or ``/work/bench-tools/src/*/vendor/llama.cpp``),
  run in a subprocess through ``_CONVERT_SHIM`` (two patches, both about the vocabulary only):
  1. a folder without tokenizer files gets llama.cpp's bundled Llama-2 SentencePiece vocabulary
     (``models/ggml-vocab-llama-spm.gguf``, 32000 tokens) through the converter's own
     ``_set_vocab_builtin`` — what it already does for Mamba and OpenELM folders without one;
  2. a BPE tokenizer whose pre-tokenizer hash the converter does not know (stdlib-coder's
     byte-level BPE, trained for the zoo) is written with pre-tokenizer ``gpt-2`` — its
     ``tokenizer.json`` uses exactly GPT-2's byte-level split regex — instead of refusing.
  The weights go through the converter untouched; the benchmark feeds token ids, never text.
- quantizer: ``llama_cpp.llama_model_quantize`` (llama.cpp's ``llama-quantize``) from the f32 file.
- timing: ``Llama.eval`` on the prompt's token ids (one ``llama_decode`` per batch of n_batch),
  then one ``eval`` per greedy token (argmax of the last logits, as every other row).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

BENCH_TOOLS = Path(os.environ.get("SLIMKIT_BENCH_TOOLS", "/work/bench-tools"))


# ---------------------------------------------------------------------------------------
# Memory: peak RSS of a phase, weight bytes per token, copy bandwidth
# ---------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def release_free_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS shows what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``clear_refs`` 5); False where it cannot."""
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak RSS of this process since start or the last ``reset_peak_rss`` (VmHWM)."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


class OtherLoad:
    """The share of the machine's CPU time that went to other processes during a block (``harness.OtherLoad``'s
    method, repeated here so a llama.cpp worker need not import torch, whose pages would count in its RSS)."""

    fraction: float | None = None

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> Self:
        self._b, self._o, self._w = self._busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = self._busy(), time.perf_counter() - self._w
        if busy is None or self._b is None or wall <= 0:
            return
        others = (busy - self._b) - (self._own() - self._o)
        self.fraction = max(0.0, others) / (wall * (os.cpu_count() or 1))


def _tensor_nbytes(t: Any) -> int:
    """Bytes a tensor holds, tensor subclasses (torchao) counted by their inner tensors."""
    import torch

    inner = t.data if type(t) is torch.nn.Parameter else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(inner, n)) for n in names)
    return inner.numel() * inner.element_size()


def torch_weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer, except embedding tables (one row read).

    A tied lm_head reads the table in full, so a tensor an Embedding shares with another
    module counts. Tensor subclasses (torchao) count their packed inner tensors.
    """
    from torch import nn

    seen: set[int] = set()
    emb: dict[int, Any] = {}
    total = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _, t in own:
            if t is None:
                continue
            key = id(t)
            if isinstance(module, nn.Embedding) or type(module).__name__ == "QuantEmbedding":
                emb.setdefault(key, t)
                continue
            if key not in seen:
                seen.add(key)
                total += _tensor_nbytes(t)
    return total


def onnx_weight_bytes_per_token(path: Path) -> int:
    """Bytes of initializers an ONNX decoder step reads: every initializer not consumed only by Gather (embeddings)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather"}:
            continue
        try:
            size = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except Exception:  # noqa: BLE001 - 4-bit or exotic types: count a byte
            size = 1
        n = 1
        for d in init.dims:
            n *= d
        total += n * size
    return total


def gguf_weight_bytes_per_token(path: Path) -> int:
    """Bytes of tensors a llama.cpp decode step reads: all but ``token_embd`` (unless the output head is tied to it)."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(path), "r")
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    return sum(int(t.n_bytes) for t in reader.tensors if tied or t.name != "token_embd.weight")


def gguf_tensor_types(path: Path) -> str:
    """The tensor types of a GGUF file and their counts, e.g. ``Q4_0 ×112, Q6_K ×1, F32 ×33``."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(path), "r")
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def copy_bandwidth(size_mb: int = 1024, repeats: int = 5, threads: int = 2) -> dict[str, float]:
    """Memory copy bandwidth in bytes/s: read + write bytes of a large numpy copy (STREAM's convention), median of ``repeats``.

    Measured with 1 thread and with ``threads`` threads copying halves (numpy releases the GIL
    in the copy loop); ``best`` is the larger of the two medians.
    """
    import statistics
    import threading

    import numpy as np

    n = size_mb * 1024 * 1024 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first

    def one(k: int) -> float:
        parts = np.array_split(np.arange(n), k)
        bounds = [(p[0], p[-1] + 1) for p in parts]
        times = []
        for _ in range(repeats):
            workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            times.append(time.perf_counter() - t)
        return 2 * src.nbytes / statistics.median(times)

    out = {"one_thread": one(1)}
    if threads > 1:
        out[f"{threads}_threads"] = one(threads)
    out["best"] = max(out.values())
    out["size_mb"] = float(size_mb)
    return out


# ---------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------


def llama_cpp_dir() -> Path | None:
    """The llama.cpp source tree holding ``convert_hf_to_gguf.py`` (``$SLIMKIT_LLAMA_CPP_DIR`` or the extracted sdist)."""
    env = os.environ.get("SLIMKIT_LLAMA_CPP_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(p) for p in sorted(glob.glob(str(BENCH_TOOLS / "src" / "*" / "vendor" / "llama.cpp")))]
    candidates += [Path(p) for p in sorted(glob.glob(str(BENCH_TOOLS / "llama.cpp")))]
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file():
            return c
    return None


def import_gguf() -> Any:
    """The ``gguf`` package: installed, else the copy in llama.cpp's tree (``gguf-py``)."""
    try:
        import gguf
    except ImportError:
        root = llama_cpp_dir()
        if root is None:
            raise
        sys.path.insert(0, str(root / "gguf-py"))
        import gguf
    import gguf

    return gguf


# Runs convert_hf_to_gguf.py's main() with the two vocabulary patches described in the module docstring.
_CONVERT_SHIM = r"""
import logging, sys
from pathlib import Path
root = sys.argv[1]
sys.path[0] = root            # _set_vocab_builtin reads models/ from sys.path[0]
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf as conv
import conversion.base as base
import conversion.llama as llama
log = logging.getLogger("slimkit-shim")

_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        log.warning("slimkit shim: unknown BPE pre-tokenizer hash; writing 'gpt-2' (byte-level GPT-2 split regex)")
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre

_set_vocab = llama.LlamaModel.set_vocab
def set_vocab(self):
    files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((self.dir_model / f).exists() for f in files):
        log.warning("slimkit shim: no tokenizer in the folder; using llama.cpp's bundled llama-spm vocabulary")
        return self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])
    return _set_vocab(self)
llama.LlamaModel.set_vocab = set_vocab
conv.main()
"""


def convert_to_gguf(hf_dir: Path, out: Path, outtype: str = "f32", timeout: float = 1800) -> Path:
    """``convert_hf_to_gguf.py hf_dir --outtype outtype --outfile out`` (with the shim); returns ``out``."""
    root = llama_cpp_dir()
    if root is None:
        raise FileNotFoundError("llama.cpp's convert_hf_to_gguf.py not found (set SLIMKIT_LLAMA_CPP_DIR or extract "
                                "the llama-cpp-python sdist under /work/bench-tools/src)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    cmd = [sys.executable, "-c", _CONVERT_SHIM, str(root), str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(root), check=False)
    if proc.returncode != 0 or not tmp.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"convert_hf_to_gguf.py exit {proc.returncode}: {' / '.join(tail)}")
    tmp.replace(out)
    return out


LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "f16": "LLAMA_FTYPE_MOSTLY_F16",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``) from ``src`` to ``dst`` at ``ftype`` (q8_0, q4_0, ...)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[ftype])
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    tmp.replace(dst)
    return dst


class LlamaCppRunner:
    """A GGUF file in llama-cpp-python, generating greedily from token ids with the same split timing as slimkit's loop."""

    def __init__(self, path: Path, threads: int = 2, n_ctx: int = 512, n_batch: int = 256) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> Any:
        # llama-cpp-python 0.3.36's eval keeps no logits unless logits_all; read the last token's from the context
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, decode seconds, new ids): prefill = eval of the prompt + first argmax, as ``decode_loop``."""
        import numpy as np

        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(list(prompt_ids))
        new = [int(np.argmax(self._last_logits()))]
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        while len(new) < max_new_tokens:
            llm.eval([new[-1]])
            new.append(int(np.argmax(self._last_logits())))
        return prefill_s, time.perf_counter() - t, new


def llama_cpp_version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure is the reason to show
        return f"not importable ({type(exc).__name__}: {str(exc)[:80]})"


# ---------------------------------------------------------------------------------------
# torchao
# ---------------------------------------------------------------------------------------


def torchao_quantize(model: Any, bits: int) -> tuple[Any, str]:
    """torchao weight-only quantization of every Linear in place; returns (model, what was used).

    int8: ``Int8WeightOnlyConfig()`` (per-row scales; fp32 activations). int4: torchao 0.18's
    CPU int4 path is ``PrototypeInt4WeightOnlyConfig(group_size=128)`` (``Int4OpaqueTensor``,
    ``_weight_int4pack_mm_for_cpu``) on a bf16 model — ``Int4WeightOnlyConfig``'s packing
    formats (plain, preshuffled, plain_int32, tile_packed_to_4d) are GPU/XPU kernels here.
    """
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if bits == 8:
        quantize_(model, Int8WeightOnlyConfig())
        return model, "torchao Int8WeightOnlyConfig() (per-row), fp32 activations"
    if bits == 4:
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )

        model = model.to(torch.bfloat16)
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128))
        return model, ("torchao PrototypeInt4WeightOnlyConfig(group_size=128) (Int4OpaqueTensor, "
                       "_weight_int4pack_mm_for_cpu), bf16 activations")
    raise ValueError(f"torchao rows are int8 or int4, got {bits}")


# ---------------------------------------------------------------------------------------
# ONNX Runtime's own int4 quantizer
# ---------------------------------------------------------------------------------------


def ort_int4_quantize(src: Path, dst: Path, block_size: int = 128, accuracy_level: int = 4) -> Path:
    """``MatMulNBitsQuantizer`` (RTN, its defaults otherwise) on an fp32 decoder graph, with ``accuracy_level``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(model, block_size=block_size, accuracy_level=accuracy_level)
    quant.process()
    big = sum(t.ByteSize() for t in quant.model.model.graph.initializer) > 1_800_000_000
    dst.parent.mkdir(parents=True, exist_ok=True)
    quant.model.save_model_to_file(str(dst), use_external_data_format=big)
    # the with-past graph's extra files (if any) travel with it
    for extra in src.parent.glob("*.json"):
        target = dst.parent / extra.name
        if not target.exists():
            target.write_bytes(extra.read_bytes())
    return dst


def json_dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
