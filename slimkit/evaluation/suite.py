"""Measure a whole model the way BENCHMARKS.md asks, and compare a compressed model with its baseline.

Which quality figure a model gets depends on its kind:
- causal-lm: perplexity on held-out text (default: the first ``DEFAULT_EVAL_TOKENS``
  tokens of the stdlib corpus's eval split), sliding window of context 256, stride 128;
- encoder: embedding fidelity (mean/min cosine, top-1 neighbour agreement) of
  mean-pooled sentence embeddings against the baseline's, on held-out docstring sentences;
- classifier: accuracy on the held-out split (digits: its test split).
Size is the bytes on disk of the saved checkpoint; latency the median of timed runs
after warm-up at the stated threads, batch and sequence length.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import DataError
from slimkit.core.io import model_info, save, tokenizer_of
from slimkit.evaluation.measure import (
    count_flops,
    count_parameters,
    layer_sparsity,
    model_latency,
    size_on_disk,
)
from slimkit.evaluation.quality import accuracy, embedding_fidelity, encode_sentences, perplexity
from slimkit.evaluation.report import CompressionReport, ModelMeasurement, environment_info

Progress = Callable[[str, float], None]  # (what is being measured, fraction done)
DEFAULT_EVAL_TOKENS = 65536
PPL_CONTEXT, PPL_STRIDE = 256, 128
LM_LATENCY_SHAPE = (1, 256)  # batch, sequence length of one timed forward (a prefill)
ENCODER_LATENCY_SHAPE = (32, 128)
CLASSIFIER_LATENCY_BATCH = 256
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".yaml", ".yml", ".csv", ".html", ".c", ".h", ".js", ".ts"}
QUALITY_METRICS = {"perplexity", "accuracy", "fidelity"}
DEFAULT_METRICS = {
    "causal-lm": ("size", "params", "sparsity", "flops", "latency", "perplexity"),
    "encoder": ("size", "params", "sparsity", "flops", "latency", "fidelity"),
    "classifier": ("size", "params", "sparsity", "flops", "latency", "accuracy"),
    "module": ("size", "params", "sparsity"),
}


@dataclass
class EvalData:
    """Held-out data for one model kind, with a description that goes into the report."""

    kind: str
    description: str
    token_ids: torch.Tensor | None = None  # causal-lm: one 1-D stream
    texts: list[str] | None = None  # encoder
    inputs: torch.Tensor | None = None  # classifier
    labels: torch.Tensor | None = None


def read_user_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a text file, or of every text file under a folder (sorted by path)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"evaluation data {str(path)!r} not found: give a text file or a folder of text files")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"evaluation file {f} is not UTF-8 text") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"evaluation data {str(path)!r} holds no text")
    return texts


def _paragraphs(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        out.extend(p.strip() for p in t.split("\n\n") if len(p.split()) >= 3)
    return out


def resolve_eval_data(model: nn.Module, data: Any = None, max_tokens: int = DEFAULT_EVAL_TOKENS) -> EvalData:
    """Evaluation data for ``model``: ``data`` as given (EvalData, path, list of texts) or the built-in held-out split."""
    if isinstance(data, EvalData):
        return data
    kind = model_info(model)["kind"]
    source = None
    if isinstance(data, (str, os.PathLike)):
        source = str(data)
        data = read_user_texts(data)
    if data is not None and not (isinstance(data, list) and all(isinstance(t, str) for t in data)):
        raise DataError("evaluation data must be a text file or folder path, a list of texts, or EvalData")
    if kind == "causal-lm":
        return _lm_eval_data(model, data, source, max_tokens)
    if kind == "encoder":
        if data is None:
            from slimkit.zoo.minilm import sample_texts

            texts = sample_texts("eval", n=256, seed=0)
            return EvalData(kind, f"{len(texts)} stdlib docstring sentences (eval split)", texts=texts)
        texts = _paragraphs(data)[:512]
        if len(texts) < 2:
            raise DataError(f"evaluation data {source or ''} has fewer than 2 paragraphs to embed")
        return EvalData(kind, f"{len(texts)} paragraphs of {source or 'given texts'}", texts=texts)
    if kind == "classifier":
        if data is not None:
            raise DataError("a classifier is evaluated on its own held-out split; text data does not apply")
        if getattr(model, "slimkit_arch", None) != "digits-cnn":
            raise DataError("no built-in evaluation split for this classifier; pass EvalData(inputs=..., labels=...)")
        from slimkit.zoo.digits import load_digits_split

        x, y = load_digits_split("test")
        return EvalData(kind, f"digits test split, {len(y)} images", inputs=x, labels=y)
    return EvalData(kind, "no quality data for a generic module")


def _lm_eval_data(model: nn.Module, texts: list[str] | None, source: str | None, max_tokens: int) -> EvalData:
    from slimkit.core.calibration import tokenize_texts

    tokenizer = tokenizer_of(model)
    if tokenizer is None:
        raise DataError("this causal LM has no tokenizer attached; load it from a folder with tokenizer files")
    if texts is None:
        from slimkit.zoo.corpus import load_split

        texts, source = load_split("eval"), "stdlib eval split"
    # Tokenize file by file and stop once enough tokens are in: the result is the same prefix.
    parts, count = [], 0
    for text in texts:
        parts.append(tokenize_texts([text], tokenizer))
        count += len(parts[-1])
        if count >= max_tokens:
            break
    ids = torch.cat(parts)[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"evaluation text from {source} gives fewer than 2 tokens")
    desc = f"{source}, first {len(ids):,} tokens, context {PPL_CONTEXT}, stride {PPL_STRIDE}"
    return EvalData("causal-lm", desc, token_ids=ids)


def latency_inputs(model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
    """Fixed, seeded inputs for timing and FLOPs: (inputs, batch size, sequence length or None)."""
    g = torch.Generator().manual_seed(0)
    if data.kind == "causal-lm":
        batch, seq = LM_LATENCY_SHAPE
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}, batch, seq
    if data.kind == "encoder":
        batch, seq = ENCODER_LATENCY_SHAPE
        texts = (data.texts * batch)[:batch]
        enc = tokenizer_of(model)(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return dict(enc), batch, seq
    if data.kind == "classifier" and data.inputs is not None:
        x = data.inputs[:CLASSIFIER_LATENCY_BATCH]
        return x, len(x), None
    raise DataError(f"no latency inputs for a {data.kind!r} model")


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
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)):
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
        elif not quantized_only and isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)):
            n = m.weight.numel()
            bits, elements = bits + m.weight.element_size() * 8 * n, elements + n
    return bits / elements if elements else None


@torch.no_grad()
def measure_model(model: nn.Module, data: EvalData, metrics: tuple[str, ...] | None = None, name: str | None = None,
                  saved_dir: str | os.PathLike | None = None, reference: torch.Tensor | None = None,
                  progress: Progress | None = None) -> ModelMeasurement:
    """Every requested figure of ``model`` (default: all that apply to its kind), measured now.

    ``saved_dir``: the saved checkpoint whose bytes count as the size (saved to a temporary
    folder when not given). ``reference``: the baseline's sentence embeddings; an encoder's
    fidelity is measured only against one (``compare`` supplies it). ``progress(detail,
    fraction)`` is called as the measurement advances.
    """
    progress = progress or (lambda detail, fraction: None)
    info = model_info(model)
    kind = data.kind
    metrics = tuple(metrics or DEFAULT_METRICS.get(kind, DEFAULT_METRICS["module"]))
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
    if {"flops", "latency"} & set(metrics) and kind in ("causal-lm", "encoder", "classifier"):
        inputs, batch, seq = latency_inputs(model, data)
        if "flops" in metrics:
            m.flops = count_flops(model, inputs)
        if "latency" in metrics:
            progress("latency", 0.0)
            m.latency = model_latency(model, inputs, warmup=3, runs=10, min_warmup_s=2.0,
                                      threads=torch.get_num_threads(), batch_size=batch, seq_len=seq)
    # The recipe names a quality figure; each kind answers with its own (a recipe written for
    # an LM, run with --model digits-cnn, still reports accuracy).
    wants_quality = bool(set(metrics) & QUALITY_METRICS)
    if wants_quality and kind == "causal-lm":
        progress("perplexity", 0.0)
        ppl = perplexity(model, data.token_ids, context=PPL_CONTEXT, stride=PPL_STRIDE,
                         progress=lambda done: progress("perplexity", done))
        m.quality["perplexity"] = ppl.perplexity
        m.details["perplexity tokens"] = ppl.tokens
    if wants_quality and kind == "classifier":
        m.quality["accuracy"] = accuracy(model, data.inputs, data.labels)
    if wants_quality and kind == "encoder" and reference is not None:
        fid = embedding_fidelity(encode_sentences(model, tokenizer_of(model), data.texts), reference)
        m.quality.update({"mean_cosine": fid.mean_cosine, "min_cosine": fid.min_cosine,
                          "top1_agreement": fid.top1_agreement})
    return m


def compare(baseline: nn.Module, model: nn.Module, data: EvalData, metrics: tuple[str, ...] | None = None,
            saved_dir: str | os.PathLike | None = None, notes: list[str] | None = None,
            progress: Progress | None = None) -> CompressionReport:
    """Measure ``baseline`` and ``model`` on the same data and return their CompressionReport."""
    progress = progress or (lambda detail, fraction: None)
    base_name = str(model_info(baseline).get("source") or type(baseline).__name__)
    steps = [s.get("type", "?") for s in model_info(model).get("steps", [])]
    base = measure_model(baseline, data, metrics, name=base_name,
                         progress=lambda detail, f: progress(f"baseline {detail}", f))
    reference = None
    if data.kind == "encoder" and set(metrics or DEFAULT_METRICS["encoder"]) & QUALITY_METRICS:
        # Fidelity is measured against the baseline's own embeddings of the same sentences.
        with torch.no_grad():
            reference = encode_sentences(baseline, tokenizer_of(baseline), data.texts)
    comp = measure_model(model, data, metrics, name=" + ".join(steps) or "compressed", saved_dir=saved_dir,
                         reference=reference, progress=lambda detail, f: progress(f"compressed {detail}", f))
    return CompressionReport(baseline=base, compressed=comp, steps=list(model_info(model).get("steps", [])),
                             notes=list(notes or []), environment=environment_info())
