"""Causal language models: fed token windows, measured by perplexity, compared on next-token logits.

- calibration: ``n`` windows of ``seq_len`` tokens drawn (seeded) from the source's texts,
  joined with the eos token;
- evaluation: sliding-window perplexity (context 256, stride 128) on the first
  ``max_tokens`` tokens of the held-out text;
- training: random windows of the training text; periodic evaluation on held-out text;
- comparison: logits, divergence = mean KL; Taylor's loss = the LM loss; default KD loss:
  token-level forward KL.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData, tokenize_texts
from slimkit.core.errors import DataError, UnsupportedError
from slimkit.core.io import is_transformers_model, tokenizer_of
from slimkit.tasks.base import EvalData, Progress, Task, require_tokenizer, register_task
from slimkit.tasks.metrics import perplexity
from slimkit.tasks.sources import DataSpec, TextRecords, is_builtin_name

DEFAULT_EVAL_TOKENS = 65536
PPL_CONTEXT, PPL_STRIDE = 256, 128
LM_LATENCY_SHAPE = (1, 256)  # batch, sequence length of one timed forward (a prefill)
MIN_EVAL_TOKENS = 32  # below this a perplexity says nothing; refuse rather than report it
IGNORE_INDEX = -100


def _texts(records: Any, what: str) -> list[str]:
    if not isinstance(records, TextRecords):
        raise DataError(f"{what} for a causal LM must be text; the source gave tensors ({records.description})")
    return records.texts


def _tokenizer(model: nn.Module) -> Any:
    return require_tokenizer(model, "causal LM", "pass token batches yourself")


@torch.no_grad()
def windowed_loss(model: nn.Module, ids: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token NLL over the first ``max_windows`` non-overlapping windows of ``ids`` (model mode kept)."""
    was_training = model.training
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise DataError(f"{len(ids)} tokens hold no window of seq_len={seq_len}")
    x = ids[: n * seq_len].view(n, seq_len).to(next(model.parameters()).device)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        batch = x[i : i + 8]
        out = model(input_ids=batch, labels=batch)
        tokens = batch.numel() - batch.shape[0]  # the first token of each window is not predicted
        total += out.loss.item() * tokens
        count += tokens
    model.train(was_training)
    return total / count


def token_stream(texts: list[str], tokenizer: Any, max_tokens: int | None = None, *, chunk: int = 1,
                 truncate: bool = True) -> torch.Tensor:
    """The texts as one id stream (eos after each), tokenized ``chunk`` texts at a time until ``max_tokens``
    are in (the result is the same prefix as tokenizing everything), cut to ``max_tokens`` with ``truncate``."""
    parts, count = [], 0
    # A token is rarely longer than 32 characters: cutting each text there bounds the tokenizer's work and
    # memory (a 50 MB one-line file is otherwise tokenized whole) without changing the first max_tokens.
    limit = None if max_tokens is None else max(4096, 32 * max_tokens)
    for i in range(0, len(texts), chunk):
        batch = texts[i:i + chunk] if limit is None else [t[:limit] for t in texts[i:i + chunk]]
        parts.append(tokenize_texts(batch, tokenizer))
        count += len(parts[-1])
        if max_tokens is not None and count >= max_tokens:
            break
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    ids = torch.cat(parts)
    return ids[:max_tokens] if max_tokens is not None and truncate else ids


@register_task
class CausalLMTask(Task):
    """A decoder-only language model (any transformers ``...ForCausalLM``)."""

    kind = "causal-lm"
    default_metrics = ("size", "params", "sparsity", "flops", "latency", "perplexity")
    default_loss = "forward_kl"
    losses = ("kd", "cosine", "forward_kl", "reverse_kl", "mixed_kl")
    default_corpus = "stdlib"
    output_name = "logits"
    token_inputs = True
    uses_cache = True
    generates = True

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """transformers classes named ``...ForCausalLM`` / ``...LMHeadModel``."""
        name = type(model).__name__
        return name.endswith(("ForCausalLM", "LMHeadModel"))

    def calibration(self, model: nn.Module, spec: Any = None) -> CalibrationData:
        """``n`` (default 64) windows of ``seq_len`` (default 256) tokens from the source, seeded.

        A source with fewer windows than ``n`` gives all it has (said in the description);
        one with fewer tokens than one window is refused, naming both counts.
        """
        spec = DataSpec.parse(spec) if spec is not None else None
        n = (spec.n if spec is not None else None) or 64
        seq_len = (spec.seq_len if spec is not None else None) or 256
        seed = spec.seed if spec is not None else 0
        records, description = self.records(model, spec, "calibration")
        tokenizer = _tokenizer(model)
        texts = [t for t in _texts(records, "calibration data") if t]
        # A built-in split is tokenized whole (the shipped recipes' windows); a user's source only as far
        # as 4x the tokens the windows need, so a huge file costs no more than a small one.
        cap = None if _is_builtin(spec) else 4 * n * seq_len
        ids = token_stream(texts, tokenizer, max_tokens=cap, chunk=256)
        windows = len(ids) // seq_len
        if windows < 1:
            raise DataError(f"calibration data {description} has {len(ids)} tokens; one calibration window needs "
                            f"seq_len={seq_len} tokens: give more text or a smaller seq_len")
        chosen = sorted(random.Random(seed).sample(range(windows), min(n, windows)))
        stacked = torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in chosen])
        batches = [{"input_ids": stacked[i:i + 8]} for i in range(0, len(chosen), 8)]
        short = f" (only {windows} available of the {n} asked for)" if windows < n else ""
        return CalibrationData(batches, description=f"{description}: {len(chosen)} x {seq_len} tokens{short} "
                                                    f"(seed {seed})")

    def eval_data(self, model: nn.Module, data: Any = None, max_tokens: int | None = None,
                  split: str = "eval") -> EvalData:
        """The first ``max_tokens`` (default 65,536) tokens of the held-out text (default: the corpus's eval split)."""
        if isinstance(data, EvalData):
            return data
        max_tokens = max_tokens or DEFAULT_EVAL_TOKENS
        records, description = self.records(model, data, split)
        ids = token_stream(_texts(records, "evaluation data"), _tokenizer(model), max_tokens)
        if len(ids) < MIN_EVAL_TOKENS:
            raise DataError(f"evaluation data {description} gives {len(ids)} tokens; a perplexity needs at least "
                            f"{MIN_EVAL_TOKENS}: give more text")
        note = f" (fewer than one {PPL_CONTEXT}-token context: a noisy figure)" if len(ids) <= PPL_CONTEXT else ""
        desc = f"{description}, first {len(ids):,} tokens, context {PPL_CONTEXT}, stride {PPL_STRIDE}{note}"
        return EvalData(self.kind, desc, token_ids=ids)

    def training_batches(self, model: nn.Module, spec: Any, batch_size: int, seq_len: int, steps: int,
                         seed: int) -> Callable[[int], Any]:
        """Random windows of ``seq_len`` tokens (seeded per step) from the training text.

        The train split of a built-in corpus is tokenized in a seeded file order until twice
        the tokens the run reads; a user's source is read whole, its last 5% of texts held out
        for the periodic evaluation.
        """
        tokenizer = _tokenizer(model)
        records, description = self.records(model, spec, "train")
        texts = _texts(records, "training data")
        if not _is_builtin(spec):
            texts = _held_out(texts)[0]
        else:
            texts = list(texts)
            random.Random(seed).shuffle(texts)
        # Twice the tokens the run reads, so windows seldom repeat, without tokenizing a whole corpus.
        ids = token_stream(texts, tokenizer, max_tokens=2 * steps * batch_size * seq_len, chunk=32, truncate=False)
        if len(ids) <= seq_len + 1:
            raise DataError(f"training data {description} has {len(ids)} tokens; a training window needs "
                            f"seq_len + 1 = {seq_len + 1}")

        def lm_batch(step: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed * 7919 + step)
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
            return {"input_ids": torch.stack([ids[s:s + seq_len] for s in starts.tolist()])}

        return lm_batch

    def calibration_metric(self, student: nn.Module, teacher: nn.Module, spec: Any,
                           seq_len: int) -> Callable[[nn.Module], dict]:
        """Perplexity on up to 16 windows of held-out text (the corpus's calibration split, or the held-out
        tail of a user's training source)."""
        tokenizer = tokenizer_of(student)
        if tokenizer is None:
            return lambda module: {}
        if not _is_builtin(spec):
            records, _ = self.records(student, spec, "train")
            texts = _held_out(_texts(records, "training data"))[1]
        else:
            records, _ = self.records(student, spec, "calibration")
            texts = _texts(records, "calibration data")[:20]
        ids = token_stream(texts, tokenizer, max_tokens=16 * seq_len + 1)
        if (len(ids) - 1) // seq_len < 1:
            return lambda module: {}
        return lambda module: {"calib_ppl": math.exp(windowed_loss(student, ids, seq_len, 16))}

    def example_inputs(self, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random token ids (seeded) below the vocabulary size and an all-ones attention mask."""
        return token_example(model, batch, seq, seed)

    def generation_prompt(self, model: nn.Module, data: EvalData, tokens: int) -> torch.Tensor | None:
        """The first ``tokens`` tokens of the held-out stream (seeded random ids when it is shorter)."""
        ids = data.token_ids
        if ids is not None and ids.numel() >= tokens:
            return ids[:tokens].reshape(1, -1).long()
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
        return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def latency_inputs(self, model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
        """A 1 x 256 prefill of seeded random token ids."""
        batch, seq = LM_LATENCY_SHAPE
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}, batch, seq

    def measure_quality(self, model: nn.Module, data: EvalData, reference: Any = None,
                        progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Sliding-window perplexity on the evaluation token stream."""
        progress = progress or (lambda detail, fraction: None)
        ppl = perplexity(model, data.token_ids, context=PPL_CONTEXT, stride=PPL_STRIDE,
                         progress=lambda done: progress("perplexity", done))
        return {"perplexity": ppl.perplexity}, {"perplexity tokens": ppl.tokens}

    def labels(self, inputs: Any, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The input ids themselves (the model shifts them); padding predicts nothing."""
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            return None
        labels = inputs["input_ids"]
        return labels.masked_fill(mask == 0, IGNORE_INDEX) if mask is not None else labels

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's own LM loss on the batch (labels = its input ids, padding ignored)."""
        named = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
        labels = named.pop("labels", None)
        if labels is None:
            labels = self.labels(named, named.get("attention_mask"))
        return model(**named, labels=labels).loss


def token_example(model: nn.Module, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random token ids of shape (batch, seq) below ``config.vocab_size``, with an all-ones mask."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or not is_transformers_model(model):
        raise UnsupportedError(f"cannot make token ids for {type(model).__name__}: it has no config.vocab_size; "
                               "pass example=")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _is_builtin(spec: Any) -> bool:
    """Whether ``spec`` names a built-in corpus (None: the model's own corpus)."""
    return spec is None or is_builtin_name(DataSpec.parse(spec).source)


def _held_out(texts: list[str]) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the last 5% of a user's texts (at least one when there are two)."""
    if len(texts) < 2:
        return list(texts), []
    k = max(1, len(texts) // 20)
    return list(texts[:-k]), list(texts[-k:])
