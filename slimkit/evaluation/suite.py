"""Measure a whole model the way BENCHMARKS.md asks, and compare a compressed model with its baseline.

What "quality" means, which data it is measured on and which inputs latency is timed
with all belong to the model's task (``slimkit.tasks``: perplexity for causal LMs,
embedding fidelity for encoders, accuracy for classifiers, a user's metric for a
``GenericTask``); this module only drives the measurement. Size is the bytes on disk of
the saved checkpoint; latency the median of timed runs after warm-up at the stated
threads, batch and sequence length.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.io import model_info, save
from slimkit.core.linear_like import LinearLike
from slimkit.core.measure import (
    count_flops,
    count_parameters,
    layer_sparsity,
    model_latency,
    size_on_disk,
)
from slimkit.evaluation.generation import PROMPT_TOKENS, measure_generation
from slimkit.evaluation.report import CompressionReport, ModelMeasurement, environment_info
from slimkit.tasks import task_of
from slimkit.tasks.base import EvalData
from slimkit.tasks.causal_lm import DEFAULT_EVAL_TOKENS, PPL_CONTEXT, PPL_STRIDE

Progress = Callable[[str, float], None]  # (what is being measured, fraction done)
QUALITY_METRICS = {"perplexity", "accuracy", "fidelity"}
__all__ = ["DEFAULT_EVAL_TOKENS", "PPL_CONTEXT", "PPL_STRIDE", "EvalData", "bits_per_weight", "compare",
           "latency_inputs", "layer_bits", "measure_model", "measure_stage", "quality_reference", "resolve_eval_data"]


def resolve_eval_data(model: nn.Module, data: Any = None, max_tokens: int | None = None) -> EvalData:
    """Evaluation data for ``model`` from its task: ``data`` (a data spec: file, folder, dataset, list of
    texts; or EvalData) or the held-out split of its built-in corpus."""
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    return task_of(model).eval_data(model, data, max_tokens=max_tokens)


def latency_inputs(model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
    """Fixed, seeded inputs for timing and FLOPs: (inputs, batch size, sequence length or None)."""
    return task_of(model).latency_inputs(model, data)


def _size_bytes(model: nn.Module, saved_dir: str | os.PathLike | None) -> int:
    if saved_dir is not None:
        return size_on_disk(saved_dir)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "model")
        return size_on_disk(Path(tmp) / "model")


def layer_bits(model: nn.Module) -> dict[str, float]:
    """Stored bits per weight element of every Linear/Conv/Embedding-like layer, measured from its tensors.

    Quantized layers report their own (codes + scales + zeros); float layers their dtype's width.
    """
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight_bits_per_element"):
            out[name] = float(m.weight_bits_per_element())
        elif isinstance(m, (nn.Linear, LinearLike, nn.Embedding, nn.Conv1d, nn.Conv2d)):
            out[name] = float(m.weight.element_size() * 8)
    return out


def bits_per_weight(model: nn.Module, quantized_only: bool = False) -> float | None:
    """Stored bits per weight element over the model's weight layers, weighted by their element counts.

    Quantized layers count their measured bytes (codes + scales + zeros + g_idx), float
    layers their dtype's width. With ``quantized_only``, only layers that report
    ``weight_bits_per_element``; None when there is no such layer.
    """
    bits = elements = 0.0
    for m in model.modules():
        if hasattr(m, "weight_bits_per_element") and hasattr(m, "slimkit_param_counts"):
            n = m.slimkit_param_counts()[0]
            bits, elements = bits + m.weight_bits_per_element() * n, elements + n
        elif not quantized_only and isinstance(m, (nn.Linear, LinearLike, nn.Embedding, nn.Conv1d, nn.Conv2d)):
            n = m.weight.numel()
            bits, elements = bits + m.weight.element_size() * 8 * n, elements + n
    return bits / elements if elements else None


@torch.no_grad()
def measure_model(model: nn.Module, data: EvalData, metrics: tuple[str, ...] | None = None, name: str | None = None,
                  saved_dir: str | os.PathLike | None = None, reference: torch.Tensor | None = None,
                  progress: Progress | None = None) -> ModelMeasurement:
    """Every requested figure of ``model`` (default: all that apply to its kind), measured now.

    ``saved_dir``: the saved checkpoint whose bytes count as the size (saved to a temporary
    folder when not given). ``reference``: what the task measures quality against (an
    encoder's baseline embeddings; ``compare`` supplies it). ``progress(detail,
    fraction)`` is called as the measurement advances.
    """
    progress = progress or (lambda detail, fraction: None)
    info = model_info(model)
    task = task_of(model)
    kind = task.kind
    metrics = tuple(metrics or task.default_metrics)
    model.eval()
    params = count_parameters(model)
    m = ModelMeasurement(name=name or str(info.get("source") or type(model).__name__), kind=kind,
                         size_bytes=None, params_total=params.total, params_nonzero=params.nonzero, flops=None,
                         latency=None, quality={}, layer_sparsity={}, layer_bits=layer_bits(model),
                         details={"quality data": data.description})
    for key, only in (("bits per weight", False), ("bits per weight (quantized layers)", True)):
        value = bits_per_weight(model, only)
        if value is not None:
            m.details[key] = round(value, 4)
    if "size" in metrics:
        progress("size on disk", 0.0)
        m.size_bytes = _size_bytes(model, saved_dir)
    if "sparsity" in metrics:
        m.layer_sparsity = layer_sparsity(model)
    if {"flops", "latency"} & set(metrics):
        inputs, batch, seq = task.latency_inputs(model, data)
        if "flops" in metrics:
            m.flops = count_flops(model, inputs)
        if "latency" in metrics:
            progress("latency", 0.0)
            m.latency = model_latency(model, inputs, warmup=3, runs=10, min_warmup_s=2.0,
                                      threads=torch.get_num_threads(), batch_size=batch, seq_len=seq)
            if task.generates:  # an LM's speed is its generation: decode tokens/s with a KV cache
                progress("generation", 0.0)
                prompt = task.generation_prompt(model, data, PROMPT_TOKENS)
                m.generation = measure_generation(model, prompt).to_dict()
    # The recipe names a quality figure; each task answers with its own (a recipe written for
    # an LM, run with --model digits-cnn, still reports accuracy).
    if set(metrics) & QUALITY_METRICS:
        quality, details = task.measure_quality(model, data, reference, progress)
        m.quality.update(quality)
        m.details.update(details)
    return m


def quality_reference(baseline: nn.Module, data: EvalData, metrics: tuple[str, ...] | None = None) -> Any:
    """What a compressed model's quality is measured against (e.g. an encoder's fidelity: the baseline's own
    embeddings of the same texts), or None when no quality figure is asked for."""
    if set(metrics or task_of(baseline).default_metrics) & QUALITY_METRICS:
        return task_of(baseline).reference(baseline, data)
    return None


def _steps_name(model: nn.Module, default: str) -> str:
    return " + ".join(s.get("type", "?") for s in model_info(model).get("steps", [])) or default


def measure_stage(model: nn.Module, data: EvalData, metrics: tuple[str, ...] | None = None,
                  reference: Any = None, progress: Progress | None = None) -> ModelMeasurement:
    """``measure_model`` of a model a recipe is still working on, measured in place (no copy; the size is
    that of a checkpoint saved to a temporary folder, as for an unsaved model): every module's
    training flag is put back afterwards, so a later stage (distillation) finds the model as it left it."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        return measure_model(model, data, metrics, name=_steps_name(model, "unchanged"), reference=reference,
                             progress=progress)
    finally:
        for m, training in flags:
            m.training = training


def compare(baseline: nn.Module, model: nn.Module, data: EvalData, metrics: tuple[str, ...] | None = None,
            saved_dir: str | os.PathLike | None = None, notes: list[str] | None = None,
            progress: Progress | None = None, reference: Any = None) -> CompressionReport:
    """Measure ``baseline`` and ``model`` on the same data and return their CompressionReport.

    ``reference``: ``quality_reference(baseline, data, metrics)`` when the caller already computed it."""
    progress = progress or (lambda detail, fraction: None)
    base_name = str(model_info(baseline).get("source") or type(baseline).__name__)
    base = measure_model(baseline, data, metrics, name=base_name,
                         progress=lambda detail, f: progress(f"baseline {detail}", f))
    if reference is None:
        reference = quality_reference(baseline, data, metrics)
    comp = measure_model(model, data, metrics, name=_steps_name(model, "compressed"), saved_dir=saved_dir,
                         reference=reference, progress=lambda detail, f: progress(f"compressed {detail}", f))
    return CompressionReport(baseline=base, compressed=comp, steps=list(model_info(model).get("steps", [])),
                             notes=list(notes or []) + generation_notes(base, comp), environment=environment_info())


def generation_notes(base: ModelMeasurement, comp: ModelMeasurement) -> list[str]:
    """Which path the compressed model's layers take, and, when decoding or the 1×N prefill got no faster,
    the measured reason (each layer shape's chosen path beside the fp32 layer it replaced)."""
    g, b = comp.generation, base.generation
    if not g:
        return []
    notes = []
    if g.get("kernels"):
        notes.append(f"kernels measured on {g['isa']} ({g['threads']} threads): " + "; ".join(g["kernels"]))
    if b and b.get("decode_tokens_per_s") and g.get("decode_tokens_per_s"):
        ratio = g["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        if ratio < 1.0:
            timings = "; ".join(g.get("layer_timings") or []) or "no layer has a kernel for its layout (see above)"
            notes.append(f"no decode speed-up: {ratio:.2f}x the baseline's tokens/s; measured per layer shape at "
                         f"one row: {timings}")
    if base.latency and comp.latency and comp.latency.median_ms > base.latency.median_ms and g.get("prefill_timings"):
        ratio = comp.latency.median_ms / base.latency.median_ms
        notes.append(f"prefill (the latency row) is {ratio:.2f}x the baseline's: at that many rows no integer kernel "
                     "beats dequantizing the weight on this CPU, and the float layer it replaced no longer exists; "
                     "measured per layer shape: " + "; ".join(g["prefill_timings"]))
    return notes
