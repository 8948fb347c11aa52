"""The layer-input Hessian GPTQ and SparseGPT share: H = 2·XᵀX/n, dampening, and the Cholesky factor of H⁻¹.

Both OBS-style methods (Frantar et al. 2022, 2023) quantize or prune the columns of a weight
in order and spread each column's error over the columns not yet processed through U, the
upper Cholesky factor of the damped H⁻¹; the maths lives here so neither family imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimkit.core.errors import DataError

DAMP_ESCALATIONS = 3


class HessianError(DataError):
    """The Hessian stayed non positive definite through every dampening escalation.

    ``detail`` is the message without a layer name; the handler prefixes it with one.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"Hessian {detail}")
        self.detail = detail


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs ``x`` (tokens, in) into the running ``H = 2/n · Σ xᵀx``; returns ``(H, n)``.

    ``H`` None starts a float32 (in, in) matrix on ``x``'s device; pass a float64 ``H`` for
    float64 accumulation. float32 is what GPTQ uses and is the default because H of a
    wide layer (11008 inputs) is ~0.5 GB in float32 and twice that in float64; the
    running-mean form (rescale by n/(n+m), then add) keeps every term O(|x|²), so float32
    loses only ~1e-7 relative per batch. ``H`` is updated in place (and returned).
    """
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    if H.shape != (x.shape[-1], x.shape[-1]):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} cannot take inputs with {x.shape[-1]} features")
    if m == 0:
        return H, n
    total = n + m
    H.mul_(n / total)
    xs = x.to(H.dtype) * math.sqrt(2.0 / total)  # so that xsᵀxs = 2/total · xᵀx
    H.addmm_(xs.T, xs)
    return H, total


@dataclass(frozen=True, eq=False)
class HessianFactor:
    """What ``gptq_quantize`` needs from H, shared by every layer that reads the same input.

    ``U``: upper Cholesky factor of the damped (and, with act-order, permuted) H⁻¹.
    ``perm``: processing order of the columns (None = natural order). ``dead``: bool (in,)
    mask of inputs with H_ii = 0. ``damp``: the dampening fraction that worked.
    """

    U: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float


def factor_hessian(H: torch.Tensor, *, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """Dead inputs, act-order permutation, dampening and the upper Cholesky factor of H⁻¹.

    Works in H's dtype when it is float64, else float32. If the damped H (or its inverse)
    has no Cholesky factor, the dampening is raised ×10 up to ``DAMP_ESCALATIONS`` times;
    after that a ``HessianError`` says which dampening was tried.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if not (isinstance(damp, (int, float)) and damp > 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    H = H.detach().to(dtype).clone()
    if not bool(torch.isfinite(H).all()):
        raise HessianError("holds NaN or inf (the layer's calibration inputs are not finite)")
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0  # a feature that is always 0: any value works, 1 keeps H invertible
    perm = None
    if act_order:
        # Most-activated inputs first: they are quantized while the most columns remain to absorb errors.
        perm = torch.argsort(diag, descending=True, stable=True)
        H = H[perm][:, perm]
    mean_diag = float(H.diagonal().mean())
    tried = []
    for k in range(DAMP_ESCALATIONS + 1):
        d = damp * 10**k
        tried.append(d)
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) != 0:
            continue
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return HessianFactor(U=U, perm=perm, dead=dead, damp=d)
    tried_text = ", ".join(f"{t:g}" for t in tried)
    raise HessianError(
        f"is not positive definite even with damp={tried[-1]:g} (tried {tried_text}); the calibration "
        "inputs are degenerate or not from this layer: use more (and more varied) calibration samples, "
        "or leave the layer out with ignore"
    )


