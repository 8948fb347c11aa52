"""Sentence encoders: fed tokenized sentences, measured by embedding fidelity to the baseline.

- calibration: ``n`` texts (default 64) tokenized to ``seq_len`` (default 128, padded), 16 a batch;
- evaluation: up to 512 held-out texts (default: 256 docstring sentences of the eval split);
  the baseline's mean-pooled embeddings are the reference, and the figures are mean / min
  cosine to them and top-1 nearest-neighbour agreement;
- training: batches of training texts, padded to the longest; periodic cosine to the teacher;
- comparison: the mean-pooled sentence embedding, divergence = mean (1 - cosine);
  default KD loss: cosine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import DataError, UnsupportedError
from slimkit.core.io import is_transformers_model, tokenizer_of
from slimkit.tasks.base import EvalData, Progress, Task, epoch_rows, first_tensor, register_task, require_tokenizer
from slimkit.tasks.causal_lm import CausalLMTask, token_example
from slimkit.tasks.metrics import embedding_fidelity, encode_sentences, mean_pool
from slimkit.tasks.sources import DataSpec, TextRecords

ENCODER_LATENCY_SHAPE = (32, 128)
MAX_EVAL_TEXTS = 512


def _texts(records: Any, what: str) -> list[str]:
    if not isinstance(records, TextRecords):
        raise DataError(f"{what} for an encoder must be text; the source gave tensors ({records.description})")
    return [t for t in records.texts if t.strip()]


def _tokenizer(model: nn.Module) -> Any:
    return require_tokenizer(model, "encoder", "pass tokenized batches yourself")


@register_task
class EncoderTask(Task):
    """A transformers encoder whose sentence embedding is the mean of its last hidden states."""

    kind = "encoder"
    divergence_name = "1 − cosine of the sentence embedding"
    default_metrics = ("size", "params", "sparsity", "flops", "latency", "fidelity")
    default_loss = "cosine"
    has_loss = False
    default_corpus = "stdlib"
    text_unit = "sentence"
    output_name = "last_hidden_state"
    token_inputs = True

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Any transformers model that is not a causal LM or an image classifier (``BertModel``, a BERT with a
        classification head): token ids in, hidden states (or logits) out."""
        return (is_transformers_model(model) and not CausalLMTask.claims(model)
                and not type(model).__name__.endswith("ForImageClassification"))

    def calibration(self, model: nn.Module, spec: Any = None) -> CalibrationData:
        """``n`` texts tokenized to ``seq_len`` tokens (padded; padding is left out by the calibrated methods)."""
        spec = DataSpec.parse(spec) if spec is not None else None
        n = (spec.n if spec is not None else None) or 64
        seq_len = (spec.seq_len if spec is not None else None) or 128
        records, description = self.records(model, spec, "calibration", n=n)
        texts = _texts(records, "calibration data")[:n]
        if not texts:
            raise DataError(f"calibration data {description} holds no text")
        tokenizer = _tokenizer(model)
        batches = [dict(tokenizer(texts[i:i + 16], padding="max_length", truncation=True, max_length=seq_len,
                                  return_tensors="pt")) for i in range(0, len(texts), 16)]
        return CalibrationData(batches, description=f"{len(texts)} texts of {description}")

    def eval_data(self, model: nn.Module, data: Any = None, max_tokens: int | None = None,
                  split: str = "eval") -> EvalData:
        """Up to 512 held-out texts (default: 256 sentences of the corpus's eval split, seed 0)."""
        if isinstance(data, EvalData):
            return data
        records, description = self.records(model, data, split, n=256)
        texts = _texts(records, "evaluation data")[:MAX_EVAL_TEXTS]
        if len(texts) < 2:
            raise DataError(f"evaluation data {description} has {len(texts)} text(s); embedding fidelity compares "
                            "neighbours, so it needs at least 2 (one per line, or paragraphs split by blank lines)")
        return EvalData(self.kind, f"{len(texts)} texts of {description}", texts=texts)

    def training_batches(self, model: nn.Module, spec: Any, batch_size: int, seq_len: int, steps: int,
                         seed: int) -> Callable[[int], Any]:
        """Batches of training texts in a seeded order per epoch, padded to the batch's longest."""
        tokenizer = _tokenizer(model)
        records, description = self.records(model, spec, "train", n=10**9)
        texts = _texts(records, "training data")
        if not texts:
            raise DataError(f"training data {description} holds no text")
        perms: dict[int, torch.Tensor] = {}

        def sentence_batch(step: int) -> dict[str, torch.Tensor]:
            rows = epoch_rows(len(texts), batch_size, step, seed, perms)
            return dict(tokenizer([texts[int(i)] for i in rows], padding=True, truncation=True, max_length=seq_len,
                                  return_tensors="pt"))

        return sentence_batch

    def calibration_metric(self, student: nn.Module, teacher: nn.Module, spec: Any,
                           seq_len: int) -> Callable[[nn.Module], dict]:
        """Mean cosine of the student's sentence embeddings to the teacher's on 128 calibration-split texts."""
        tokenizer = tokenizer_of(student)
        if tokenizer is None:
            return lambda module: {}
        records, _ = self.records(student, spec if spec is not None else None, "calibration", n=128)
        texts = _texts(records, "calibration data")[:128]
        if len(texts) < 2:
            return lambda module: {}
        reference = encode_sentences(teacher, tokenizer, texts)

        def calib_cosine(module: nn.Module) -> dict:
            was_training = student.training
            student.eval()
            with torch.no_grad():
                fid = embedding_fidelity(encode_sentences(student, tokenizer, texts), reference)
            student.train(was_training)
            return {"calib_cosine": fid.mean_cosine}

        return calib_cosine

    def example_inputs(self, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random token ids (seeded) and an all-ones attention mask."""
        return token_example(model, batch, seq, seed)

    def latency_inputs(self, model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
        """32 evaluation texts (cycled) padded to 128 tokens."""
        batch, seq = ENCODER_LATENCY_SHAPE
        texts = (data.texts * batch)[:batch]
        enc = _tokenizer(model)(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return dict(enc), batch, seq

    def reference(self, baseline: nn.Module, data: EvalData) -> Any:
        """The baseline's sentence embeddings of the evaluation texts."""
        with torch.no_grad():
            return encode_sentences(baseline, _tokenizer(baseline), data.texts)

    def measure_quality(self, model: nn.Module, data: EvalData, reference: Any = None,
                        progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Embedding fidelity to ``reference`` (nothing without one: an encoder alone has no quality figure)."""
        if reference is None:
            return {}, {}
        with torch.no_grad():
            fid = embedding_fidelity(encode_sentences(model, _tokenizer(model), data.texts), reference)
        return {"mean_cosine": fid.mean_cosine, "min_cosine": fid.min_cosine,
                "top1_agreement": fid.top1_agreement}, {}

    def prediction(self, model: nn.Module, output: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """The mean-pooled sentence embedding (padding left out)."""
        tensor = first_tensor(output, "the model output")
        if tensor.dim() == 3:
            if mask is None:
                mask = torch.ones(tensor.shape[:2], device=tensor.device)
            return mean_pool(tensor, mask)
        return tensor

    def divergence(self, reference: torch.Tensor, new: torch.Tensor) -> float:
        """Mean (1 - cosine) between the two embeddings (float64)."""
        ref, out = reference.double(), new.double()
        return float((1 - torch.nn.functional.cosine_similarity(ref, out, dim=-1)).mean())

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """An encoder has no loss of its own to differentiate."""
        raise UnsupportedError("taylor importance on an encoder needs gradients of your own objective: run "
                               "loss.backward() first (so every weight has .grad), or use importance 'l1'")
