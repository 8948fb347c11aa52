"""Distillation losses: pure tensor functions (the maths) and thin ``nn.Module`` wrappers.

Every loss returns a scalar tensor computed in at least float32 (bf16 / fp16 inputs are
upcast; float64 stays float64), and never sends a gradient into the teacher: teacher
tensors are detached inside. The modules hold the hyper-parameters (validated in
``__init__``, ConfigError naming the argument) and, for HintLoss / CosineEmbeddingLoss,
a learned projector; shapes are checked in ``forward`` (DataError naming both shapes).
Below, p = softmax(z_t / T) is the teacher's distribution, q = softmax(z_s / T) the
student's, KL(a‖b) = Σ_c a_c (log a_c − log b_c).

KDLoss / kd_loss — Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network":
    L = α·CE(y, z_s) + (1 − α)·T²·KL(p‖q), the KL averaged over rows ("batchmean").
    T² keeps the soft-target gradient, T·(q − p) ≈ (z_s − z_t)/C for large T, the same size
    whatever T is. CE uses the un-tempered logits.
TokenKDLoss / token_kd_loss — token-level KD for causal LMs:
    L = α·CE_shifted + (1 − α)·T²·mean over predicted tokens of D, with D one of
    forward KL(p‖q) (the word-level KD of Hinton 2015 / Kim & Rush 2016),
    reverse KL(q‖p) (MiniLLM, Gu et al. 2023) or "mix" = β·KL(p‖q) + (1 − β)·KL(q‖p)
    (a convex combination of the two KLs; not the skew KL of DistiLLM nor a JSD).
HintLoss / hint_loss — FitNets, Romero et al. 2015: L = mean over elements of (F_t − r(F_s))²,
    r the identity or a learned linear map on the channel axis (a 1×1 convolution for maps).
AttentionTransferLoss / at_loss — Zagoruyko & Komodakis 2017, "Paying More Attention to Attention":
    A(F) = vec(Σ_c |F_c|^p) / ‖vec(Σ_c |F_c|^p)‖₂, L = β/2 · mean over (batch, position) of (A_s − A_t)².
RKDLoss / rkd_loss — Park et al. 2019, "Relational Knowledge Distillation":
    ψ_D(i, j) = ‖t_i − t_j‖ / μ, ψ_A(i, j, k) = cos∠(t_i − t_j, t_k − t_j),
    L = w_D · Huber(ψ_D(s), ψ_D(t)) + w_A · Huber(ψ_A(s), ψ_A(t)) (Huber with δ = 1, i.e. smooth-L1).
SimilarityLoss / similarity_loss — Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation":
    G = row-L2-normalized F·Fᵀ (N × N), L = ‖G_t − G_s‖²_F / N².
CosineEmbeddingLoss / cosine_embedding_loss — DistilBERT's cosine loss, Sanh et al. 2019:
    L = mean over kept rows of 1 − cos(r(e_s), e_t).

Projectors (HintLoss, CosineEmbeddingLoss): pass ``student_dim`` and ``teacher_dim``; when they
differ, an ``nn.Linear(student_dim, teacher_dim)`` is built in ``__init__`` (so its parameters
exist before the optimizer is built: add ``loss.parameters()`` to it) and applied on the channel
axis. One design for every feature rank: applied on axis 1 of an (N, C, H, W) map it is exactly a
1×1 Conv2d, on the last axis of (N, D) / (N, T, D) it is a Linear. No projector is ever built
lazily, so no ``prepare`` step is needed.

Channel axis convention (HintLoss, AttentionTransferLoss): rank 2 (N, D) and rank 3 (N, T, D)
features have their channels last (transformer hidden states); rank >= 4 (N, C, H, W, ...)
features have them on axis 1 (convolution maps).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError, DataError, closest

__all__ = [
    "AttentionTransferLoss",
    "CosineEmbeddingLoss",
    "HintLoss",
    "KDLoss",
    "RKDLoss",
    "SimilarityLoss",
    "TokenKDLoss",
    "angle_potential",
    "at_loss",
    "attention_map",
    "cosine_embedding_loss",
    "hint_loss",
    "kd_loss",
    "pairwise_distance_potential",
    "rkd_angle",
    "rkd_distance",
    "rkd_loss",
    "similarity_loss",
    "similarity_matrix",
    "softmax_kl",
    "token_divergence",
    "token_kd_loss",
]

from slimkit.core.kd import (  # noqa: F401  (the KD divergence lives in core: QATTrain uses it too)
    IGNORE_INDEX,
    _check_labels,
    _dims,
    _float,
    _keep_mask,
    _non_negative,
    _number,
    _positive,
    _shape,
    _unit,
    _zero_like_graph,
    kd_loss,
    softmax_kl,
)

DIVERGENCES = ("forward", "reverse", "mix")


class KDLoss(nn.Module):
    """Response (logit) KD, Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    L = α·CE(y, z_s) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), KL averaged over rows.
    temperature T > 0 softens both distributions (T² keeps the gradient size independent of T);
    alpha in [0, 1] weighs the hard-label cross-entropy. ``forward(student_logits,
    teacher_logits, labels=None, mask=None)``: see ``kd_loss`` for shapes, masking, -100 labels
    and the labels=None rule (KD term alone, weight 1).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        self.temperature = _positive("KDLoss", "temperature", temperature)
        self.alpha = _unit("KDLoss", "alpha", alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar KD loss of a batch (teacher detached)."""
        return kd_loss(student_logits, teacher_logits, labels, mask, temperature=self.temperature, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward",
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher p = softmax(z_t/T) and student q = softmax(z_s/T).

    "forward": KL(p‖q) (mean-seeking, Hinton 2015 / Kim & Rush 2016 word-level KD);
    "reverse": KL(q‖p) (mode-seeking, MiniLLM, Gu et al. 2023);
    "mix": β·KL(p‖q) + (1 − β)·KL(q‖p), a convex combination of the two KLs.
    Returns the logits' leading shape, without the T² factor. The teacher is detached.
    """
    owner = "token_divergence"
    if divergence not in DIVERGENCES:
        raise ConfigError(f"{owner}: divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}"
                          f"{closest(str(divergence), DIVERGENCES)}")
    temperature = _positive(owner, "temperature", temperature)
    beta = _unit(owner, "beta", beta)
    teacher_logits = teacher_logits.detach()
    if divergence == "forward":
        return softmax_kl(teacher_logits, student_logits, temperature)
    if divergence == "reverse":
        return softmax_kl(student_logits, teacher_logits, temperature)
    return (beta * softmax_kl(teacher_logits, student_logits, temperature)
            + (1.0 - beta) * softmax_kl(student_logits, teacher_logits, temperature))


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, *, divergence: str = "forward", temperature: float = 1.0,
                  alpha: float = 0.0, beta: float = 0.5) -> torch.Tensor:
    """Token-level KD for causal LMs: α·CE_shifted + (1 − α)·T²·(mean over predicted tokens of D).

    Logits (B, T, V); ``mask`` (B, T) the attention_mask (1 = real token); ``labels`` (B, T) token
    ids, -100 = ignore. Causal shift: logits at position t predict token t+1, so both terms use
    positions t in [0, T−1) — the CE term compares logits[:, :-1] with labels[:, 1:], exactly
    what transformers' ``LlamaForCausalLM(labels=...)`` computes. A position counts (in BOTH
    terms) when mask[:, t] and mask[:, t+1] are 1 and, if labels are given, labels[:, t+1] !=
    -100; so prompt tokens labelled -100 are left out of the divergence too (as TRL's GKD does).
    Each term is a sum over counted tokens divided by their number, never averaged over padding;
    with no counted token it is 0. ``labels`` None drops CE and gives D weight 1. D is
    ``token_divergence``. Teacher and student must share the vocabulary (same V).
    """
    owner = "token_kd_loss"
    temperature = _positive(owner, "temperature", temperature)
    alpha = _unit(owner, "alpha", alpha)
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise DataError(f"{owner}: logits must be (batch, seq_len, vocab), got student {_shape(student_logits)} "
                        f"and teacher {_shape(teacher_logits)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise DataError(f"{owner}: student vocabulary size {student_logits.shape[-1]} != teacher vocabulary size "
                        f"{teacher_logits.shape[-1]}; teacher and student must share a tokenizer/vocabulary "
                        "(if one model only pads its vocabulary, slice both logits to the shared size first)")
    if student_logits.shape != teacher_logits.shape:
        raise DataError(f"{owner}: student logits {_shape(student_logits)} and teacher logits "
                        f"{_shape(teacher_logits)} differ in batch or sequence length; run both on the same batch")
    b, length, vocab = student_logits.shape
    keep = _keep_mask(mask, student_logits.shape[:2], owner, "logits' (batch, seq_len)")
    # Position t predicts token t+1: both the predicting and the predicted token must be real.
    counted = torch.ones(b, max(length - 1, 0), dtype=torch.bool, device=student_logits.device)
    if keep is not None:
        counted = keep[:, :-1] & keep[:, 1:]
    y = None
    if labels is not None:
        y = _check_labels(labels, student_logits.shape[:2], vocab, owner)[:, 1:]
        counted = counted & (y != IGNORE_INDEX)
    n = counted.sum().clamp_min(1)  # clamp: a batch with nothing to predict gives 0, not 0/0

    s, t = _float(student_logits[:, :-1], teacher_logits[:, :-1].detach())  # (B, T-1, V)
    d = token_divergence(s, t, divergence, temperature, beta)  # (B, T-1)
    kd = (d * counted).sum() / n * temperature**2
    if y is None:
        if alpha == 1.0:
            raise DataError(f"{owner}: alpha=1 keeps only the cross-entropy term, which needs labels; "
                            "pass labels or lower alpha")
        return kd
    y = y.masked_fill(~counted, IGNORE_INDEX)
    ce = F.cross_entropy(s.reshape(-1, vocab), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum") / n
    return alpha * ce + (1.0 - alpha) * kd


class TokenKDLoss(nn.Module):
    """Token-level KD for causal LMs (see ``token_kd_loss`` for the shift, masking and averaging).

    divergence: "forward" KL(p_t‖p_s) (word-level KD, Hinton et al. 2015; Kim & Rush 2016),
    "reverse" KL(p_s‖p_t) (MiniLLM, Gu et al. 2023) or "mix" = β·forward + (1 − β)·reverse
    (a plain convex combination of the two KLs). temperature T > 0 (L uses T²·D); alpha in
    [0, 1] weighs the shifted next-token CE; beta in [0, 1] is used by "mix" only.
    ``forward(student_logits, teacher_logits, labels=None, mask=None)``: logits (B, T, V),
    labels (B, T) with -100 = ignore, mask (B, T) the attention_mask.
    """

    def __init__(self, divergence: str = "forward", temperature: float = 1.0, alpha: float = 0.0,
                 beta: float = 0.5) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ConfigError(f"TokenKDLoss: divergence must be one of {', '.join(DIVERGENCES)}, got "
                              f"{divergence!r}{closest(str(divergence), DIVERGENCES)}")
        self.divergence = divergence
        self.temperature = _positive("TokenKDLoss", "temperature", temperature)
        self.alpha = _unit("TokenKDLoss", "alpha", alpha)
        self.beta = _unit("TokenKDLoss", "beta", beta)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar token-level KD loss of a batch (teacher detached)."""
        return token_kd_loss(student_logits, teacher_logits, labels, mask, divergence=self.divergence,
                             temperature=self.temperature, alpha=self.alpha, beta=self.beta)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
                f"beta={self.beta}")


# --- feature distillation -----------------------------------------------------------------------


def _channel_axis(x: torch.Tensor) -> int:
    """Channels last for (N, D) / (N, T, D), on axis 1 for (N, C, H, W, ...) maps (module docstring)."""
    return -1 if x.dim() <= 3 else 1


def _project(projector: nn.Linear | None, x: torch.Tensor, axis: int) -> torch.Tensor:
    """``projector`` applied on ``axis`` of ``x`` (on axis 1 of an (N, C, H, W) map: a 1×1 convolution)."""
    if projector is None:
        return x
    x = x.to(projector.weight.dtype)
    if axis in (-1, x.dim() - 1):
        return projector(x)
    return projector(x.movedim(axis, -1)).movedim(-1, axis)


def _build_projector(dims: tuple[int, int] | None) -> nn.Linear | None:
    return nn.Linear(dims[0], dims[1]) if dims is not None else None


def _check_projected(owner: str, s: torch.Tensor, t: torch.Tensor, projector: nn.Linear | None,
                     axis: int) -> None:
    """DataError, naming both shapes and the fix, unless student features fit the projector and the teacher."""
    if s.dim() < 2 or s.dim() != t.dim():
        raise DataError(f"{owner}: student features {_shape(s)} and teacher features {_shape(t)} need the same "
                        "rank, with the batch first: (N, D), (N, T, D) or (N, C, H, W)")
    cs, ct = s.shape[axis], t.shape[axis]
    if projector is not None and cs != projector.in_features:
        raise DataError(f"{owner}: student features {_shape(s)} have {cs} channels but the projector was built "
                        f"for student_dim={projector.in_features}; pass student_dim={cs}")
    c_out = projector.out_features if projector is not None else cs
    if c_out != ct:
        if projector is not None:
            raise DataError(f"{owner}: teacher features {_shape(t)} have {ct} channels but the projector maps to "
                            f"teacher_dim={projector.out_features}; pass teacher_dim={ct}")
        raise DataError(f"{owner}: student features {_shape(s)} have {cs} channels and teacher features "
                        f"{_shape(t)} have {ct}; pass {owner}(student_dim={cs}, teacher_dim={ct}) to learn a "
                        "projector")
    rest_s = [n for i, n in enumerate(s.shape) if i != axis % s.dim()]
    rest_t = [n for i, n in enumerate(t.shape) if i != axis % t.dim()]
    if rest_s != rest_t:
        raise DataError(f"{owner}: student features {_shape(s)} and teacher features {_shape(t)} differ in batch "
                        "or spatial/sequence size; features are not resized silently: pick layers whose sizes "
                        "match, or pool/interpolate them yourself first")


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
              projector: nn.Linear | None = None) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015): mean over elements of (F_t − r(F_s))².

    r is the identity when ``projector`` is None, otherwise the Linear applied on the channel
    axis (last for (N, D) / (N, T, D), axis 1 for (N, C, H, W): a 1×1 conv). Shapes after r
    must match exactly (DataError naming both otherwise). The teacher is detached.
    """
    axis = _channel_axis(student_feat)
    _check_projected("HintLoss", student_feat, teacher_feat, projector, axis)
    s = _project(projector, student_feat, axis)
    s, t = _float(s, teacher_feat.detach())
    return F.mse_loss(s, t)


class _Projected(nn.Module):
    """A loss with an optional learned projector ``nn.Linear(student_dim, teacher_dim)``, built in ``__init__``."""

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.projector: nn.Linear | None = _build_projector(_dims(type(self).__name__, student_dim, teacher_dim))

    @property
    def has_projector(self) -> bool:
        """True when a learned projector maps student channels to teacher channels."""
        return self.projector is not None


class HintLoss(_Projected):
    """FitNets hint loss, Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

    L = mean over elements of (F_t − r(F_s))². With ``student_dim`` != ``teacher_dim`` the
    regressor r is an ``nn.Linear(student_dim, teacher_dim)`` built here, in ``__init__``, so it
    exists before the optimizer (train it: give ``loss.parameters()`` to the optimizer). It acts
    on the channel axis: last for (N, D) / (N, T, D), axis 1 for (N, C, H, W) — there it is
    exactly a 1×1 Conv2d. Equal dims or none: r is the identity. ``has_projector`` /
    ``projector`` tell which. ``forward(student_feat, teacher_feat)``.
    """

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        """The scalar hint loss (teacher detached)."""
        return hint_loss(student_feat, teacher_feat, self.projector)


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 spatial attention: vec(Σ_c |F_c|^p), L2-normalized per sample.

    ``feat`` (N, C, H, W, ...) sums over axis 1; (N, T, D) transformer states sum over D (T is
    the "spatial" axis). Returns (N, positions) in at least float32; an all-zero map stays zero.
    """
    if feat.dim() < 3:
        raise DataError(f"attention_map: features of shape {_shape(feat)} have no spatial axis; attention "
                        "transfer needs (N, C, H, W) maps or (N, T, D) hidden states")
    (x,) = _float(feat)
    a = x.abs().pow(p).sum(dim=_channel_axis(x))  # channels summed out
    return F.normalize(a.reshape(a.shape[0], -1), p=2.0, dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, beta: float = 1000.0,
            p: float = 2.0) -> torch.Tensor:
    """Attention transfer: β/2 · mean over (sample, position) of (A_s − A_t)², A = ``attention_map``.

    The reduction is the authors' reference code's, ``(at(x) - at(y)).pow(2).mean()``, because the
    paper's β = 1000 was tuned with it; the paper writes β/2·‖A_s − A_t‖₂ per sample, which on the
    same maps is a far larger number and would need another β. Channel counts may differ (that
    is the point); batch and spatial sizes must match. The teacher is detached.
    """
    if student_feat.dim() != teacher_feat.dim() or student_feat.dim() < 3:
        raise DataError(f"AttentionTransferLoss: student features {_shape(student_feat)} and teacher features "
                        f"{_shape(teacher_feat)} must both be (N, C, H, W) maps or (N, T, D) hidden states")
    axis = _channel_axis(student_feat) % student_feat.dim()
    rest_s = [n for i, n in enumerate(student_feat.shape) if i != axis]
    rest_t = [n for i, n in enumerate(teacher_feat.shape) if i != axis]
    if rest_s != rest_t:
        raise DataError(f"AttentionTransferLoss: student features {_shape(student_feat)} and teacher features "
                        f"{_shape(teacher_feat)} differ in batch or spatial size (only channels may differ); "
                        "pick layers with the same resolution or pool one of them first")
    a_s = attention_map(student_feat, p)
    a_t = attention_map(teacher_feat.detach(), p)
    a_s, a_t = _float(a_s, a_t)
    return beta / 2.0 * (a_s - a_t).pow(2).mean()


class AttentionTransferLoss(nn.Module):
    """Attention transfer, Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

    A(F) = vec(Σ_c |F_c|^p) / ‖·‖₂ per sample; L = β/2 · mean over (sample, position) of
    (A_s − A_t)² (the reference code's reduction, with which β = 1000 was tuned; see ``at_loss``).
    beta > 0; p >= 1 (p < 1 has an infinite gradient at the exact zeros ReLU features are full
    of). ``forward(student_feat, teacher_feat)``: (N, C, H, W) maps or (N, T, D) hidden states;
    channels may differ, spatial sizes must match.
    """

    def __init__(self, beta: float = 1000.0, p: float = 2) -> None:
        super().__init__()
        self.beta = _positive("AttentionTransferLoss", "beta", beta)
        self.p = _number("AttentionTransferLoss", "p", p)
        if self.p < 1:
            raise ConfigError(f"AttentionTransferLoss: p must be >= 1 (the paper uses 2), got {p!r}")

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        """The scalar attention-transfer loss (teacher detached)."""
        return at_loss(student_feat, teacher_feat, self.beta, self.p)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, p={self.p}"


def _flat_batch(owner: str, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) student/teacher features as (N, D_s) / (N, D_t) in at least float32; batch sizes must match."""
    if s.dim() < 1 or t.dim() < 1 or s.shape[0] != t.shape[0]:
        raise DataError(f"{owner}: student features {_shape(s)} and teacher features {_shape(t)} need the same "
                        "batch size on axis 0 (feature sizes may differ)")
    s, t = _float(s, t)
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances of the rows of (N, D) ``x``, from exact differences.

    Not the ‖a‖² + ‖b‖² − 2a·b matrix-product shortcut: that cancels in float32 and leaves
    coincident points a noise distance instead of 0. cdist's kernel needs no (N, N, D) buffer,
    and its backward gives a zero (not NaN) gradient at a zero distance.
    """
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def pairwise_distance_potential(feat: torch.Tensor) -> torch.Tensor:
    """RKD distance potential ψ_D(i, j) = ‖x_i − x_j‖₂ / μ as an (N, N) matrix (Park et al. 2019).

    ``feat`` (N, ...) is flattened to (N, D). μ is the mean of the non-zero distances with
    i ≠ j (1 when every distance is 0, e.g. a collapsed batch); the diagonal is 0. The gradient
    flows through μ too, as in the authors' code.
    """
    (x,) = _float(feat.reshape(feat.shape[0], -1))
    d = _pairwise_distances(x)
    positive = d > 0  # the diagonal is exactly 0, so this is the i != j, non-zero set
    count = positive.sum()
    # where() instead of an if on count: no host sync, and no 0/0 for a collapsed batch.
    mu = torch.where(count > 0, d.sum() / count.clamp_min(1), torch.ones_like(d[0, 0]))
    return d / mu


def angle_potential(feat: torch.Tensor) -> torch.Tensor:
    """RKD angle potential ψ_A[i, j, k] = cos∠(x_i − x_j, x_k − x_j) as an (N, N, N) tensor (Park et al. 2019).

    j is the vertex. Entries with a zero-length side (i = j, k = j, or coincident points) are 0,
    as in the authors' code, which normalizes a zero vector to zero. Computed by the law of
    cosines from the exact pairwise distances, cos = (d_ij² + d_kj² − d_ik²) / (2·d_ij·d_kj),
    so memory is N³ rather than the N²·D of the difference vectors; clamped to [−1, 1].
    """
    (x,) = _float(feat.reshape(feat.shape[0], -1))
    d = _pairwise_distances(x)  # symmetric, so d[k, j] == d[j, k]
    d2 = d * d
    d_ij = d.unsqueeze(2)  # [i, j, ·]
    d_kj = d.unsqueeze(0)  # [·, j, k]
    valid = (d_ij > 0) & (d_kj > 0)
    num = d2.unsqueeze(2) + d2.unsqueeze(0) - d2.unsqueeze(1)  # d_ij² + d_kj² − d_ik²
    # A safe denominator, not just where() on the result: 0/0 in the unused branch would still
    # send NaN through the backward pass.
    den = torch.where(valid, 2.0 * d_ij * d_kj, torch.ones_like(num))
    cos = (num / den).clamp(-1.0, 1.0)
    return torch.where(valid, cos, torch.zeros_like(cos))


def rkd_distance(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber (δ = 1) between student and teacher ψ_D, mean over all N² entries (the authors' code).

    Needs N >= 2. Scale-invariant on either side (μ normalization). The teacher is detached.
    """
    s, t = _flat_batch("RKDLoss", student_feat, teacher_feat.detach())
    if s.shape[0] < 2:
        raise DataError(f"RKDLoss: the distance term needs a batch of at least 2 samples, got {s.shape[0]}")
    return F.smooth_l1_loss(pairwise_distance_potential(s), pairwise_distance_potential(t))


def rkd_angle(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber (δ = 1) between student and teacher ψ_A, mean over all N³ entries (the authors' code).

    Needs N >= 3. The teacher is detached.
    """
    s, t = _flat_batch("RKDLoss", student_feat, teacher_feat.detach())
    if s.shape[0] < 3:
        raise DataError(f"RKDLoss: the angle term needs a batch of at least 3 samples, got {s.shape[0]}; "
                        "use a larger batch or angle_weight=0")
    return F.smooth_l1_loss(angle_potential(s), angle_potential(t))


def rkd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Park et al. 2019 RKD: w_D · ``rkd_distance`` + w_A · ``rkd_angle``; a term with weight 0 is skipped.

    Features (N, ...) are flattened per sample; student and teacher dims may differ.
    """
    s, t = _flat_batch("RKDLoss", student_feat, teacher_feat.detach())
    total = _zero_like_graph(s)
    if distance_weight:
        total = total + distance_weight * rkd_distance(s, t)
    if angle_weight:
        total = total + angle_weight * rkd_angle(s, t)
    return total


class RKDLoss(nn.Module):
    """Relational KD, Park et al. 2019, "Relational Knowledge Distillation".

    L = w_D · Huber(ψ_D(s), ψ_D(t)) + w_A · Huber(ψ_A(s), ψ_A(t)) with the distance potential
    ψ_D = ‖x_i − x_j‖/μ and the angle potential ψ_A = cos∠(x_i − x_j, x_k − x_j) of the batch
    (see ``pairwise_distance_potential``, ``angle_potential``). distance_weight, angle_weight
    >= 0 (not both 0; the paper's 25 and 50). ``forward(student_feat, teacher_feat)`` on (N, ...)
    features flattened to (N, D_s) / (N, D_t); N >= 2 for the distance term, N >= 3 for the angle.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = _non_negative("RKDLoss", "distance_weight", distance_weight)
        self.angle_weight = _non_negative("RKDLoss", "angle_weight", angle_weight)
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ConfigError("RKDLoss: distance_weight and angle_weight are both 0; set at least one > 0")

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        """The scalar RKD loss (teacher detached)."""
        return rkd_loss(student_feat, teacher_feat, self.distance_weight, self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


def similarity_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Tung & Mori 2019: the (N, N) batch similarity G = F·Fᵀ with each row L2-normalized.

    ``feat`` (N, ...) is flattened to (N, D); an all-zero row stays zero.
    """
    x = feat.reshape(feat.shape[0], -1)
    (x,) = _float(x)
    return F.normalize(x @ x.T, p=2.0, dim=1)


def similarity_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD: ‖G_t − G_s‖²_F / N², G = ``similarity_matrix``.

    Feature dims may differ; the batch size N must match. The teacher is detached.
    """
    s, t = _flat_batch("SimilarityLoss", student_feat, teacher_feat.detach())
    n = s.shape[0]
    if n == 0:
        raise DataError("SimilarityLoss: the batch is empty")
    return (similarity_matrix(t) - similarity_matrix(s)).pow(2).sum() / (n * n)


class SimilarityLoss(nn.Module):
    """Similarity-preserving KD, Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation".

    G = row-L2-normalized F·Fᵀ over the batch; L = ‖G_t − G_s‖²_F / N². No hyper-parameter
    (scale it yourself; the paper uses γ = 3000). ``forward(student_feat, teacher_feat)`` on
    (N, ...) features, dims may differ.
    """

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        """The scalar similarity-preserving loss (teacher detached)."""
        return similarity_loss(student_feat, teacher_feat)


def cosine_embedding_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, mask: torch.Tensor | None = None,
                          projector: nn.Linear | None = None) -> torch.Tensor:
    """DistilBERT's cosine loss (Sanh et al. 2019): mean over kept rows of 1 − cos(r(e_s), e_t).

    Embeddings (N, D) or (N, T, D), rows along the last axis; ``mask`` (N,) or (N, T), non-zero =
    keep (padding out). r is ``projector`` on the last axis, or the identity. No kept row gives
    0. The teacher is detached.
    """
    owner = "CosineEmbeddingLoss"
    if student_emb.dim() not in (2, 3):
        raise DataError(f"{owner}: embeddings must be (N, D) or (N, T, D), got student {_shape(student_emb)}")
    _check_projected(owner, student_emb, teacher_emb, projector, -1)
    keep = _keep_mask(mask, student_emb.shape[:-1], owner, "embeddings' leading shape")
    s = _project(projector, student_emb, -1)
    s, t = _float(s, teacher_emb.detach())
    gap = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)  # leading shape
    if keep is None:
        return gap.mean() if gap.numel() else _zero_like_graph(s)
    return (gap * keep).sum() / keep.sum().clamp_min(1)


class CosineEmbeddingLoss(_Projected):
    """Cosine embedding distillation, DistilBERT (Sanh et al. 2019): L = mean over rows of 1 − cos(r(e_s), e_t).

    Same projector rule as ``HintLoss``: ``student_dim`` != ``teacher_dim`` builds an
    ``nn.Linear(student_dim, teacher_dim)`` in ``__init__`` (``has_projector`` / ``projector``),
    applied on the last axis. ``forward(student_emb, teacher_emb, mask=None)``: (N, D) or
    (N, T, D) embeddings, ``mask`` (N, T) (or (N,)) excluding padding rows.
    """

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar cosine loss over kept rows (teacher detached)."""
        return cosine_embedding_loss(student_emb, teacher_emb, mask, self.projector)
