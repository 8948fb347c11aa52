"""Observers: statistics of a tensor (a weight, or activations over calibration batches) -> a clipping range.

Every observer is fed batches with ``update(x)`` and answers ``range()`` (the clipping
range, ``lo``/``hi`` float32) and ``qparams()`` (``scale_zero_from_range`` of that range).
Per tensor by default; with ``axis`` one range per slice along that axis (per channel).

- ``minmax``: running min / max over all batches (exact). Plain RTN ranges.
- ``moving_average``: an exponential moving average of each batch's min / max with
  averaging constant ``momentum`` (as ``torch.ao.quantization.MovingAverageMinMaxObserver``),
  so a few extreme batches move the range less.
- ``percentile``: clip at the ``percentile``-th percentile of |x| (symmetric) or at the
  (100 − p)-th / p-th percentiles of x (asymmetric); outliers beyond are clamped.
- ``kl`` (alias ``entropy``): the threshold that minimizes KL(P‖Q) between the |x|
  histogram and its quantized version, TensorRT's entropy calibration (Migacz, "8-bit
  Inference with TensorRT", GTC 2017). Per tensor only.
- ``mse``: the clip ``c·range`` (c on a grid in ``[min_ratio, 1]``) that minimizes the
  expected squared quantization error ``‖x − x̂‖²`` of the observed data.

Histogram observers (percentile, kl, mse) keep one histogram per channel (a single one per
tensor) of ``bins`` bins, float64 counts, over a range that always contains 0:
``[0, max|x|]`` of |x| when symmetric (and always for kl), ``[min(x, 0), max(x, 0)]`` of x
when asymmetric. The first batch with non-zero values sets the range exactly; when a later
batch falls outside it the range grows by an integer factor ``f`` (bin width ``w -> f·w``)
and shifts by a whole number ``m`` of old bins, so every old bin lies inside exactly one new
bin: old bin ``j`` moves to new bin ``(j + m) // f``. Counts are never split, so merging is
exact, but after a growth the range can be up to about twice the data's extent (a coarser
grid than one histogram of all the data would have). A range that is still empty (all
zeros so far) is a point mass at 0 and is rebuilt from the first non-zero batch. Bin edges
are float64, so data at any float32 scale (1e-30, subnormal) gets a proper histogram.

Every ``range()`` is intersected with the exact observed range widened to include 0,
``[min(x, 0), max(x, 0)]``: a threshold never lies beyond the data, and all-zero data gives
``(0, 0)`` (scale 1). For the qparams this only caps a threshold at the data's extent:
``scale_zero_from_range`` widens to 0 anyway and, when symmetric, uses ``max(-lo, hi)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from slimkit.core.errors import ConfigError, DataError, closest
from slimkit.quantization.primitives import qrange, scale_zero_from_range

OBSERVERS: tuple[str, ...] = ("minmax", "moving_average", "percentile", "kl", "mse")
# Other spellings make_observer accepts (ONNX Runtime and TensorRT call KL calibration "entropy").
ALIASES: dict[str, str] = {"entropy": "kl"}


class Observer:
    """Base observer: records batches and turns them into a clipping range and qparams.

    bits / symmetric: the quantization the range is for (``qrange(bits, symmetric)``).
    axis: None for one range per tensor; an int (negative allowed) keeps that axis and gives
    one range per slice along it ("per channel"). name: the tensor's name, used in errors.
    Subclasses implement ``_observe(x)`` (x float32, shape (channels, values)) and
    ``_range()`` (float64 (channels,) lo and hi).
    """

    kind: ClassVar[str] = "observer"
    OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None, name: str = "tensor"):
        if not isinstance(symmetric, bool):
            raise ConfigError(f"{self.kind} observer: symmetric must be true or false, got {symmetric!r}")
        try:
            self.qmin, self.qmax = qrange(bits, symmetric)
        except ValueError as exc:
            raise ConfigError(f"{self.kind} observer: {exc}") from None
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ConfigError(f"{self.kind} observer: axis must be None (per tensor) or an integer, got {axis!r}")
        self.bits = bits
        self.symmetric = symmetric
        self.axis = axis
        self.name = name
        self._batches = 0
        self._channels: int | None = None
        # Exact running min / max per channel (float64 holding float32 values).
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    @property
    def batches(self) -> int:
        """How many times ``update`` has been called."""
        return self._batches

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, "
                f"name={self.name!r}, batches={self._batches})")

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 (channels, values), after checking it is usable."""
        if not isinstance(x, torch.Tensor):
            raise DataError(f"observer for {self.name} expects a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise DataError(f"observer for {self.name} got an empty tensor (shape {tuple(x.shape)})")
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{self.name} contains NaN or inf (or values beyond float32); "
                            "an observer needs finite values")
        if self.axis is None:
            return x.reshape(1, -1)
        if not -x.dim() <= self.axis < x.dim():
            raise DataError(f"observer for {self.name}: axis {self.axis} is out of range "
                            f"for a tensor of shape {tuple(x.shape)}")
        channels = x.shape[self.axis]
        if self._channels is not None and channels != self._channels:
            raise DataError(f"observer for {self.name}: a batch with {channels} channels along axis {self.axis}, "
                            f"earlier batches had {self._channels}")
        return x.movedim(self.axis, 0).reshape(channels, -1)

    def update(self, x: torch.Tensor) -> None:
        """Accumulate one batch (any shape; per channel it must keep the channel count along ``axis``)."""
        rows = self._as_rows(x)
        lo, hi = rows.amin(dim=1).double(), rows.amax(dim=1).double()
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        self._observe(rows)
        self._channels = rows.shape[0]
        self._batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(lo, hi)`` as float32: 0-dim per tensor, shape (C,) per channel.

        Always within the observed ``[min(x, 0), max(x, 0)]``; ``lo <= 0 <= hi`` is not promised
        (minmax gives the raw min / max; the qparams widen it to include 0).
        """
        if self._batches == 0:
            raise DataError(f"observer for {self.name} saw no data")
        lo, hi = self._range()
        # Within the observed range widened to 0 (a symmetric −t never below the data's own
        # floor); + 0.0 turns −0.0 into 0.0.
        lo = torch.maximum(lo, self._min.clamp(max=0.0)).float() + 0.0
        hi = torch.minimum(hi, self._max.clamp(min=0.0)).float() + 0.0
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` from ``scale_zero_from_range(*self.range(), bits, symmetric)``."""
        return scale_zero_from_range(*self.range(), self.bits, self.symmetric)

    def _observe(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running min / max over every batch: the exact range of all data seen."""

    kind = "minmax"

    def _observe(self, rows: torch.Tensor) -> None:
        pass  # the base class already keeps the exact running min / max

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._min, self._max


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min / max.

    The first batch sets ``lo``/``hi``; every later batch moves them by
    ``lo += momentum * (batch_min - lo)`` (likewise ``hi``), like torch.ao's averaging constant.
    """

    kind = "moving_average"
    OPTIONS = ("momentum",)

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None, name: str = "tensor",
                 momentum: float = 0.01):
        super().__init__(bits, symmetric, axis, name)
        if not _is_number(momentum) or not 0 < momentum <= 1:
            raise ConfigError(f"moving_average observer: momentum must be a number in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(dim=1).double(), rows.amax(dim=1).double()
        if self._lo is None:
            self._lo, self._hi = lo, hi
        else:
            self._lo = self._lo + self.momentum * (lo - self._lo)
            self._hi = self._hi + self.momentum * (hi - self._hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lo, self._hi


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_bins(kind: str, bins: Any, least: int, why: str = "") -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < least:
        raise ConfigError(f"{kind} observer: bins must be an integer >= {least}{why}, got {bins!r}")
    return bins


class _HistogramObserver(Observer):
    """A growing histogram per channel (see the module docstring for the rebinning rule).

    State, per channel: ``_lo_edge`` (the histogram's lower edge L, <= 0), ``_width`` (bin
    width w; 0 while only zeros were seen) and ``_hist`` (channels, bins) float64 counts.
    """

    def __init__(self, bits: int, symmetric: bool, axis: int | None, name: str, bins: int, absolute: bool):
        super().__init__(bits, symmetric, axis, name)
        self.bins = bins
        self._absolute = absolute  # histogram of |x| over [0, max|x|] instead of x over [min, max]
        self._hist: torch.Tensor | None = None
        self._lo_edge: torch.Tensor | None = None
        self._width: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        v = rows.double()
        if self._absolute:
            v = v.abs()
        channels = v.shape[0]
        if self._hist is None:
            self._hist = torch.zeros(channels, self.bins, dtype=torch.float64)
            self._lo_edge = torch.zeros(channels, dtype=torch.float64)
            self._width = torch.zeros(channels, dtype=torch.float64)
        self._grow(v.amin(dim=1).clamp(max=0.0), v.amax(dim=1).clamp(min=0.0))
        w = self._width.unsqueeze(1)
        idx = torch.floor((v - self._lo_edge.unsqueeze(1)) / torch.where(w > 0, w, 1.0))
        # A zero-width channel holds only zeros; they go to bin 0. clamp: the top edge (and
        # float rounding at the edges) belongs to the last / first bin.
        idx = torch.where(w > 0, idx, 0.0).clamp(0, self.bins - 1).long()
        flat = idx + torch.arange(channels).unsqueeze(1) * self.bins
        counts = torch.bincount(flat.reshape(-1), minlength=channels * self.bins)
        self._hist += counts.reshape(channels, self.bins).double()

    def _grow(self, bottom: torch.Tensor, top: torch.Tensor) -> None:
        """Widen each channel's range to cover ``[bottom, top]``, merging old bins exactly."""
        B = self.bins
        L, w = self._lo_edge, self._width
        R = L + B * w
        need = (bottom < L) | (top > R)
        if not bool(need.any()):
            return
        fresh = need & (w == 0)  # only zeros so far: a point mass at 0
        grow = need & (w > 0)
        safe_w = torch.where(w > 0, w, 1.0)
        top = torch.maximum(top, R)
        # m whole old bins added below, then f old bins per new bin; the loops fix float rounding
        # so that the new range surely covers [bottom, top].
        m = torch.where(grow, torch.ceil((L - bottom) / safe_w).clamp(min=0), 0.0)
        for _ in range(3):
            short = grow & (L - m * w > bottom)
            if not bool(short.any()):
                break
            m = m + short.double()
        f = torch.where(grow, torch.ceil((m + torch.ceil((top - L) / safe_w)) / B).clamp(min=1), 1.0)
        for _ in range(3):
            short = grow & ((L - m * w) + B * f * w < top)
            if not bool(short.any()):
                break
            f = f + short.double()
        new_L = torch.where(grow, L - m * w, L)
        new_w = torch.where(grow, f * w, w)
        new_L = torch.where(fresh, bottom, new_L)
        new_w = torch.where(fresh, _cover_width(bottom, top, B), new_w)
        j = torch.arange(B, dtype=torch.float64)
        idx = torch.floor((j + m.unsqueeze(1)) / f.unsqueeze(1))
        zero_bin = torch.floor(-new_L / torch.where(new_w > 0, new_w, 1.0)).unsqueeze(1)
        idx = torch.where(fresh.unsqueeze(1), zero_bin, idx).clamp(0, B - 1).long()
        self._hist = torch.zeros_like(self._hist).scatter_add_(1, idx, self._hist)
        self._lo_edge, self._width = new_L, new_w

    def _percentile(self, q: float) -> torch.Tensor:
        """The q-quantile (q in [0, 1]) of the histogrammed values per channel, linear within its bin.

        The value where the histogram's CDF reaches ``q·N``: it lies in the same bin as the
        ``ceil(q·N)``-th smallest value, numpy's ``inverted_cdf`` percentile.
        """
        hist = self._hist
        cum = hist.cumsum(dim=1)
        total = cum[:, -1:]
        target = q * total
        # Snap q·N to an integer when float rounding put it a hair off (99.99% of 1e5 -> 99990).
        target = torch.where((target - target.round()).abs() <= 1e-9 * total, target.round(), target)
        j = torch.searchsorted(cum, target).clamp(max=self.bins - 1)
        count = hist.gather(1, j)
        before = cum.gather(1, j) - count
        frac = torch.where(count > 0, (target - before) / torch.where(count > 0, count, 1.0), 0.0).clamp(0, 1)
        return (self._lo_edge.unsqueeze(1) + (j + frac) * self._width.unsqueeze(1)).squeeze(1)


def _cover_width(bottom: torch.Tensor, top: torch.Tensor, bins: int) -> torch.Tensor:
    """A bin width ``w`` with ``bottom + bins·w >= top`` (nudged up past float rounding)."""
    w = (top - bottom) / bins
    for _ in range(3):
        w = torch.where(bottom + bins * w < top, torch.nextafter(w, torch.full_like(w, math.inf)), w)
    return w


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile: ``(−t, t)`` with t the p-th percentile of |x| (symmetric), or the
    (100 − p)-th and p-th percentiles of x (asymmetric), read from the histogram with linear
    interpolation inside the bin (so within one bin width of the exact percentile).
    """

    kind = "percentile"
    OPTIONS = ("percentile", "bins")

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None, name: str = "tensor",
                 percentile: float = 99.99, bins: int = 2048):
        if not _is_number(percentile) or not 0 < percentile <= 100:
            raise ConfigError(f"percentile observer: percentile must be a number in (0, 100], got {percentile!r}")
        super().__init__(bits, symmetric, axis, name, _check_bins(self.kind, bins, 2), absolute=symmetric)
        self.percentile = float(percentile)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.percentile / 100
        if self.symmetric:
            t = self._percentile(p)
            return -t, t
        return self._percentile(1 - p), self._percentile(p)


class KLObserver(_HistogramObserver):
    """TensorRT entropy calibration (Migacz 2017): the |x| threshold minimizing KL(P‖Q).

    Over the |x| histogram ``h`` (``bins`` bins of width w) with ``levels = 2**(bits-1)``, for
    every candidate ``i`` in ``levels..bins``:

    - P = ``h[:i]`` with the clipped tail's mass ``sum(h[i:])`` added to ``P[i-1]``;
    - Q = ``h[:i]`` *without* the tail (as in TensorRT: otherwise Q = P at ``i = levels`` and
      the smallest candidate always wins) merged into ``levels`` chunks (chunk k is bins
      ``floor(k·i/levels)`` to ``floor((k+1)·i/levels)``, nearly equal sizes), each chunk's
      mass spread uniformly over that chunk's non-zero bins of P, zero where P is zero;
    - both normalized to sum 1, KL(P‖Q) = Σ P log(P/Q). No smoothing: Q = 0 where P > 0
      (a clipped tail landing in an empty chunk) makes KL infinite, i.e. that i is never chosen;
      ``i = bins`` is always finite.

    The smallest KL wins (ties: the larger i, less clipping, so a constant tensor keeps its
    value), and the threshold is ``t = (i + 0.5)·w`` (Migacz's convention), capped at max|x|.
    Symmetric range: ``(−t, t)``; asymmetric: ``[−t, t]`` intersected with the observed
    ``[min(x, 0), max(x, 0)]``. Per tensor only.
    """

    kind = "kl"
    OPTIONS = ("bins",)

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None, name: str = "tensor",
                 bins: int = 2048):
        if axis is not None:
            raise ConfigError("KL is per-tensor; use 'mse' or 'percentile' for per-channel ranges")
        super().__init__(bits, symmetric, axis, name, bins, absolute=True)  # validates bits first
        self.levels = 2 ** (bits - 1)
        _check_bins(self.kind, bins, 2 * self.levels, f" (2 × {self.levels} quantized levels at {bits} bit)")

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = kl_threshold_bin(self._hist[0], self.levels)
        t = ((i + 0.5) * self._width).reshape(1)
        return -t, t


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    """``v·log v`` with ``0·log 0 = 0``."""
    return torch.where(v > 0, v * torch.log(torch.where(v > 0, v, 1.0)), 0.0)


def kl_threshold_bin(hist: torch.Tensor, levels: int) -> int:
    """The candidate ``i`` (in ``levels..len(hist)``) minimizing TensorRT's KL(P‖Q); see ``KLObserver``.

    Vectorized over all candidates with prefix sums. With N = Σ P, N_q = Σ h[:i], chunk
    masses MP_k of P and MH_k of ``h[:i]``, and n_k non-zero bins of P in chunk k
    (Q_j = MH_k / n_k on them): ``N·KL = Σ P log P − N log N + N log N_q − Σ_k MP_k log(MH_k / n_k)``.
    Only ``P[i-1]`` differs from the histogram, so every sum is a difference of prefix sums.
    """
    h = hist.double()
    bins = h.numel()
    if not 1 <= levels <= bins:
        raise ValueError(f"need 1 <= levels <= bins, got levels={levels} for {bins} bins")
    total = float(h.sum())
    if total <= 0:
        return bins
    zero = torch.zeros(1, dtype=torch.float64)
    S = torch.cat([zero, h.cumsum(0)])  # S[b] = mass of bins [0, b)
    Z = torch.cat([zero, (h > 0).double().cumsum(0)])  # non-zero bins in [0, b)
    HL = torch.cat([zero, _xlogx(h).cumsum(0)])  # Σ h log h over [0, b)
    i = torch.arange(levels, bins + 1)  # candidates
    last = h[i - 1] + (total - S[i])  # P[i-1]: its own count plus the clipped tail
    k = torch.arange(levels + 1)
    edges = (i.unsqueeze(1) * k) // levels  # (candidates, levels + 1) chunk boundaries; edges[:, -1] = i
    mass_h = S[edges]
    mass_p = mass_h.clone()
    nonzero = Z[edges]
    # Only the last boundary (b = i) sees the changed P[i-1]; every other boundary is <= i - 1.
    mass_p[:, -1] = total
    nonzero[:, -1] = Z[i - 1] + (last > 0).double()
    MP, MH, n = mass_p.diff(dim=1), mass_h.diff(dim=1), nonzero.diff(dim=1)
    cross = torch.where(MP > 0, MP * torch.log(torch.where(MH > 0, MH, 1.0) / n.clamp(min=1)), 0.0).sum(dim=1)
    n_q = S[i]
    plogp = HL[i - 1] + _xlogx(last)
    kl = (plogp - _xlogx(torch.tensor(total)) + total * torch.log(n_q.clamp(min=1e-300)) - cross) / total
    empty = ((MP > 0) & (MH <= 0)).any(dim=1) | (n_q <= 0)  # Q = 0 where P > 0
    kl = torch.where(empty, math.inf, kl)
    # Prefix sums leave ~1e-13 of noise; within 1e-10 of the minimum counts as a tie, won by the larger i.
    best = torch.nonzero(kl <= kl.min() + 1e-10).max()
    return int(i[best])


class MSEObserver(_HistogramObserver):
    """The clip ``c·range`` minimizing the squared quantization error of the observed data.

    Candidates: ``c`` in ``linspace(min_ratio, 1, grid)``, range ``(−c·max|x|, c·max|x|)``
    symmetric or ``(c·min(x, 0), c·max(x, 0))`` asymmetric, each turned into the real grid by
    ``scale_zero_from_range``; the error is ``Σ (x − dequantize(quantize(x)))²`` and ties go to
    the larger c. It is computed from the histogram, taking the values uniform inside each
    bin: closed-form integrals of the rounding error (a sawtooth squared) inside the grid and
    of the clamp error outside it, so it stays right even where a bin is wider than a
    quantization step (16 bit). Exception: per channel, while only one batch has been seen
    (a weight), the search runs on the exact values of that batch, which is cheaper than
    ``channels × bins`` histogram work and exact; a second batch switches to the histograms.
    """

    kind = "mse"
    OPTIONS = ("grid", "min_ratio", "bins")

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None, name: str = "tensor",
                 grid: int = 100, min_ratio: float = 0.5, bins: int = 2048):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ConfigError(f"mse observer: grid must be an integer >= 2, got {grid!r}")
        if not _is_number(min_ratio) or not 0 < min_ratio <= 1:
            raise ConfigError(f"mse observer: min_ratio must be a number in (0, 1], got {min_ratio!r}")
        super().__init__(bits, symmetric, axis, name, _check_bins(self.kind, bins, 2), absolute=symmetric)
        self.grid = grid
        self.min_ratio = float(min_ratio)
        self._raw: torch.Tensor | None = None

    def candidates(self) -> torch.Tensor:
        """The clip ratios searched, ``linspace(min_ratio, 1, grid)`` (float64)."""
        return torch.linspace(self.min_ratio, 1.0, self.grid, dtype=torch.float64)

    def _observe(self, rows: torch.Tensor) -> None:
        super()._observe(rows)
        # A copy: the caller may reuse or modify its tensor before asking for the range.
        self._raw = rows.clone() if self.axis is not None and self._batches == 0 else None

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            hi = torch.maximum(-self._min, self._max)
            lo = -hi
        else:
            lo, hi = self._min.clamp(max=0.0), self._max.clamp(min=0.0)
        ratios = self.candidates().unsqueeze(1)  # (grid, 1)
        # Rounded to float32 as range() will return them, so the grid searched is the grid used.
        cand_lo, cand_hi = (ratios * lo).float(), (ratios * hi).float()  # (grid, C)
        scale, zero = scale_zero_from_range(cand_lo, cand_hi, self.bits, self.symmetric)
        if self._raw is not None:
            err = _raw_sq_error(self._raw, scale, zero, self.qmin, self.qmax)
        else:
            err = _histogram_sq_error(self._hist, self._lo_edge, self._width, scale, zero, self.qmin, self.qmax)
        best = self.grid - 1 - torch.argmin(err.flip(0), dim=0)  # first minimum from the top: ties -> larger c
        cols = torch.arange(lo.numel())
        return cand_lo[best, cols].double(), cand_hi[best, cols].double()


# Channels per chunk in the MSE searches: about this many values at a time stay in cache.
_CHUNK_VALUES = 2**16


def _raw_sq_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``Σ (x − fake_quantize(x))²`` per (candidate, channel) for x (C, N) and scale/zero (grid, C)."""
    grid, channels = scale.shape
    err = torch.empty(grid, channels, dtype=torch.float64)
    step = max(1, _CHUNK_VALUES // x.shape[1])
    for c0 in range(0, channels, step):
        xc = x[c0:c0 + step]
        s = scale[:, c0:c0 + step].unsqueeze(2)  # (grid, chunk, 1)
        z = zero[:, c0:c0 + step].unsqueeze(2).float()
        lo, hi = qmin - z, qmax - z
        for g in range(grid):
            # The same float32 arithmetic as quantize / dequantize: round(x / s) clamped, times s.
            q = torch.div(xc, s[g]).round_().clamp_(lo[g], hi[g])
            d = torch.addcmul(xc, q, s[g], value=-1.0)
            err[g, c0:c0 + step] = torch.linalg.vecdot(d, d).double()
    return err


def _histogram_sq_error(hist: torch.Tensor, lo_edge: torch.Tensor, width: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Expected ``Σ (x − x̂)²`` per (candidate, channel), values spread uniformly inside each bin.

    ``x̂ = s·clamp(round(x/s), qmin − z, qmax − z)``: inside ``[a, b] = [(qmin − z)s, (qmax − z)s]``
    the error is the rounding sawtooth, whose integral from 0 is ``G(x) = k·s³/12 + r³/3``
    (``k = round(x/s)``, ``r = x − k·s``); outside, ``(x − a)²`` / ``(x − b)²``. Integrals are
    differenced edge to edge with the integer ``k`` kept apart, so nothing large cancels.
    """
    grid, channels = scale.shape
    B = hist.shape[1]
    err = torch.zeros(grid, channels, dtype=torch.float64)
    s_all, z_all = scale.double(), zero.double()
    step = max(1, _CHUNK_VALUES // (B + 1))
    for c0 in range(0, channels, step):
        sl = slice(c0, c0 + step)
        w = width[sl].unsqueeze(1)
        h = hist[sl]
        edges = lo_edge[sl].unsqueeze(1) + torch.arange(B + 1, dtype=torch.float64) * w  # (chunk, B + 1)
        for g in range(grid):
            s, z = s_all[g, sl].unsqueeze(1), z_all[g, sl].unsqueeze(1)
            a, b = (qmin - z) * s, (qmax - z) * s
            inside = torch.minimum(torch.maximum(edges, a), b)
            k = torch.round(inside / s)
            r = inside - k * s
            below = (a - torch.minimum(edges, a)) ** 3  # 3·∫ (x − a)² from the edge up to a
            above = (torch.maximum(edges, b) - b) ** 3  # 3·∫ (x − b)² from b up to the edge
            per_bin = k.diff(dim=1) * s**3 / 12 + (r**3 - below + above).diff(dim=1) / 3  # ∫ error over each bin
            total = (h * per_bin).sum(dim=1) / torch.where(w > 0, w, 1.0).squeeze(1)
            err[g, sl] = torch.where(w.squeeze(1) > 0, total, 0.0)
    return err


_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "kl": KLObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, *, bits: int = 8, symmetric: bool = True, axis: int | None = None,
                  tensor_name: str = "tensor", **options: Any) -> Observer:
    """Build the observer called ``name`` (one of ``OBSERVERS``, or ``"entropy"`` for ``"kl"``).

    ``options`` are the observer's own settings (``momentum``; ``percentile``/``bins``;
    ``bins``; ``grid``/``min_ratio``/``bins``). Unknown names or options, and invalid values,
    raise ConfigError saying what is valid.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    key = ALIASES.get(key, key)
    if key not in _CLASSES:
        hint = closest(str(name), OBSERVERS + tuple(ALIASES))
        raise ConfigError(f"unknown observer {name!r}; valid observers: {', '.join(OBSERVERS)} "
                          f"('entropy' = 'kl'){hint}")
    cls = _CLASSES[key]
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        valid = ", ".join(cls.OPTIONS) if cls.OPTIONS else "none"
        raise ConfigError(f"observer {key!r} has no option {unknown[0]!r}{closest(unknown[0], cls.OPTIONS)}; "
                          f"its options: {valid}")
    return cls(bits=bits, symmetric=symmetric, axis=axis, name=tensor_name, **options)
