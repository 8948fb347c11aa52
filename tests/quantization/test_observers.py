"""Observers against slow, obvious references (sorting, loops, brute force in float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError, DataError
from slimkit.quantization.observers import (
    OBSERVERS,
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    kl_threshold_bin,
    make_observer,
)
from slimkit.quantization.primitives import fake_quantize, scale_zero_from_range

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sq_error(x: torch.Tensor, lo, hi, bits: int, symmetric: bool, axis: int | None = None) -> torch.Tensor:
    """Σ (x − fake_quantize(x))² in float64, per tensor or per slice along ``axis`` (dim 0 of the result)."""
    s, z = scale_zero_from_range(torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32),
                                 bits, symmetric)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    d = (x - fake_quantize(x, s, z, bits, symmetric)).double() ** 2
    if axis is None:
        return d.sum()
    return d.movedim(axis, 0).reshape(d.shape[axis], -1).sum(1)


# --- minmax / moving average ---------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_minmax_equals_concatenation_and_slices(axis):
    g = _gen(1)
    batches = [torch.randn(3, 5, 4, generator=g) * (i + 1) for i in range(4)]
    obs = MinMaxObserver(axis=axis)
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    assert obs.batches == 4 and lo.dtype == hi.dtype == torch.float32
    if axis is None:
        cat = torch.cat([b.reshape(-1) for b in batches])
        assert lo.shape == () and lo == cat.min() and hi == cat.max()
        return
    cat = torch.cat(batches, dim=0 if axis != 0 else 1)  # concatenate along a dim that is not the channel axis
    channels = cat.shape[axis]
    assert lo.shape == hi.shape == (channels,)
    for c in range(channels):
        sl = cat.select(axis, c)
        one = MinMaxObserver()
        one.update(sl)
        assert lo[c] == sl.min() == one.range()[0] and hi[c] == sl.max() == one.range()[1]


@pytest.mark.parametrize("axis", [None, 1])
def test_moving_average_follows_the_recurrence(axis):
    g = _gen(2)
    batches = [torch.randn(4, 3, generator=g) * (1 + i) + i for i in range(5)]
    obs = MovingAverageMinMaxObserver(momentum=0.3, axis=axis)
    for b in batches:
        obs.update(b)
    channels = 1 if axis is None else 3
    for c in range(channels):
        vals = [b.reshape(-1) if axis is None else b[:, c] for b in batches]
        lo, hi = float(vals[0].min()), float(vals[0].max())
        for v in vals[1:]:
            lo = lo + 0.3 * (float(v.min()) - lo)
            hi = hi + 0.3 * (float(v.max()) - hi)
        got_lo, got_hi = obs.range()
        if axis is not None:
            got_lo, got_hi = got_lo[c], got_hi[c]
        assert got_lo == torch.tensor(lo, dtype=torch.float32) and got_hi == torch.tensor(hi, dtype=torch.float32)
    last = MovingAverageMinMaxObserver(momentum=1.0)
    for b in batches:
        last.update(b)
    assert last.range() == (batches[-1].min(), batches[-1].max())
    first = MovingAverageMinMaxObserver(momentum=0.01)
    first.update(batches[0])
    assert first.range() == (batches[0].min(), batches[0].max())


# --- percentile ----------------------------------------------------------------------------


def _inverted_cdf(values: np.ndarray, q: float) -> float:
    """numpy's inverted-CDF percentile: the ceil(q·N)-th smallest value (float64)."""
    return float(np.percentile(values, q * 100, method="inverted_cdf"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_sorted_data_within_a_bin(symmetric):
    x = torch.randn(100_000, generator=_gen(3)) * 2 + (0.0 if symmetric else 0.7)
    x[:5] = torch.tensor([30.0, -25.0, 18.0, -9.0, 40.0])
    for p in (99.99, 99.9, 99.0, 100.0):
        obs = PercentileObserver(percentile=p, symmetric=symmetric)
        obs.update(x)
        lo, hi = obs.range()
        x64 = x.double().numpy()
        if symmetric:
            a = np.abs(x64)
            width = a.max() / obs.bins
            t = _inverted_cdf(a, p / 100)
            assert abs(float(hi) - t) <= width * 1.001
            assert float(lo) == max(-float(hi), float(x.min()))  # (−t, t) within the data's own range
        else:
            width = (max(x64.max(), 0) - min(x64.min(), 0)) / obs.bins
            assert abs(float(lo) - _inverted_cdf(x64, 1 - p / 100)) <= width * 1.001
            assert abs(float(hi) - _inverted_cdf(x64, p / 100)) <= width * 1.001
    assert hi == x.max()  # p = 100 gives the maximum exactly


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_across_batches_with_range_growth(symmetric):
    g = _gen(4)
    small = torch.randn(20_000, generator=g).abs() * 0.01  # only positive: the asymmetric range must shift later
    large = torch.randn(20_000, generator=g) * 1.0 - 0.5  # 100x wider, mostly on the other side of 0
    grown = PercentileObserver(percentile=99.0, symmetric=symmetric)
    grown.update(small)
    grown.update(large)
    once = PercentileObserver(percentile=99.0, symmetric=symmetric)
    cat = torch.cat([small, large])
    once.update(cat)
    c64 = cat.double().numpy()
    span = np.abs(c64).max() if symmetric else max(c64.max(), 0) - min(c64.min(), 0)
    w_once, w_grown = span / 2048, 2.01 * span / 2048  # growth at most about doubles the range
    for got, single, q in ((grown.range()[1], once.range()[1], 0.99), (grown.range()[0], once.range()[0], 0.01)):
        assert abs(float(got) - float(single)) <= w_once + w_grown
        if not symmetric:
            assert abs(float(got) - _inverted_cdf(c64, q)) <= w_grown
    if symmetric:
        assert abs(float(grown.range()[1]) - _inverted_cdf(np.abs(c64), 0.99)) <= w_grown


def test_growth_merges_old_bins_exactly():
    """After growing, the histogram equals binning all the data directly on the new edges."""
    g = _gen(5)
    batches = [torch.rand(3000, generator=g) * 0.3 + 0.1, torch.randn(3000, generator=g) * 5,
               torch.rand(3000, generator=g) * 40 - 45, torch.zeros(10)]
    obs = MSEObserver(symmetric=False, bins=512)
    for b in batches:
        obs.update(b)
    L, w = float(obs._lo_edge[0]), float(obs._width[0])
    cat = torch.cat(batches).double()
    assert L <= float(cat.min()) and L + 512 * w >= float(cat.max())
    direct = torch.bincount(torch.floor((cat - L) / w).clamp(0, 511).long(), minlength=512).double()
    assert torch.equal(obs._hist[0], direct)
    # zeros first: a point mass at 0 that later data spreads into a real histogram
    z = PercentileObserver(percentile=100.0)
    z.update(torch.zeros(50))
    assert z.range() == (0.0, 0.0)
    z.update(torch.tensor([-2.0, 1.0]))
    assert float(z._hist.sum()) == 52 and z.range() == (-2.0, 1.0)  # t = 2 meets the data's own top 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_per_channel_equals_slices(symmetric):
    g = _gen(6)
    batches = [torch.randn(7, 5, 200, generator=g) * torch.rand(1, 5, 1, generator=g) * 4 for _ in range(2)]
    obs = PercentileObserver(percentile=99.0, symmetric=symmetric, axis=-2)
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    assert lo.shape == (5,)
    for c in range(5):
        one = PercentileObserver(percentile=99.0, symmetric=symmetric)
        for b in batches:
            one.update(b[:, c])
        assert torch.equal(torch.stack(one.range()), torch.stack([lo[c], hi[c]]))


# --- KL ------------------------------------------------------------------------------------


def kl_reference(hist: np.ndarray, levels: int) -> int:
    """Migacz's algorithm, written out with loops in float64: the chosen candidate i."""
    bins = len(hist)
    kls = []
    for i in range(levels, bins + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        clipped = hist[:i].astype(np.float64)
        q = np.zeros(i)
        for k in range(levels):
            a, b = k * i // levels, (k + 1) * i // levels
            nonzero = p[a:b] != 0
            if nonzero.any():
                q[a:b][nonzero] = clipped[a:b].sum() / nonzero.sum()
        if q.sum() == 0:
            kls.append(math.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)):
            kls.append(math.inf)
            continue
        m = p > 0
        kls.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    kls = np.array(kls)
    return levels + int(np.nonzero(kls <= kls.min() + 1e-10)[0].max())  # ties: the larger i


@pytest.mark.parametrize("seed", range(4))
def test_kl_threshold_bin_matches_loop_reference_on_odd_histograms(seed):
    rng = np.random.default_rng(seed)
    bins, levels = (300, 16) if seed % 2 else (200, 64)
    hist = rng.poisson(rng.exponential(20, size=bins) * np.exp(-np.arange(bins) / 40)).astype(np.float64)
    hist[rng.random(bins) < 0.3] = 0  # many empty bins, so Q can be zero where the clipped tail lands
    if seed == 3:
        hist[:] = 0
        hist[-1] = 7  # everything in the top bin: only the full range has finite KL
    assert kl_threshold_bin(torch.from_numpy(hist), levels) == kl_reference(hist, levels)


@pytest.mark.parametrize(("bits", "bins"), [(8, 512), (4, 2048)])
def test_kl_observer_matches_reference_threshold(bits, bins):
    g = _gen(7 + bits)
    x = torch.randn(50_000, generator=g) * torch.rand(50_000, generator=g) ** 2 * 3  # heavy-ish tails
    obs = KLObserver(bits=bits, bins=bins)
    obs.update(x)
    a = x.double().abs().numpy()
    w = a.max() / bins
    hist = np.bincount(np.clip(np.floor(a / w), 0, bins - 1).astype(np.int64), minlength=bins)
    i = kl_reference(hist, 2 ** (bits - 1))
    t = min((i + 0.5) * w, a.max())
    lo, hi = obs.range()
    assert float(hi) == pytest.approx(t, rel=1e-6) and float(lo) == -float(hi)
    assert i < bins  # the test data really is clipped
    asym = make_observer("entropy", bits=bits, symmetric=False, bins=bins)
    shifted = x.clamp(min=-0.2)  # skewed data: the asymmetric range is [−t, t] ∩ [min, max]
    asym.update(shifted)
    sym = KLObserver(bits=bits, bins=bins)
    sym.update(shifted)
    t_sym = float(sym.range()[1])
    assert asym.range() == (max(-t_sym, float(shifted.min())), min(t_sym, float(shifted.max())))


def test_kl_clips_outliers_and_beats_minmax():
    x = torch.randn(400_000, generator=_gen(8))
    x[:2] = torch.tensor([20.0, -20.0])
    errors, thresholds = {}, {}
    for name in ("minmax", "kl"):
        obs = make_observer(name)
        obs.update(x)
        thresholds[name] = float(obs.range()[1])
        errors[name] = float(_sq_error(x, *obs.range(), 8, True))
    assert 3.0 < thresholds["kl"] < 0.5 * thresholds["minmax"]
    assert errors["kl"] < 0.8 * errors["minmax"]


@pytest.mark.parametrize("name", OBSERVERS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_inputs_give_finite_ranges(name, symmetric):
    cases = {"zeros": torch.zeros(64), "constant": torch.full((64,), 3.0),
             "tiny": torch.randn(1000, generator=_gen(9)) * 1e-30, "subnormal": torch.tensor([1e-44, -3e-45, 0.0])}
    for label, x in cases.items():
        obs = make_observer(name, symmetric=symmetric)
        obs.update(x)
        lo, hi = obs.range()
        s, z = obs.qparams()
        assert torch.isfinite(lo) and torch.isfinite(hi) and torch.isfinite(s) and s > 0, label
        if label == "zeros":
            assert lo == hi == 0 and s == 1
        if label == "constant":  # no clipping of a constant (percentile interpolates inside the top bin)
            assert float(hi) == pytest.approx(3.0, rel=1e-4)
            assert torch.allclose(fake_quantize(x, s, z, 8, symmetric), x, rtol=1e-3)
        if label == "tiny":
            assert 0 < hi <= x.max()
            assert float(_sq_error(x, lo, hi, 8, symmetric)) <= 1e-3 * float((x.double() ** 2).sum())


# --- MSE -----------------------------------------------------------------------------------


def mse_brute_force(x: torch.Tensor, ratios: torch.Tensor, bits: int, symmetric: bool):
    """Raw-data error of every candidate clip; returns (best ratio, errors)."""
    xmin, xmax = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    errors = []
    for c in ratios.tolist():
        if symmetric:
            a = c * max(-xmin, xmax)
            lo, hi = -a, a
        else:
            lo, hi = c * xmin, c * xmax
        errors.append(float(_sq_error(x, lo, hi, bits, symmetric)))
    return errors


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_matches_brute_force_on_raw_data(bits, symmetric):
    g = _gen(10 + bits + symmetric)
    batches = [torch.randn(20_000, generator=g), torch.randn(20_000, generator=g) * 1.5 + 0.3]
    batches[1][:3] = torch.tensor([12.0, -7.0, 9.0])
    obs = MSEObserver(bits=bits, symmetric=symmetric, grid=40, min_ratio=0.2)
    for b in batches:
        obs.update(b)
    x = torch.cat(batches)
    errors = mse_brute_force(x, obs.candidates(), bits, symmetric)
    got = float(_sq_error(x, *obs.range(), bits, symmetric))
    assert got <= min(errors) * 1.01  # the histogram's choice is (nearly) the brute-force optimum
    assert got < errors[-1]  # and better than the plain min/max range (c = 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_per_channel_single_batch_is_exact_brute_force(symmetric):
    w = torch.randn(6, 64, generator=_gen(11))
    w[:, 0] = torch.tensor([30.0, -20.0, 5.0, 0.0, 8.0, -3.0])
    w[3] = 0.0
    obs = make_observer("mse", axis=0, bits=4, symmetric=symmetric, grid=30)
    obs.update(w)
    lo, hi = obs.range()
    ratios = obs.candidates()
    for r in range(6):
        errors = mse_brute_force(w[r], ratios, 4, symmetric)
        got = float(_sq_error(w[r], lo[r], hi[r], 4, symmetric))
        assert got <= min(errors) * (1 + 1e-5) + 1e-12, r
    assert lo[3] == hi[3] == 0
    # a second batch switches to the histograms: per channel it equals per-tensor on each slice
    obs.update(w * 0.5)
    lo2, hi2 = obs.range()
    for r in range(6):
        one = MSEObserver(bits=4, symmetric=symmetric, grid=30)
        one.update(w[r])
        one.update(w[r] * 0.5)
        assert torch.equal(torch.stack(one.range()), torch.stack([lo2[r], hi2[r]]))


def test_mse_never_worse_than_minmax_on_outliers():
    g = _gen(12)
    for bits in (8, 4):
        x = torch.randn(8, 500, generator=g)
        x[:, 0] = 12.0 * torch.sign(torch.randn(8, generator=g))  # one outlier per row
        for axis in (None, 0):
            mse, mm = make_observer("mse", bits=bits, axis=axis), make_observer("minmax", bits=bits, axis=axis)
            mse.update(x)
            mm.update(x)
            err_mse = _sq_error(x, *mse.range(), bits, True, axis)
            err_mm = _sq_error(x, *mm.range(), bits, True, axis)
            assert (err_mse <= err_mm).all()
            if bits == 4:  # at 8 bit keeping the outliers is right; at 4 bit clipping them pays
                assert (err_mse < 0.8 * err_mm).all()


# --- qparams and the registry --------------------------------------------------------------


@pytest.mark.parametrize("name", OBSERVERS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_qparams_is_scale_zero_of_range(name, symmetric, bits):
    x = torch.randn(4, 300, generator=_gen(13)) * 2 + 1
    axis = None if name == "kl" else 0
    options = {"bins": 256} if name in ("percentile", "kl", "mse") else {}
    obs = make_observer(name, bits=bits, symmetric=symmetric, axis=axis, **options)
    obs.update(x)
    obs.update(x * 0.8)
    s, z = obs.qparams()
    s_ref, z_ref = scale_zero_from_range(*obs.range(), bits, symmetric)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    assert s.shape == (() if axis is None else (4,))
    assert (s > 0).all()
    if symmetric:
        assert (z == 0).all()


def test_make_observer_names_aliases_and_options():
    assert isinstance(make_observer("entropy"), KLObserver)
    assert isinstance(make_observer("moving_average", momentum=0.5), MovingAverageMinMaxObserver)
    obs = make_observer("percentile", percentile=99.9, bins=512, bits=4, symmetric=False, tensor_name="fc1 input")
    assert (obs.percentile, obs.bins, obs.bits, obs.symmetric, obs.name) == (99.9, 512, 4, False, "fc1 input")
    with pytest.raises(ConfigError, match=r"did you mean 'minmax'") as err:
        make_observer("minmx")
    assert all(n in str(err.value) for n in OBSERVERS)
    with pytest.raises(ConfigError, match=r"'percentile'.*'pct'.*percentile, bins"):
        make_observer("percentile", pct=99.0)
    with pytest.raises(ConfigError, match="momentum"):
        make_observer("minmax", momentum=0.1)


@pytest.mark.parametrize(("name", "options"), [
    ("percentile", {"percentile": 0.0}), ("percentile", {"percentile": 100.5}), ("percentile", {"percentile": -1}),
    ("percentile", {"percentile": float("nan")}), ("percentile", {"percentile": True}),
    ("kl", {"bins": 255}), ("kl", {"bins": 1000.0}), ("mse", {"grid": 1}), ("mse", {"min_ratio": 0.0}),
    ("mse", {"min_ratio": 1.5}), ("moving_average", {"momentum": 0.0}), ("moving_average", {"momentum": 1.5}),
    ("minmax", {"bits": 0}), ("minmax", {"bits": 32}), ("minmax", {"axis": 1.5}), ("minmax", {"symmetric": "yes"}),
])
def test_bad_option_values(name, options):
    with pytest.raises(ConfigError):
        make_observer(name, **options)


def test_kl_refuses_per_channel_and_small_bins_per_bits():
    with pytest.raises(ConfigError, match="per-tensor.*'mse' or 'percentile'"):
        make_observer("kl", axis=0)
    with pytest.raises(ConfigError, match="bins"):
        KLObserver(bits=4, bins=15)
    assert KLObserver(bits=4, bins=16).levels == 8


# --- data errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBSERVERS)
def test_data_errors_name_the_tensor(name):
    obs = make_observer(name, tensor_name="input of encoder.fc1")
    with pytest.raises(DataError, match="input of encoder.fc1 saw no data"):
        obs.range()
    with pytest.raises(DataError, match="saw no data"):
        obs.qparams()
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(DataError, match="input of encoder.fc1.*NaN or inf"):
            obs.update(torch.tensor([1.0, bad]))
    for empty in (torch.empty(0), torch.empty(3, 0)):
        with pytest.raises(DataError, match="input of encoder.fc1.*empty"):
            obs.update(empty)
    assert obs.batches == 0  # refused batches leave no trace
    obs.update(torch.tensor([1.0, -2.0]))
    assert obs.batches == 1


def test_channel_count_must_stay_the_same():
    obs = make_observer("percentile", axis=1, tensor_name="x")
    obs.update(torch.randn(4, 3))
    with pytest.raises(DataError, match="5 channels.*3"):
        obs.update(torch.randn(4, 5))
    with pytest.raises(DataError, match="axis 1 is out of range"):
        obs.update(torch.randn(3))
    obs.update(torch.randn(9, 3))
    assert obs.batches == 2 and obs.range()[0].shape == (3,)


# --- property ------------------------------------------------------------------------------

_values = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(OBSERVERS),
    symmetric=st.booleans(),
    bits=st.sampled_from([8, 4]),
    batches=st.lists(st.lists(_values, min_size=1, max_size=30), min_size=1, max_size=3),
)
def test_range_stays_inside_the_data(name, symmetric, bits, batches):
    options = {"bins": 256} if name in ("percentile", "kl", "mse") else {}
    obs = make_observer(name, bits=bits, symmetric=symmetric, **options)
    for b in batches:
        obs.update(torch.tensor(b, dtype=torch.float32))
    data = torch.tensor([v for b in batches for v in b], dtype=torch.float32)
    lo, hi = obs.range()
    floor, ceil = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
    assert floor <= float(lo) <= float(hi) <= ceil
    s, _ = obs.qparams()
    assert torch.isfinite(s) and s > 0
