"""Range optimization for round-to-nearest weight quantization: clip search and HQQ.

Min/max ranges waste code levels on a group's few extreme weights; shrinking the range
rounds the bulk more finely at the price of clipping the tails. Two calibration-free ways
to choose the range, both returning a ``QuantizedWeight`` that stores like plain RTN:

- ``mse_clip_scales``: per group, try ranges ``[c·min, c·max]`` for shrink factors ``c``
  in a grid over [0.5, 1] and keep the ``c`` with the smallest ``‖w − Q(w)‖²``. Given a
  Gram matrix ``G = XᵀX`` of the layer's inputs the error is instead the layer *output*'s,
  ``Δ G_g Δᵀ`` per row and group (AWQ's auto_clip, computed exactly from ``G``'s
  diagonal blocks rather than on a token subsample).
- ``hqq_quantize``: Half-Quadratic Quantization (Badri & Shaji 2023). An auxiliary error
  ``W_e`` is shrunk with an lp (p < 1) proximal operator, which treats a few large
  errors as outliers to be ignored, and the affine parameters are then fitted in closed
  form to ``W − W_e``; ``β`` grows by ``κ`` each step.

Everything here is a pure function of tensors; c = 1 (or HQQ's first iterate) is plain
RTN, and each group keeps its best candidate, so neither is ever worse than RTN on its
own objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimkit.quantization.primitives import (
    QuantizedWeight,
    dequantize,
    grouped_weight,
    qrange,
    quantize,
    scale_zero_from_range,
)

# Shrink factors 1.0, 0.95, ..., 0.5: AWQ's auto_clip range (n_grid 20, max_shrink 0.5).
DEFAULT_GRID: tuple[float, ...] = tuple(1.0 - i / 20 for i in range(11))


def _check_bits(bits: int, symmetric: bool) -> None:
    qrange(bits, symmetric)
    if bits == 1 and symmetric:
        raise ValueError("binary (1-bit symmetric) weights use the mean|w| scale, which needs no range search")
    if bits > 8:
        raise ValueError(f"range search is for 2..8-bit weights, got {bits}")


def _pack_result(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group_size: int | None, symmetric: bool) -> QuantizedWeight:
    rows, n_groups, gs = q.shape
    return QuantizedWeight(
        q=q.reshape(rows, n_groups * gs),
        scale=scale.contiguous(),
        zero=None if symmetric else zero.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def _group_grams(gram: torch.Tensor, n_groups: int, gs: int) -> torch.Tensor:
    """The (n_groups, gs, gs) diagonal blocks of a (cols, cols) Gram matrix."""
    cols = n_groups * gs
    if gram.shape != (cols, cols):
        raise ValueError(f"gram must be ({cols}, {cols}) for a weight with {cols} columns, got {tuple(gram.shape)}")
    idx = torch.arange(n_groups, device=gram.device)
    blocks = gram.float().reshape(n_groups, gs, n_groups, gs)  # [g, i, h, j]
    return blocks[idx, :, idx, :]  # (n_groups, gs, gs): g == h


def _candidate(grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Codes, scale, zero and dequantized values of every group for the range [lo, hi] (each (rows, n_groups))."""
    scale, zero = scale_zero_from_range(lo, hi, bits, symmetric)
    z = None if symmetric else zero.unsqueeze(-1)
    q = quantize(grouped, scale.unsqueeze(-1), z, bits, symmetric)
    return q, scale, zero, dequantize(q, scale.unsqueeze(-1), z)


def _group_error(delta: torch.Tensor, grams: torch.Tensor | None) -> torch.Tensor:
    """Per (row, group) error of a (rows, n_groups, gs) weight error: ‖Δ‖², or Δ G_g Δᵀ with Gram blocks."""
    if grams is None:
        return delta.double().pow(2).sum(-1)
    return torch.einsum("rgi,gij,rgj->rg", delta, grams, delta).double()


def clip_errors(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                grid: Sequence[float] = DEFAULT_GRID, *, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Error of every shrink factor: float64 (len(grid), rows, n_groups).

    Factor ``c`` quantizes each group over ``[c·min, c·max]`` (min/max of the group, widened
    to include 0 as RTN does). The error is ``‖w_g − Q(w_g)‖²``, or with ``gram`` (the
    (cols, cols) ``XᵀX`` of the layer's inputs) the output error ``Σ_t ((w_g − Q(w_g))·x_t,g)²``.
    """
    _check_bits(bits, symmetric)
    factors = _check_grid(grid)
    grouped = grouped_weight(w, group_size)
    grams = None if gram is None else _group_grams(gram, grouped.shape[1], grouped.shape[2])
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    out = []
    for c in factors:
        *_, deq = _candidate(grouped, lo * c, hi * c, bits, symmetric)
        out.append(_group_error(grouped - deq, grams))
    return torch.stack(out)


def _check_grid(grid: Sequence[float]) -> list[float]:
    factors = [float(c) for c in grid]
    if not factors or any(not (0.0 < c <= 1.0) for c in factors):
        raise ValueError(f"grid must hold shrink factors in (0, 1], got {list(grid)!r}")
    return factors


def mse_clip_scales(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    grid: Sequence[float] = DEFAULT_GRID, *, gram: torch.Tensor | None = None) -> QuantizedWeight:
    """RTN with each group's range shrunk by the factor of ``grid`` that minimizes its error.

    The error is the weight's squared error, or the layer output's with ``gram`` (see
    ``clip_errors``). Ties go to the earlier factor, so with 1.0 first (the default grid)
    a group that gains nothing keeps plain min/max RTN exactly.
    """
    _check_bits(bits, symmetric)
    factors = _check_grid(grid)
    grouped = grouped_weight(w, group_size)
    grams = None if gram is None else _group_grams(gram, grouped.shape[1], grouped.shape[2])
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    best_q = best_scale = best_zero = best_err = None
    for c in factors:
        q, scale, zero, deq = _candidate(grouped, lo * c, hi * c, bits, symmetric)
        err = _group_error(grouped - deq, grams)
        if best_err is None:
            best_q, best_scale, best_zero, best_err = q, scale, zero, err
            continue
        better = err < best_err  # (rows, n_groups); strict: ties keep the earlier factor
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return _pack_result(best_q, best_scale, best_zero, bits, group_size, symmetric)


def clip_factors(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                 grid: Sequence[float] = DEFAULT_GRID, *, gram: torch.Tensor | None = None) -> torch.Tensor:
    """The chosen shrink factor of each group, float32 (rows, n_groups) (first minimum of ``clip_errors``)."""
    errors = clip_errors(w, bits, group_size, symmetric, grid, gram=gram)
    # argmin returns the first minimum, matching mse_clip_scales' tie rule.
    return torch.tensor(_check_grid(grid), dtype=torch.float32)[errors.argmin(0)]


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """HQQ's generalized soft-threshold: ``sign(x)·relu(|x| − |x|^(p−1)/β)`` (p = 1: plain soft threshold).

    The proximal operator of ``|x|^p`` (approximately, for p < 1): small entries go to 0,
    large ones (outliers) are kept nearly whole.
    """
    a = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(a - 1.0 / beta)
    # |x|^(p-1) is infinite at 0; clamp so 0 maps to 0 without NaN.
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int | None, *, iters: int = 20, lp: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01) -> QuantizedWeight:
    """Asymmetric quantization with HQQ's half-quadratic range fit (Badri & Shaji 2023).

    Start from min/max RTN. Each iteration: ``W_e = shrink_lp(W − Ŵ, β, lp)`` (the part of
    the error treated as outliers), then fit scale and zero point in closed form so that
    ``s·(q − z) ≈ W − W_e`` (least squares over the group with the current codes ``q``; HQQ
    fits only ``z``, here ``z`` must be an integer, stored as uint8, so the scale is fitted
    too, then ``z`` rounded and ``s`` refitted), requantize, and ``β ← κβ``. Each group
    keeps its iterate of lowest squared error, the RTN start included. Defaults (lp 0.7,
    β 10, κ 1.01, 20 iterations) are HQQ's.
    """
    _check_bits(bits, False)
    if iters < 0 or not (0 < lp <= 1) or beta <= 0 or kappa < 1:
        raise ValueError(f"need iters >= 0, 0 < lp <= 1, beta > 0, kappa >= 1; got {iters}, {lp}, {beta}, {kappa}")
    grouped = grouped_weight(w, group_size)  # (rows, n_groups, gs)
    qmin, qmax = qrange(bits, False)
    q, scale, zero, deq = _candidate(grouped, grouped.amin(-1), grouped.amax(-1), bits, False)
    best_q, best_scale, best_zero = q, scale, zero
    best_err = _group_error(grouped - deq, None)
    wd = grouped.double()
    for _ in range(iters):
        target = wd - shrink_lp(wd - deq.double(), beta, lp)  # what the grid should reproduce
        qf = q.double()
        # Least squares t ≈ a·q + b over each group: a = cov(q, t) / var(q), b = mean(t) − a·mean(q).
        q_mean, t_mean = qf.mean(-1), target.mean(-1)
        var = (qf - q_mean.unsqueeze(-1)).pow(2).sum(-1)
        cov = ((qf - q_mean.unsqueeze(-1)) * (target - t_mean.unsqueeze(-1))).sum(-1)
        ok = (var > 0) & (cov > 0)  # one code used, or a negative slope: keep the old parameters
        a = torch.where(ok, cov / var.clamp_min(1e-300), scale.double())
        b = torch.where(ok, t_mean - a * q_mean, -scale.double() * zero.double())
        new_zero = torch.round(-b / a).clamp(qmin, qmax)
        # Refit the scale for the integer zero point: s = Σ t(q − z) / Σ (q − z)².
        d = qf - new_zero.unsqueeze(-1)
        den = d.pow(2).sum(-1)
        s = (target * d).sum(-1) / den.clamp_min(1e-300)
        ok = ok & (den > 0) & (s > 0) & torch.isfinite(s)
        scale = torch.where(ok, s, scale.double()).float()
        zero = torch.where(ok, new_zero, zero.double()).to(torch.int32)
        q = quantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, False)
        deq = dequantize(q, scale.unsqueeze(-1), zero.unsqueeze(-1))
        err = _group_error(grouped - deq, None)
        better = err < best_err
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
        beta *= kappa
    return _pack_result(best_q, best_scale, best_zero, bits, group_size, False)
