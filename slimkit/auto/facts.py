"""What ``slimkit advise`` knows before it measures anything: the machine and the model.

Machine facts: the CPU's ISA (AVX2, AVX-512 VNNI, AMX: whether int8 dot products have a
hardware instruction), usable cores, memory, and which runtimes are installed with which
integer kernels. Read without importing the runtimes (``importlib.metadata``), except torch,
which slimkit already runs on.

Model facts: its kind (from its task), whether it generates token by token, where its
parameters are (Linear-like layers, embeddings, convolutions, the rest), the Linear shapes
that hold most weights (the shapes the kernel probes time), and the activation outliers of
its Linear inputs on calibration data: SmoothQuant and LLM.int8() exist because a few input
channels 10–100× larger than the rest wreck a per-tensor int8 activation range.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import run_model
from slimkit.core.linear_like import is_linear_like, linear_shape
from slimkit.core.machine import cpu_flags, cpu_isa, cpu_model
from slimkit.tasks import task_of

#: the flags that decide which integer paths have hardware behind them
INT8_ACCELERATOR_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
#: runtimes advise knows how to use, by distribution name
RUNTIMES = ("torch", "onnxruntime", "llama_cpp_python")
#: torch's CPU integer kernels (what QuantLinear can use)
TORCH_INT_OPS = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm")
#: a Linear input channel whose largest |x| is this many times the median channel's is an outlier
OUTLIER_RATIO = 20.0


@dataclass(frozen=True)
class MachineFacts:
    """The CPU, its integer instructions, cores, memory and the installed runtimes."""

    cpu: str
    isa: str
    int8_accelerator: str | None  # "AMX", "AVX-512 VNNI", "AVX-VNNI" or None (AVX2 and below)
    cores: int
    threads: int  # torch's intra-op threads: what every probe runs with
    memory_gib: float | None
    runtimes: dict[str, str]  # distribution -> version, installed ones only
    torch_int_ops: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def int8_accelerator(flags: frozenset[str]) -> str | None:
    """The hardware int8 dot-product instruction set among ``flags`` (richest first), or None."""
    names = {"amx_int8": "AMX", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI"}
    return next((names[f] for f in INT8_ACCELERATOR_FLAGS if f in flags), None)


def machine_facts(flags: frozenset[str] | None = None, runtimes: dict[str, str] | None = None) -> MachineFacts:
    """This machine's facts; ``flags`` / ``runtimes`` replace the detected ones (tests fake another machine)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if runtimes is None:
        runtimes = {d: v for d in RUNTIMES if (v := _installed(d)) is not None}
        runtimes.setdefault("torch", torch.__version__)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ops = tuple(op for op in TORCH_INT_OPS if hasattr(torch, op) or hasattr(torch.ops.aten, op))
    return MachineFacts(cpu=cpu_model(), isa=cpu_isa(flags), int8_accelerator=int8_accelerator(flags), cores=cores,
                        threads=torch.get_num_threads(), memory_gib=_memory_gib(), runtimes=dict(runtimes),
                        torch_int_ops=ops)


@dataclass
class ModelFacts:
    """Where a model's parameters are, its dominant Linear shapes and its activation outliers."""

    kind: str
    generates: bool
    params: int
    fp32_bytes: int
    linear_params: int
    embedding_params: int
    conv_params: int
    other_params: int  # norms, biases of other layers, parameters of layers no technique handles
    linear_layers: int
    embedding_rows: int
    shapes: list[tuple[tuple[int, int], int]]  # (out, in) -> how many layers, most weights first
    outliers: dict[str, float] = field(default_factory=dict)  # layer -> max/median channel |x| (measured only)

    @property
    def outlier_layers(self) -> list[str]:
        """Layers whose largest input channel is ≥ OUTLIER_RATIO times the median one."""
        return [n for n, r in self.outliers.items() if r >= OUTLIER_RATIO]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready), with the outlier summary rather than every layer."""
        d = asdict(self)
        d["shapes"] = [{"out": o, "in": i, "layers": n} for (o, i), n in self.shapes]
        ratios = list(self.outliers.values())
        d["outliers"] = {"layers_measured": len(ratios), "max_ratio": round(max(ratios), 1) if ratios else None,
                         "outlier_layers": len(self.outlier_layers), "threshold": OUTLIER_RATIO}
        return d


def model_facts(model: nn.Module, batches: list[Any] | None = None) -> ModelFacts:
    """Count ``model``'s parameters by layer type; with calibration ``batches``, measure activation outliers."""
    task = task_of(model)
    counts = {"linear": 0, "embedding": 0, "conv": 0, "other": 0}
    embedding_rows = 0
    shapes: Counter[tuple[int, int]] = Counter()
    seen: set[int] = set()
    linears: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # tied weights count once
        seen.update(id(p) for p in own)
        n = sum(p.numel() for p in own)
        if is_linear_like(module):
            counts["linear"] += n
            shapes[linear_shape(module)] += 1
            linears[name] = module
        elif isinstance(module, nn.Embedding):
            counts["embedding"] += n
            embedding_rows += module.num_embeddings if n else 0
        elif isinstance(module, nn.modules.conv._ConvNd):
            counts["conv"] += n
        else:
            counts["other"] += n
    total = sum(counts.values())
    by_weight = sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[1])
    facts = ModelFacts(kind=task.kind, generates=bool(task.generates), params=total,
                       fp32_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                       linear_params=counts["linear"], embedding_params=counts["embedding"],
                       conv_params=counts["conv"], other_params=counts["other"], linear_layers=len(linears),
                       embedding_rows=embedding_rows, shapes=by_weight)
    if batches:
        facts.outliers = activation_outliers(model, linears, batches)
    return facts


@torch.no_grad()
def activation_outliers(model: nn.Module, linears: dict[str, nn.Module], batches: list[Any]) -> dict[str, float]:
    """For each Linear-like layer, its largest input channel's max |x| over the median channel's (≥ 1).

    Channels are the last dimension of the layer's input; padding rows count like any row
    (the calibration batches of a padded task hold few). A layer whose median channel is 0
    gets the ratio of its largest channel to the mean one instead.
    """
    peaks: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().float()
            peak = x.abs().reshape(-1, x.shape[-1]).amax(0)
            peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            run_model(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = {}
    for name, peak in peaks.items():
        middle = float(peak.median())
        base = middle if middle > 0 else float(peak.mean())
        out[name] = float(peak.max()) / base if base > 0 else 1.0
    return out
