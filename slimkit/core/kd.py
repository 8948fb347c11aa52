"""The knowledge-distillation divergence (Hinton et al. 2015) and the checks the loss functions share.

``softmax_kl`` and ``kd_loss`` are pure functions on logits; distillation's loss modules and
QAT's label-free training (``QATTrain``) both use them, so they live below both families.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimkit.core.errors import ConfigError, DataError

IGNORE_INDEX = -100  # torch's and transformers' "no label here" value

# --- validation helpers ----------------------------------------------------------------------


def _number(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


def _positive(owner: str, name: str, value: object) -> float:
    v = _number(owner, name, value)
    if v <= 0:
        raise ConfigError(f"{owner}: {name} must be > 0, got {value!r}")
    return v


def _non_negative(owner: str, name: str, value: object) -> float:
    v = _number(owner, name, value)
    if v < 0:
        raise ConfigError(f"{owner}: {name} must be >= 0, got {value!r}")
    return v


def _unit(owner: str, name: str, value: object) -> float:
    v = _number(owner, name, value)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{owner}: {name} must be in [0, 1], got {value!r}")
    return v


def _dims(owner: str, student_dim: object, teacher_dim: object) -> tuple[int, int] | None:
    """``(student_dim, teacher_dim)`` when a projector is needed, None when not; ConfigError when half given."""
    if student_dim is None and teacher_dim is None:
        return None
    if student_dim is None or teacher_dim is None:
        raise ConfigError(f"{owner}: pass both student_dim and teacher_dim (or neither), got "
                          f"student_dim={student_dim!r}, teacher_dim={teacher_dim!r}")
    for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{owner}: {name} must be a positive integer (the feature's channel count), "
                              f"got {value!r}")
    return (student_dim, teacher_dim) if student_dim != teacher_dim else None


def _float(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast to one common dtype of at least float32 (bf16/fp16 sums lose too much)."""
    dtype = torch.float32
    for t in tensors:
        if not t.is_floating_point():
            raise DataError(f"expected floating-point logits/features, got a {t.dtype} tensor of shape "
                            f"{tuple(t.shape)}")
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """An exact 0 that is still connected to ``x``'s graph, so ``backward()`` works on an all-masked batch."""
    return x.flatten()[:0].sum()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _keep_mask(mask: torch.Tensor | None, lead: torch.Size, owner: str, what: str) -> torch.Tensor | None:
    """``mask`` as a bool tensor (non-zero = keep) after checking it has the leading shape ``lead``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(lead):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DataError(f"{owner}: mask of shape {got} does not match the {what} {tuple(lead)}; "
                        "pass one 1/0 (or True/False) entry per row, e.g. the attention_mask")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_labels(labels: torch.Tensor, lead: torch.Size, classes: int, owner: str) -> torch.Tensor:
    """``labels`` as int64 after checking shape, dtype and range (-100 or a class index in [0, classes))."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(lead):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DataError(f"{owner}: labels of shape {got} do not match the logits' leading shape {tuple(lead)}; "
                        "pass one class index (or -100 to ignore) per row")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"{owner}: labels must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    real = labels[labels != IGNORE_INDEX]
    # Checked here because an out-of-range target is a device-side assert on CUDA, not a readable error.
    if real.numel() and bool(((real < 0) | (real >= classes)).any()):
        raise DataError(f"{owner}: labels must be -100 or class indices in [0, {classes}), got values in "
                        f"[{int(real.min())}, {int(real.max())}]")
    return labels


# --- logit distillation -------------------------------------------------------------------------


def softmax_kl(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL(softmax(a/T) ‖ softmax(b/T)) over the last axis, a = ``target_logits``, b = ``input_logits``.

    Returns the leading shape (one value per row), in at least float32, clamped at 0 (the exact
    value is >= 0; the clamp only removes rounding noise). Computed from log-softmaxes, so logits
    of ±1e4 stay finite; a class with target probability 0 contributes 0 (0·log 0 = 0). Gradients
    flow into both arguments: callers detach the teacher.
    """
    a, b = _float(target_logits, input_logits)
    log_p = F.log_softmax(a / temperature, dim=-1)
    log_q = F.log_softmax(b / temperature, dim=-1)
    if bool(torch.isfinite(log_p).all()):
        # The fused kernel: half the time of the explicit form on LM-sized logits.
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).clamp_min(0.0)
    p = log_p.exp()
    # A -inf logit (p = 0): where() before the product gives 0, not 0·inf = NaN, forward and backward.
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1).clamp_min(0.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, *, temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """Hinton et al. 2015 KD: α·CE(y, z_s) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)).

    Logits are (N, C) or (B, T, C); leading axes are flattened to rows. The KL term is averaged
    over the rows kept by ``mask`` (same leading shape, non-zero = keep; padding rows out),
    like ``kl_div(..., reduction="batchmean")`` over kept rows. The CE term is the mean over
    rows that are kept and whose label is not -100 (torch's ignore_index), on un-tempered
    logits. ``labels`` None drops the CE term and gives the KD term weight 1 (alpha is then
    unused; alpha=1 with no labels is a DataError, since nothing would be learned). A term with
    no row to average over is 0. The teacher is detached.
    """
    owner = "kd_loss"
    temperature = _positive(owner, "temperature", temperature)
    alpha = _unit(owner, "alpha", alpha)
    if student_logits.shape != teacher_logits.shape:
        raise DataError(f"{owner}: student logits {_shape(student_logits)} and teacher logits "
                        f"{_shape(teacher_logits)} differ; they need the same rows and classes "
                        "(same label set, same batch)")
    if student_logits.dim() < 2:
        raise DataError(f"{owner}: logits must be (N, C) or (B, T, C), got shape {_shape(student_logits)}")
    lead, classes = student_logits.shape[:-1], student_logits.shape[-1]
    keep = _keep_mask(mask, lead, owner, "logits' leading shape")
    s, t = _float(student_logits, teacher_logits.detach())
    s, t = s.reshape(-1, classes), t.reshape(-1, classes)  # (rows, C)
    keep = keep.reshape(-1) if keep is not None else None

    kl = softmax_kl(t, s, temperature)  # (rows,)
    if keep is not None:
        kl = kl * keep
        n_kd = keep.sum().clamp_min(1)  # clamp: an all-padding batch gives 0, not 0/0
    else:
        n_kd = kl.shape[0] if kl.shape[0] else 1
    kd = kl.sum() / n_kd * temperature**2

    if labels is None:
        if alpha == 1.0:
            raise DataError(f"{owner}: alpha=1 keeps only the cross-entropy term, which needs labels; "
                            "pass labels or lower alpha")
        return kd
    y = _check_labels(labels, lead, classes, owner).reshape(-1)
    if keep is not None:
        y = y.masked_fill(~keep, IGNORE_INDEX)
    # sum / count rather than reduction="mean" so a batch with no label gives 0, not NaN.
    n_ce = (y != IGNORE_INDEX).sum().clamp_min(1)
    ce = F.cross_entropy(s, y, ignore_index=IGNORE_INDEX, reduction="sum") / n_ce
    return alpha * ce + (1.0 - alpha) * kd


