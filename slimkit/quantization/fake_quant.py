"""Fake quantization for quantization-aware training: quantize-dequantize with a gradient rule.

The forward of every function here is exactly ``primitives.fake_quantize``:
``x̂ = (clamp(round(x/s) + z, qmin, qmax) − z) · s`` (binary: ``s · sign(x)``, 0 -> +1),
so a model trained with it computes what the converted integer model computes.
``round`` has zero derivative almost everywhere, so the backward uses a surrogate:

- ``ste_fake_quantize`` — clipped straight-through estimator (Bengio et al. 2013; the rule
  of torch.ao's FakeQuantize): ``∂x̂/∂x = 1`` where the code is inside the grid,
  ``qmin ≤ round(x/s) + z ≤ qmax``, and 0 where it is clamped. The scale gets no gradient.
- ``lsq_fake_quantize`` — LSQ (Esser et al. 2019, "Learned Step Size Quantization"):
  the same ``∂x̂/∂x``, and the scale is learned with

      ∂x̂/∂s = round(x/s) − x/s     inside the grid
              qmin − z or qmax − z  where the code is clamped (the clamped code minus z)

  multiplied by ``grad_scale = 1/√(N·qmax)`` (N: values sharing one scale; per sample for
  activations, LSQ's N_F) so the step size learns at the pace of the weights. A per-channel
  scale receives the sum over its channel. The zero point is not learned (LSQ+ would).
- ``binary_fake_quantize`` — 1 bit, codes ±1: ``x̂ = s · sign(x)``. Chosen rule: the
  *identity* STE, ``∂x̂/∂x = 1`` everywhere (BinaryConnect's estimator without its clip).
  With s = mean|x| (XNOR-Net's scale) a clip at |x| ≤ s, BinaryNet's hard-tanh rule
  relative to the scale, would freeze the ~40% of a Gaussian weight beyond the mean and
  stop it from ever changing sign; ``clip=c`` keeps that option (gradient where |x| ≤ c·s).
  The scale's own dependence on x (XNOR-Net's 1/n term) is not back-propagated: s is
  recomputed from the weights on every step. With a learnable s, ``∂x̂/∂s = sign(x)`` times
  ``grad_scale``.

``FakeQuantizer`` is the module that holds a tensor's quantization state: how the range is
found (``observer``), whether the scale is learned, and ``qparams()`` — the scale and zero
point to hand to the real quantized layer at convert, so the trained grid is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimkit.core.errors import DataError
from slimkit.quantization.primitives import binary_scale, is_binary, qrange, scale_zero_from_range

# How a FakeQuantizer finds its range.
#   "current":        from the tensor being quantized, on every call (weights; binary: mean|x|);
#   "minmax":         running min / max over every training batch seen;
#   "moving_average": exponential moving average of each training batch's min / max
#                     (torch.ao's MovingAverageMinMaxObserver; the standard for activations in QAT).
QAT_OBSERVERS = ("current", "minmax", "moving_average")
# Smallest scale a learned step size may take: LSQ can push s towards 0 (or below) in a bad step.
_MIN_SCALE = 1e-8


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over the dims a tensor of ``shape`` was broadcast along, giving ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1)
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.reshape(shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 at least, as primitives.quantize divides in float32 (float64 stays float64 for gradcheck).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero_as(zero: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device) if zero is None else zero.to(like.dtype)


class _STEFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax):
        dt = _compute_dtype(x)
        s, z = scale.to(dt), _zero_as(zero, x.to(dt))
        v = torch.round(x.to(dt) / s) + z
        ctx.save_for_backward((v >= qmin) & (v <= qmax))
        return ((v.clamp(qmin, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, grad_scale):
        dt = _compute_dtype(x)
        xf, s = x.to(dt), scale.to(dt)
        z = _zero_as(zero, xf)
        v = xf / s
        r = torch.round(v)
        q = (r + z).clamp(qmin, qmax)
        inside = (r + z >= qmin) & (r + z <= qmax)
        # ∂x̂/∂s per element: round(x/s) − x/s inside, the clamped code minus z outside.
        ds = torch.where(inside, r - v, q - z)
        ctx.save_for_backward(inside, ds)
        ctx.scale_shape, ctx.scale_dtype, ctx.grad_scale = scale.shape, scale.dtype, grad_scale
        return ((q - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (_reduce_to(grad.to(ds.dtype) * ds, ctx.scale_shape) * ctx.grad_scale).to(ctx.scale_dtype)
        return grad * inside, grad_s, None, None, None, None


class _BinaryFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, clip, grad_scale):
        dt = _compute_dtype(x)
        sign = torch.where(x >= 0, 1.0, -1.0).to(dt)
        s = scale.to(dt)
        mask = None if clip is None else (x.to(dt).abs() <= clip * s)
        ctx.save_for_backward(sign, mask)
        ctx.scale_shape, ctx.scale_dtype, ctx.grad_scale = scale.shape, scale.dtype, grad_scale
        return (sign * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        sign, mask = ctx.saved_tensors
        grad_x = grad if mask is None else grad * mask
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (_reduce_to(grad.to(sign.dtype) * sign, ctx.scale_shape) * ctx.grad_scale).to(ctx.scale_dtype)
        return grad_x, grad_s, None, None


def ste_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) − z)·s`` with the clipped straight-through gradient.

    ``scale``/``zero`` broadcast against ``x`` (``zero=None`` means 0). The gradient passes
    unchanged where ``qmin ≤ round(x/s) + z ≤ qmax`` and is 0 where the code is clamped;
    ``scale`` and ``zero`` get none.
    """
    return _STEFakeQuant.apply(x, scale, zero, qmin, qmax)


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int, grad_scale: float
) -> torch.Tensor:
    """The same forward as ``ste_fake_quantize``, with LSQ's gradient for a learned ``scale`` (module docstring)."""
    return _LSQFakeQuant.apply(x, scale, zero, qmin, qmax, grad_scale)


def binary_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, clip: float | None = None, grad_scale: float = 1.0
) -> torch.Tensor:
    """``s · sign(x)`` (0 -> +1) with the identity STE (``clip=None``) or a gradient only where |x| ≤ clip·s.

    A learnable ``scale`` gets ``∂x̂/∂s = sign(x)`` times ``grad_scale``.
    """
    return _BinaryFakeQuant.apply(x, scale, clip, grad_scale)


def lsq_grad_scale(n: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1/√(N·qmax)`` for ``n`` values sharing one scale."""
    return 1.0 / math.sqrt(max(n, 1) * max(qmax, 1))


def lsq_init_scale(x: torch.Tensor, qmax: int, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """LSQ's initial step size ``2·mean|x| / √qmax`` over ``dims`` (all of x when None), kept as size-1 dims."""
    a = x.detach().abs().float()
    m = a.mean() if dims is None else a.mean(dim=dims, keepdim=True)
    s = 2 * m / math.sqrt(max(qmax, 1))
    return torch.where(s > 0, s, torch.ones_like(s))


class FakeQuantizer(nn.Module):
    """Quantize-dequantize one tensor (a weight or a layer's input) during training.

    bits / symmetric: the grid, as in ``primitives.qrange`` (1-bit symmetric = binary).
    axis: None for one scale per tensor, else the channel dim with one scale per channel
    (``channels`` of them; needed up front for a learnable per-channel scale).
    observer: how the range is found (``QAT_OBSERVERS``): "current" recomputes it from the
    tensor on every call (weights), "minmax"/"moving_average" update a running range on
    each *training-mode* call (activations); in eval mode the range is fixed.
    learnable: the scale is an ``nn.Parameter`` trained with LSQ, initialised from the
    first range found (``init="range"``, so that before training the model equals PTQ) or
    with LSQ's ``2·mean|x|/√qmax`` (``init="lsq"``); the zero point stays where it started.
    averaging_constant: the moving average's weight of a new batch (torch.ao's 0.01).
    freeze_after: stop updating a running range after this many training batches.
    binary_clip: see ``binary_fake_quantize``.

    States: a running observer starts *uninitialised* (no range: a forward in eval mode
    raises); each training forward updates the range until frozen (``freeze()`` or
    ``freeze_after``). A learnable scale is only initialised by the range, then learned.
    Set ``enabled = False`` to pass tensors through untouched (a float teacher).
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        axis: int | None = None,
        *,
        learnable: bool = False,
        observer: str = "current",
        channels: int | None = None,
        init: str = "range",
        averaging_constant: float = 0.01,
        freeze_after: int | None = None,
        binary_clip: float | None = None,
    ) -> None:
        super().__init__()
        self.qmin, self.qmax = qrange(bits, symmetric)  # raises for impossible bits
        if observer not in QAT_OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(QAT_OBSERVERS)}, got {observer!r}")
        if is_binary(bits, symmetric) and observer != "current":
            raise ValueError("binary (1-bit) fake quantization is for weights: use observer='current'")
        if learnable and axis is not None and not channels:
            raise ValueError("a learnable per-channel scale needs `channels` (the size of dim `axis`)")
        if init not in ("range", "lsq"):
            raise ValueError(f"init must be 'range' or 'lsq', got {init!r}")
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.learnable, self.observer, self.init = learnable, observer, init
        self.channels = channels
        self.averaging_constant, self.freeze_after, self.binary_clip = averaging_constant, freeze_after, binary_clip
        self.enabled = True
        self.observing = True
        self.initialized = False
        self.steps = 0  # training batches observed
        # Canonical shapes: () per tensor, (channels,) per channel; `_view` broadcasts them onto x.
        shape = () if axis is None else (channels or 0,)
        self.register_buffer("min_val", None)
        self.register_buffer("max_val", None)
        self.register_buffer("zero", torch.zeros(shape, dtype=torch.int32))
        if learnable:  # fixed scales are recomputed from the range (or the tensor) on every call
            self.scale = nn.Parameter(torch.ones(shape))

    # -- helpers ---------------------------------------------------------------------------
    @property
    def binary(self) -> bool:
        return is_binary(self.bits, self.symmetric)

    def _dims(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(range(x.dim()))
        axis = self.axis % x.dim()
        return tuple(d for d in range(x.dim()) if d != axis)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A canonical () / (channels,) tensor reshaped to broadcast against ``x``."""
        if self.axis is None:
            return t
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = -1
        return t.reshape(shape)

    def _range_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.detach().float()
        dims = self._dims(x)
        return xf.amin(dim=dims), xf.amax(dim=dims)

    def _scale_zero_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point from ``x`` itself (binary: mean|x|), canonical shapes."""
        if self.binary:
            s = binary_scale(x, self._dims(x))  # size-1 dims kept
            s = s.reshape(-1) if self.axis is not None else s.reshape(())
            return s, torch.zeros(s.shape, dtype=torch.int32, device=s.device)
        return scale_zero_from_range(*self._range_of(x), self.bits, self.symmetric)

    # -- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the range (and, when learnable, the scale it implies), e.g. from calibration; marks initialised."""
        shape = (-1,) if self.axis is not None else ()
        lo, hi = lo.detach().float().reshape(shape), hi.detach().float().reshape(shape)
        if self.axis is not None:
            self.channels = lo.numel()
        self.min_val, self.max_val = lo.clone(), hi.clone()
        scale, zero = scale_zero_from_range(lo, hi, self.bits, self.symmetric)
        self.zero = zero.to(torch.int32)
        if self.learnable:
            self.scale.copy_(scale)
        self.initialized = True

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Initialise from a tensor: its range (or mean|x| for binary, or LSQ's init), as ``init`` says."""
        self._check_finite(x)
        if self.binary:
            scale, zero = self._scale_zero_of(x)
            self.zero = zero.to(torch.int32)
            if self.learnable:
                self.scale.copy_(scale)
            self.initialized = True
        else:
            self.set_range(*self._range_of(x))
        if self.learnable and self.init == "lsq":
            self.scale.copy_(lsq_init_scale(x, self.qmax, self._dims(x)).reshape(self.scale.shape))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._range_of(x)
        if not self.initialized:
            self._check_finite(x)
            self.set_range(lo, hi)
        elif not self.learnable:
            if self.observer == "minmax":
                self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
            else:  # moving average
                c = self.averaging_constant
                self.min_val = self.min_val + c * (lo - self.min_val)
                self.max_val = self.max_val + c * (hi - self.max_val)
        self.steps += 1
        if self.freeze_after is not None and self.steps >= self.freeze_after:
            self.observing = False

    def _check_finite(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x.detach()).all():
            raise DataError("a tensor to fake-quantize holds NaN or inf")

    def freeze(self) -> None:
        """Stop updating a running range (the scale in use from now on stays as it is)."""
        self.observing = False

    def _effective_scale(self) -> torch.Tensor:
        s = self.scale
        return torch.where(s.abs() > _MIN_SCALE, s.abs(), torch.full_like(s, _MIN_SCALE))

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(scale, zero)`` this quantizer uses now: float32 and int32, shape () or (channels,).

        A quantizer that recomputes its range from the tensor ("current", not learnable)
        needs that tensor as ``x``. These are exactly what ``forward`` rounds with, so a real
        quantized layer built from them reproduces the fake-quantized output.
        """
        if self.learnable:
            if not self.initialized:
                if x is None:
                    raise DataError("this quantizer has no scale yet: run a training forward or initialize() it")
                self.initialize(x)
            return self._effective_scale().detach().float().clone(), self.zero.clone()
        if self.observer == "current":
            if x is None:
                raise ValueError("a quantizer with observer='current' takes its range from the tensor: pass x")
            self._check_finite(x)
            return self._scale_zero_of(x)
        if not self.initialized:
            raise DataError("this input quantizer has observed no data yet: run training forwards "
                            "(model.train()) or calibrate it before using it in eval mode")
        return scale_zero_from_range(self.min_val, self.max_val, self.bits, self.symmetric)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observer != "current" and self.training and self.observing:
            self._observe(x)
        elif self.learnable and not self.initialized and self.observer == "current":
            self.initialize(x)
        if self.learnable:
            if not self.initialized:
                raise DataError("this input quantizer has observed no data yet: run training forwards "
                                "(model.train()) or calibrate it before using it in eval mode")
            scale = self._view(self._effective_scale(), x)
            n = x.numel() // max(scale.numel(), 1)
            if self.observer != "current" and x.dim() > 1:
                n //= x.shape[0]  # activations: values per sample (LSQ's N_F)
            gs = lsq_grad_scale(n, self.qmax)
            if self.binary:
                return binary_fake_quantize(x, scale, self.binary_clip, gs)
            zero = None if self.symmetric else self._view(self.zero, x)
            return lsq_fake_quantize(x, scale, zero, self.qmin, self.qmax, gs)
        scale, zero = self.qparams(x if self.observer == "current" else None)
        scale = self._view(scale.to(x.device), x)
        if self.binary:
            return binary_fake_quantize(x, scale, self.binary_clip)
        zero = None if self.symmetric else self._view(zero.to(x.device), x)
        return ste_fake_quantize(x, scale, zero, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = "binary" if self.binary else ("symmetric" if self.symmetric else "asymmetric")
        where = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return (f"bits={self.bits}, {kind}, {where}, observer={self.observer}, learnable={self.learnable}"
                + ("" if self.enabled else ", disabled"))
