"""Running exported ONNX files in ONNX Runtime: sessions with the options a file records, op counts.

ORT on x86-64 CPUs without VNNI (AVX2, AVX-512 before VNNI): the default u8s8 int8 GEMM
(VPMADDUBSW) saturates its 16-bit pair sums when |w| > 63 (255·127·2 > 32767) and gives
wrong results for full-range int8 weights (measured on an AVX2 EPYC: 13.1 max error on a 512x512
layer; MiniLM cosine 0.9924 instead of 0.9962). Two cures: quantize with
``reduce_range=True`` (weights on the 7-bit grid: exact on the fast kernel, any session),
or run with ``session.x64quantprecision=1`` (exact u8u8 kernel: MiniLM 0.72× fp32 instead
of 0.64× there). A file that needs the option records it in
``metadata_props["slimkit.ort_session_config"]``; ``ort_session`` applies it on CPUs whose
kernel saturates (``cpu_saturates_u8s8``: x86-64 without AVX512-VNNI, AVX-VNNI or AMX) and
leaves it out on the others, where VPDPBUSD / AMX accumulate in 32 bits and the fast u8s8
kernel is exact (measured on a VNNI Xeon, MiniLM with full-range int8 weights: identical
embeddings with and without the option, mean cosine 0.9976 to fp32; 0.54x fp32 latency
without it, 0.95x with it). Set it in your own sessions on CPUs without VNNI too.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimkit.core.errors import DataError, SlimkitError, UnsupportedError

MISSING_MESSAGE = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'slimkit[onnx]'"
ORT_SESSION_CONFIG = {"session.x64quantprecision": "1"}
ORT_EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}  # float32 compute in weight-only MatMulNBits


# -- optional dependencies ---------------------------------------------------------------
def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UnsupportedError(MISSING_MESSAGE) from None


def _require_ort():
    try:
        import onnxruntime
    except ImportError:
        raise UnsupportedError(MISSING_MESSAGE) from None
    return onnxruntime


# -- running ------------------------------------------------------------------------------
def recorded_metadata(path: str | os.PathLike, key: str) -> Any:
    """The JSON value slimkit recorded under ``metadata_props[key]`` of an ONNX file (None when absent or unreadable)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                return json.loads(prop.value)
            except ValueError:
                return None
    return None


def _recorded_session_config(path: Path) -> dict[str, str]:
    """The session options slimkit recorded in an exported file (none for other files)."""
    recorded = recorded_metadata(path, "slimkit.ort_session_config")
    try:
        return {str(k): str(v) for k, v in recorded.items()} if recorded else {}
    except AttributeError:
        return {}


SATURATION_FREE_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 32-bit int8 dot products in one instruction


@functools.cache
def cpu_saturates_u8s8() -> bool:
    """Whether ORT's uint8 x int8 GEMM on this CPU uses VPMADDUBSW, whose 16-bit pair sums saturate.

    True on x86-64 without VNNI/AMX, and on an x86-64 CPU whose flags cannot be read
    (assume the worst); False on other architectures (ARM's dot-product kernels widen first).
    """
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "x64", "i386", "i686"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not any(flag in flags for flag in SATURATION_FREE_FLAGS)


def ort_session(path: str | os.PathLike, threads: int = 2, *, exact: bool = True,
                optimized_path: str | os.PathLike | None = None, spin: bool = True):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, 1 inter-op, all graph optimizations.

    Applies the session options slimkit recorded in the file: ``session.x64quantprecision=1``
    when its int8 weights exceed ±63, on CPUs where ``cpu_saturates_u8s8()`` (exact int8
    GEMM on x86 CPUs without VNNI, slower; files quantized with ``reduce_range`` need
    nothing, and VNNI/AMX CPUs are exact without it). ``exact=True`` also sets ``session.qdq_matmulnbits_accuracy_level=1``:
    ORT turns weight-only DequantizeLinear -> MatMul into MatMulNBits, whose default
    (accuracy level 4) quantizes the *activations* to int8 per block of 32 (faster decode,
    not what the PyTorch model computes); level 1 computes in float32. ``optimized_path``:
    also write the optimized graph there (to see which fused kernels ORT chose). ``spin=False``:
    idle intra-op threads sleep instead of spinning, so sessions timed in turn (interleaved
    benchmarks) do not steal each other's cores.
    """
    ort = _require_ort()
    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"ONNX file {path} not found")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    recorded = _recorded_session_config(path)
    if not cpu_saturates_u8s8():
        recorded = {k: v for k, v in recorded.items() if k not in ORT_SESSION_CONFIG}
    for key, value in {**recorded, **(ORT_EXACT_CONFIG if exact else {})}.items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SlimkitError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from None


PAST_PREFIX = "past_key_values."  # the decoder-with-past inputs: past_key_values.{i}.key / .value


def _decoder_defaults(session: Any, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inputs of a decoder-with-past graph that ``inputs`` leave out and have an obvious value.

    Past keys/values left out: an empty cache (batch, kv_heads, 0, head_dim), so the call is a
    prefill. ``position_ids`` left out: past_len, past_len + 1, ... per row, what a
    transformers model uses when called without them.
    """
    ids = inputs.get("input_ids")
    if ids is None:
        return {}
    ids = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
    if ids.ndim != 2:
        return {}
    batch, seq = ids.shape
    filled: dict[str, np.ndarray] = {}
    past_len = None
    for meta in session.get_inputs():
        if not meta.name.startswith(PAST_PREFIX):
            continue
        if meta.name in inputs:
            past_len = int(np.shape(inputs[meta.name])[2])
            continue
        shape = meta.shape
        if len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int):
            filled[meta.name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=np.float32)
    past_len = past_len or 0
    if "position_ids" not in inputs and any(i.name == "position_ids" for i in session.get_inputs()):
        filled["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
    return filled


def run_onnx(session: Any, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on named inputs (tensors or arrays); returns every output as a numpy array.

    A decoder-with-past graph (``slimkit.export.onnx_decoder``) run without its past inputs
    starts from an empty cache, and without ``position_ids`` counts positions from the past
    length (as the PyTorch model does when called without them): ``input_ids`` and
    ``attention_mask`` are then enough, as for the graph without a cache.
    """
    expected = [i.name for i in session.get_inputs()]
    if any(n not in inputs for n in expected):
        inputs = {**inputs, **_decoder_defaults(session, inputs)}
    missing = [n for n in expected if n not in inputs]
    if missing:
        raise DataError(f"ONNX inputs missing: {', '.join(missing)} (the graph takes {', '.join(expected)})")
    feed = {n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for n, v in inputs.items()
            if n in expected}
    return session.run(None, feed)


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Node count per op type in the main graph of the ONNX file ``path`` (weights are not loaded)."""
    _require_onnx()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in proto.graph.node))


def ort_op_counts(path: str | os.PathLike, threads: int = 1, *, exact: bool = True) -> dict[str, int]:
    """Node count per op type of the graph ONNX Runtime actually runs (after its fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, exact=exact, optimized_path=optimized)
        return op_counts(optimized)
