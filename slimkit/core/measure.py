"""Measured figures of a model: parameters, size on disk, sparsity, FLOPs/MACs, latency.

Every number here is measured, never estimated (see BENCHMARKS.md): sizes are bytes of
the files on disk, FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward, and latency is the median of timed runs after warm-up with the thread count
recorded.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.linear_like import LinearLike


class MeasureError(SlimkitError, ValueError):
    """An invalid measurement setting (e.g. zero timed runs)."""


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Logical weight elements of a model: all of them, and those that are not exactly zero."""

    total: int
    nonzero: int


def count_parameters(model: nn.Module) -> ParamCount:
    """Count the parameters of ``model``, each shared tensor once.

    Compressed modules that keep their weights outside ``parameters()`` (e.g. an int8
    ``QuantLinear`` holding int8 buffers) report them through a
    ``slimkit_param_counts(self) -> (total, nonzero)`` method, which is added here. Other
    buffers (running stats, masks, scales) are not weights and are not counted.
    """
    total = nonzero = 0
    seen: set[int] = set()
    # parameters() already yields a tied tensor once; the id set also covers modules that
    # override parameters() without that deduplication.
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.device.type != "meta":
            nonzero += int(torch.count_nonzero(p.detach()).item())
    for module in model.modules():
        counts = getattr(module, "slimkit_param_counts", None)
        if callable(counts):
            extra_total, extra_nonzero = counts()
            total += int(extra_total)
            nonzero += int(extra_nonzero)
    return ParamCount(total=total, nonzero=nonzero)


# ---------------------------------------------------------------------------------------
# Size on disk
# ---------------------------------------------------------------------------------------


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the file at ``path``, or of every file under the directory ``path`` (recursive)."""
    path = Path(path)
    if not path.exists():
        raise SlimkitError(f"cannot measure size on disk: {path} does not exist")
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------
# Sparsity
# ---------------------------------------------------------------------------------------

_WEIGHTED = (nn.Linear, LinearLike, nn.Conv1d, nn.Conv2d, nn.Embedding)  # LinearLike: GPT-2's Conv1D too


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the weight of each Linear, Conv1d/2d and Embedding.

    A module with a ``dense_weight()`` method (a compressed layer that can rebuild its
    float weight) is measured on that tensor instead of ``.weight``. Keys are module names
    as in ``model.named_modules()``.
    """
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            dense = getattr(module, "dense_weight", None)
            if callable(dense):
                weight = dense()
            elif isinstance(module, _WEIGHTED):
                weight = module.weight
            else:
                continue
            if weight is None or weight.numel() == 0 or weight.device.type == "meta":
                continue
            zeros = weight.numel() - int(torch.count_nonzero(weight).item())
            out[name] = zeros / weight.numel()
    return out


# ---------------------------------------------------------------------------------------
# FLOPs / MACs
# ---------------------------------------------------------------------------------------


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` with a dict (keyword arguments), a tuple/list (positional) or one tensor."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` (dict -> **kwargs, tuple -> *args, tensor).

    Counted by ``FlopCounterMode`` under ``no_grad``: matmuls, convolutions and attention
    count (2 FLOPs per multiply-accumulate); element-wise ops and custom kernels it does not
    know are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _call(model, inputs)
    return int(counter.get_total_flops())


_cpu_attention_registered = False


def _register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode the CPU kernel of scaled_dot_product_attention (torch knows only the GPU ones).

    Without it, a transformers model running SDPA on CPU counts no attention matmuls at all.
    """
    global _cpu_attention_registered
    if _cpu_attention_registered:
        return
    _cpu_attention_registered = True
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward: ``count_flops(model, inputs) // 2``."""
    return count_flops(model, inputs) // 2


# ---------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of repeated calls, in milliseconds, with the setting it was measured in."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    threads: int
    batch_size: int | None = None
    seq_len: int | None = None
    throughput: float | None = None  # items per second: batch_size / median seconds

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_samples(cls, times_ms: Sequence[float], *, warmup: int, threads: int, batch_size: int | None = None,
                     seq_len: int | None = None) -> LatencyStats:
        """Summarize timed calls (ms): median, mean, min, max and, with ``batch_size``, items/s at the median."""
        median = statistics.median(times_ms)
        throughput = None
        if batch_size is not None and median > 0:  # a zero median has no meaningful rate
            throughput = batch_size / (median / 1e3)
        return cls(median_ms=median, mean_ms=statistics.fmean(times_ms), min_ms=min(times_ms), max_ms=max(times_ms),
                   runs=len(times_ms), warmup=warmup, threads=threads, batch_size=batch_size, seq_len=seq_len,
                   throughput=throughput)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyStats:
        """Rebuild from ``to_dict`` output; unknown or missing keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MeasureError(f"LatencyStats: unknown key(s) {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise MeasureError(f"LatencyStats: {exc}") from None


def fastest_ms(fn: Callable[[], Any], budget_s: float = 0.25, runs: int = 9) -> float:
    """The fastest of a few timed runs of ``fn`` in milliseconds, after one warm-up.

    For probes that compare paths (a kernel choice, ``slimkit advise``): the minimum is what
    a busy machine (other processes, preemption) distorts least. Stops after ``runs`` calls,
    or earlier once ``budget_s`` is spent and at least 5 calls were timed.
    """
    fn()  # warm-up
    times: list[float] = []
    spent = 0.0
    while len(times) < runs and (spent < budget_s or len(times) < 5):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return min(times) * 1e3


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    min_warmup_s: float = 0.0,
) -> LatencyStats:
    """Time ``fn()``: untimed warm-up calls, then ``runs`` calls timed with ``perf_counter``.

    Warm-up lasts at least ``warmup`` calls and at least ``min_warmup_s`` seconds: on these
    machines the first seconds of a process can run several times slower (allocator and
    thread-pool start-up), and a fixed count of fast calls does not cover them.

    With ``threads`` set, torch's intra-op thread count is set for the measurement and
    restored afterwards; the count actually in force is recorded either way.
    ``batch_size``/``seq_len`` describe the work of one call; with ``batch_size`` the
    throughput (items/s at the median) is reported.
    """
    if warmup < 0:
        raise MeasureError(f"warmup must be >= 0, got {warmup}")
    if runs < 1:
        raise MeasureError(f"runs must be >= 1, got {runs}")
    if threads is not None and threads < 1:
        raise MeasureError(f"threads must be >= 1, got {threads}")
    if batch_size is not None and batch_size < 1:
        raise MeasureError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise MeasureError(f"seq_len must be >= 1, got {seq_len}")

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        warm_start = time.perf_counter()
        done = 0
        # The 1000-call cap bounds warm-up for functions far faster than min_warmup_s.
        while done < warmup or (time.perf_counter() - warm_start < min_warmup_s and done < 1000):
            fn()
            done += 1
        times_ms = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)

    return LatencyStats.from_samples(times_ms, warmup=warmup, threads=used, batch_size=batch_size, seq_len=seq_len)


def _infer_shape(inputs: Any) -> tuple[int | None, int | None]:
    """(batch, seq) read from the inputs where they are unambiguous, else None."""
    if isinstance(inputs, dict):
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return ids.shape[0], ids.shape[1]
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(inputs, (tuple, list)):
        first = next((v for v in inputs if isinstance(v, torch.Tensor)), None)
    else:
        first = inputs
    # Only dim 0 of a batched (>= 2-D) tensor is surely the batch; dim 1 may be channels.
    if isinstance(first, torch.Tensor) and first.dim() >= 2:
        return first.shape[0], None
    return None, None


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none.

    Other work on the machine slows timed runs; a load above the thread count flags it.
    """
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def model_latency(model: nn.Module, inputs: Any, **kw: Any) -> LatencyStats:
    """Latency of a ``no_grad`` forward of ``model`` on ``inputs`` (dict, tuple or tensor).

    Keyword arguments go to :func:`measure_latency`. When not given, ``batch_size`` is read
    from dim 0 of the inputs and ``seq_len`` from a 2-D ``input_ids``. The model's
    train/eval mode is left as the caller set it.
    """
    batch, seq = _infer_shape(inputs)
    kw.setdefault("batch_size", batch)
    kw.setdefault("seq_len", seq)

    def forward() -> None:
        with torch.no_grad():
            _call(model, inputs)

    return measure_latency(forward, **kw)
