"""Quality of a (compressed) model: perplexity, accuracy, embedding fidelity.

Perplexity follows ALGORITHMS.md: exp(mean NLL over predicted tokens), sliding windows
with a stated context and stride, no token counted twice and none missed. Reductions run
in float64 so that comparing a compressed model with its baseline measures the model, not
the summation order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import DataError, UnsupportedError


def _device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _output_tensor(out: Any, attribute: str, what: str) -> torch.Tensor:
    """The ``attribute`` tensor of a model output (``.logits``, ``.last_hidden_state``), its first tuple item, or itself."""
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, attribute, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedError(
        f"cannot find {what} in a model output of type {type(out).__name__}: expected a tensor, "
        f"an object with .{attribute}, or a tuple whose first item is it"
    )


def _logits(out: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits``, or a tuple (first item)."""
    return _output_tensor(out, "logits", "logits")


class _EvalMode:
    """Put a module in eval mode for a block and restore its previous mode (and submodules')."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, training in self.modes:
            module.training = training


# ---------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a text: exp of the mean NLL (nats/token) over ``tokens`` predicted tokens."""

    perplexity: float
    nll: float
    tokens: int
    context: int
    stride: int  # the stride actually used (see perplexity())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-ready)."""
        return dataclasses.asdict(self)


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n`` tokens as (start, first predicted, end) with end exclusive.

    All windows have length ``min(context, n)``. Each starts ``stride`` after the previous
    one and predicts only the positions not predicted before; the last is moved back to end
    exactly at ``n`` so it keeps a full context instead of being a short partial window.
    """
    length = min(context, n)
    windows = []
    start, predicted_until = 0, 1  # position 0 has no history and is never predicted
    while True:
        end = start + length
        windows.append((start, predicted_until, end))
        predicted_until = end
        if end >= n:
            return windows
        start = min(start + stride, n - length)


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    context: int = 256,
    stride: int = 128,
    batch_size: int = 8,
    progress: Callable[[float], None] | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on one tokenized text.

    ``token_ids`` is the 1-D id tensor of the whole text. Windows hold ``context`` tokens;
    the first predicts its tokens 1..context-1, each later one starts ``stride`` tokens
    later and predicts only tokens not yet predicted, so every token from position 1 on is
    predicted exactly once with up to ``context - 1`` tokens of history. A token must be
    predicted from at least one token of its own window, so a ``stride`` equal to
    ``context`` moves by ``context - 1`` (the stride recorded in the result). The model is
    called as ``model(input_ids=batch)``; windows of equal length are batched
    ``batch_size`` at a time. NLL is taken in float64 from float32 logits.
    ``progress(fraction)`` is called after each batch of windows.
    """
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1:
        raise DataError(f"token_ids must be a 1-D tensor of a whole text, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DataError(f"token_ids must hold integer token ids, got dtype {ids.dtype}")
    n = ids.numel()
    if n < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {n}")
    if context < 2:
        raise DataError(f"context must be >= 2 (one token of history and one to predict), got {context}")
    if not 0 < stride <= context:
        raise DataError(f"stride must be in (0, context={context}], got {stride}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")

    step = min(stride, context - 1)
    windows = _windows(n, context, step)
    ids = ids.to(device=_device_of(model), dtype=torch.long)
    total_nll = torch.zeros((), dtype=torch.float64)
    counted = 0
    with _EvalMode(model), torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            batch = torch.stack([ids[s:e] for s, _, e in chunk])  # (B, L)
            logits = _logits(model(input_ids=batch))
            if logits.dim() != 3 or logits.shape[:2] != batch.shape:
                raise UnsupportedError(
                    f"expected logits of shape (batch, seq, vocab) = ({batch.shape[0]}, {batch.shape[1]}, V), "
                    f"got {tuple(logits.shape)}"
                )
            for row, (s, first, e) in enumerate(chunk):
                # logits at position t predict token t+1, so targets first..e-1 use rows first-1-s..e-2-s.
                pred = logits[row, first - 1 - s : e - 1 - s].float().to(torch.float64)
                logp = torch.log_softmax(pred, dim=-1)
                target = ids[first:e].unsqueeze(-1)
                total_nll += -logp.gather(-1, target).sum().cpu()
                counted += e - first
            if progress is not None:
                progress(min(1.0, (i + batch_size) / len(windows)))
    if counted != n - 1:  # the window arithmetic guarantees this; a miss here is a bug
        raise AssertionError(f"perplexity predicted {counted} tokens, expected {n - 1}")
    nll = float(total_nll) / counted
    ppl = math.exp(nll) if nll < 709.0 else math.inf  # exp overflows a float64 past ~709.78
    return PerplexityResult(perplexity=ppl, nll=nll, tokens=counted, context=context, stride=step)


# ---------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256) -> float:
    """Fraction of ``inputs`` whose argmax logit equals ``labels`` (eval mode, no grad)."""
    labels = torch.as_tensor(labels)
    if len(inputs) == 0:
        raise DataError("accuracy needs at least one example, got none")
    if len(inputs) != len(labels):
        raise DataError(f"accuracy: {len(inputs)} inputs but {len(labels)} labels")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model)
    correct = 0
    with _EvalMode(model), torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            logits = _logits(model(inputs[i : i + batch_size].to(device)))
            pred = logits.argmax(dim=-1).cpu()
            correct += int((pred == labels[i : i + batch_size].cpu()).sum())
    return correct / len(inputs)


# ---------------------------------------------------------------------------------------
# Sentence embeddings
# ---------------------------------------------------------------------------------------


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over non-padding tokens: (B, T, H), (B, T) -> (B, H).

    As in sentence-transformers: padding positions (mask 0) are excluded and the count is
    clamped so an all-padding row gives zeros instead of NaN.
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, T, 1)
    summed = (last_hidden_state * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return summed / count


def _hidden(out: Any) -> torch.Tensor:
    """Token states from an encoder output: ``.last_hidden_state``, a tuple's first item, or a tensor."""
    return _output_tensor(out, "last_hidden_state", "token states")


def encode_sentences(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    normalize: bool = False,
) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N, H) of ``texts`` from an encoder, in float32.

    Texts are tokenized ``batch_size`` at a time with padding and truncation to
    ``max_length``; the model is called as ``model(**batch)``. With ``normalize`` each row
    is scaled to unit L2 norm.
    """
    if isinstance(texts, str):
        raise DataError("texts must be a sequence of strings, got a single string")
    texts = list(texts)
    if not texts:
        raise DataError("encode_sentences needs at least one text, got none")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model)
    rows = []
    with _EvalMode(model), torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(device) for k, v in dict(enc).items()}
            hidden = _hidden(model(**batch))
            mask = batch.get("attention_mask")
            if mask is None:  # a tokenizer without a mask pads nothing we can tell apart
                mask = torch.ones(hidden.shape[:2], device=hidden.device)
            rows.append(mean_pool(hidden.float(), mask).cpu())
    emb = torch.cat(rows)
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return emb


@dataclasses.dataclass(frozen=True)
class EmbeddingFidelity:
    """Agreement of embeddings with reference ones (e.g. compressed vs fp32 encoder)."""

    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-ready)."""
        return dataclasses.asdict(self)


# Cosines closer than this count as a tie when comparing nearest neighbours: rescaling a
# row moves its cosines by ~1e-16, which must not flip a tie between duplicate rows.
_TIE_TOL = 1e-9


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm in float64; an all-zero row stays zero (cosine 0 with anything)."""
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), torch.zeros_like(x))


def embedding_fidelity(embeddings: torch.Tensor, reference: torch.Tensor) -> EmbeddingFidelity:
    """Row-wise cosine to ``reference`` and top-1 nearest-neighbour agreement, in float64.

    For each row i the nearest other row j != i (by cosine) is found under each set; row i
    agrees when the two choices coincide. Rows tied for nearest (e.g. duplicate sentences,
    within 1e-9 in cosine) all count, so an arbitrary tie-break never decides agreement.
    """
    emb = torch.as_tensor(embeddings).detach().cpu().to(torch.float64)
    ref = torch.as_tensor(reference).detach().cpu().to(torch.float64)
    if emb.dim() != 2 or emb.shape != ref.shape:
        raise DataError(
            f"embeddings and reference must be 2-D of the same shape, got {tuple(emb.shape)} and {tuple(ref.shape)}"
        )
    n = emb.shape[0]
    if n < 2:
        raise DataError(f"embedding fidelity needs at least 2 rows (for nearest neighbours), got {n}")
    if not (torch.isfinite(emb).all() and torch.isfinite(ref).all()):
        raise DataError("embeddings contain NaN or infinite values")

    e, r = _unit_rows(emb), _unit_rows(ref)
    cos = (e * r).sum(dim=1).clamp(-1.0, 1.0)  # rounding can land a hair outside [-1, 1]

    eye = torch.eye(n, dtype=torch.bool)
    sim_e = (e @ e.T).masked_fill(eye, -math.inf)
    sim_r = (r @ r.T).masked_fill(eye, -math.inf)
    near_e = sim_e >= sim_e.max(dim=1, keepdim=True).values - _TIE_TOL  # (n, n) nearest sets
    near_r = sim_r >= sim_r.max(dim=1, keepdim=True).values - _TIE_TOL
    agrees = (near_e & near_r).any(dim=1)
    return EmbeddingFidelity(
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        top1_agreement=float(agrees.double().mean()),
        n=n,
    )
