"""Low-rank factorization of a Linear weight: the maths (pure functions), for issue 7.

W is (out, in), a Linear's weight; it is replaced by two factors A (out, r) and B (r, in),
i.e. two smaller Linear layers x -> B x -> A (B x). A rank-r factorization has r·(out + in)
parameters, so it is smaller only for r < out·in / (out + in) (``break_even_rank``).

- Plain truncated SVD: W = U Σ Vᵀ, A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ — the best rank-r
  approximation of W in Frobenius norm (Eckart–Young), blind to the inputs.
- Activation-aware, whitened (SVD-LLM, Wang et al. 2024): minimise the *output* error
  ‖(W − W') Xᵀ‖_F over calibration inputs X (tokens, in). With G = XᵀX = L Lᵀ (Cholesky,
  L lower), ‖(W − W') Xᵀ‖²_F = ‖(W − W') L‖²_F, so truncate the SVD of W L = U Σ Vᵀ and map
  back: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ L⁻¹. A singular G (dead or duplicate input features)
  is regularised by adding λ·mean(diag G)·I, λ raised until the Cholesky succeeds.
- Activation-aware, scaled (ASVD, Yuan et al. 2023): S = diag(mean|X_j|^α); truncate W S,
  then B ← B S⁻¹.

No module swapping here: the config, the handler and the factorized layer type are still to
be written (issue 7).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimkit.core.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class LowRankFactors:
    """W ≈ a @ b: ``a`` (out, rank), ``b`` (rank, in); ``damping`` is the λ a whitened factorization needed (0 if none)."""

    a: torch.Tensor
    b: torch.Tensor
    damping: float = 0.0

    @property
    def rank(self) -> int:
        """The inner dimension r."""
        return self.a.shape[1]


def break_even_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense (out, in) matrix (0 if none)."""
    dense = out_features * in_features
    return max(0, (dense - 1) // (out_features + in_features))


def rank_for_param_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The rank whose factors keep about ``ratio`` of the dense parameters (at least 1): r = ⌊ratio·mn/(m+n)⌋."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"parameter ratio must be in (0, 1], got {ratio!r}")
    return max(1, math.floor(ratio * out_features * in_features / (out_features + in_features)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose top singular values hold ``energy`` of Σ s² (0 < energy <= 1)."""
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    s2 = singular_values.double().pow(2)
    total = s2.sum()
    if total == 0:
        return 1
    cumulative = torch.cumsum(s2, 0) / total
    # The small tolerance keeps energy=1.0 from demanding rounding noise in the tail.
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


def _check_rank(rank: int, weight: torch.Tensor) -> None:
    full = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"rank must be an integer in 1..{full} for a {tuple(weight.shape)} weight, got {rank!r}")


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Plain truncated SVD: the best rank-``rank`` approximation of ``weight`` (computed in float64)."""
    _check_rank(rank, weight)
    w = weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a, b = _split(u, s, vh, rank)
    return LowRankFactors(a.to(weight.dtype), b.to(weight.dtype))


def gram_cholesky(gram: torch.Tensor, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of ``gram`` (= XᵀX), damped by λ·mean(diag)·I when needed; returns (L, λ).

    λ starts at 0, then 1e-6 and grows 10× per failure; DataError after ``max_tries``.
    """
    g = gram.detach().double()
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise DataError(f"a Gram matrix must be square, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise DataError("the activation Gram matrix holds NaN or inf: check the calibration data")
    scale = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    damping = 0.0
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(g + damping * scale * eye)
        if int(info) == 0:
            return factor, damping
        damping = 1e-6 * 10**attempt
    raise DataError(f"the activation Gram matrix is not positive definite even with damping {damping:g}: "
                    "the layer's inputs are degenerate; use more calibration data or plain SVD")


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRankFactors:
    """SVD-LLM: the rank-``rank`` W' minimising ‖(W − W') Xᵀ‖_F, from ``gram`` = XᵀX (in × in)."""
    _check_rank(rank, weight)
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise DataError(f"Gram matrix {tuple(gram.shape)} does not match the weight's {weight.shape[1]} inputs")
    w = weight.detach().double()
    lower, damping = gram_cholesky(gram)
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    a, b = _split(u, s, vh, rank)
    # b · L⁻¹ by a triangular solve (Lᵀ bᵀ' = bᵀ), never an explicit inverse.
    b = torch.linalg.solve_triangular(lower.T, b.T, upper=True).T
    return LowRankFactors(a.to(weight.dtype), b.to(weight.dtype), damping)


def scaled_svd(weight: torch.Tensor, mean_abs_input: torch.Tensor, rank: int, alpha: float = 0.5) -> LowRankFactors:
    """ASVD: truncate W·diag(s) with s_j = mean|X_j|^alpha, then undo the scale on the right factor."""
    _check_rank(rank, weight)
    if mean_abs_input.shape != (weight.shape[1],):
        raise DataError(f"input statistics {tuple(mean_abs_input.shape)} do not match the weight's {weight.shape[1]} inputs")
    s_in = mean_abs_input.detach().double().clamp_min(1e-8).pow(alpha)  # a dead input gets a tiny, finite scale
    u, s, vh = torch.linalg.svd(weight.detach().double() * s_in, full_matrices=False)
    a, b = _split(u, s, vh, rank)
    return LowRankFactors(a.to(weight.dtype), (b / s_in).to(weight.dtype))
