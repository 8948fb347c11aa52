"""Range search for RTN (MSE clip search, HQQ) against slow float64 references; 3-bit codes and packing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.quantization.modules import QuantLinear
from slimkit.quantization.primitives import (
    pack,
    packed_size,
    qrange,
    quantize_weight,
    unpack,
)
from slimkit.quantization.range_search import (
    DEFAULT_GRID,
    clip_errors,
    clip_factors,
    hqq_quantize,
    mse_clip_scales,
    shrink_lp,
)

torch.set_num_threads(1)


def heavy_tailed(rows, cols, seed):
    """Student-t (3 dof) weights: a few large entries per group, as in trained LLM layers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi = torch.randn(rows, cols, 3, generator=g, dtype=torch.float64).pow(2).sum(-1)
    return (z / (chi / 3).sqrt() * 0.02).float()


def sq_error(w, qw):
    return float((w.double() - qw.dequantize().double()).pow(2).sum())


# --- 3-bit codes and packing ---------------------------------------------------------------


def reference_pack(codes, bits):
    """Little-endian bit stream of unsigned codes, built with Python integers."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= int(c) << (i * bits)
    n_bytes = -(-len(codes) * bits // 8)
    n_bytes = -(-n_bytes // 3) * 3 if bits == 3 else n_bytes  # 3-bit words are 3 bytes (8 codes)
    return [(stream >> (8 * k)) & 0xFF for k in range(n_bytes)]


def test_pack_3bit_hand_computed():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    # Code i at bits 3i..3i+2: byte0 = 1 | 2<<3 | (3 & 0b11)<<6 = 209, byte1 = 4<<1 | 5<<4 (the bits 3 and 6 carry into it are 0) = 88.
    assert pack(codes, 3, symmetric=False).tolist() == [209, 88, 31]
    assert pack(codes, 3, symmetric=False).tolist() == reference_pack(codes.tolist(), 3)
    assert packed_size(8, 3) == 3 and packed_size(9, 3) == 6
    signed = torch.tensor([-3, 0, 3], dtype=torch.int8)  # stored +4: 1, 4, 7
    assert pack(signed, 3).tolist() == reference_pack([1, 4, 7], 3)


@settings(max_examples=40, deadline=None)
@given(symmetric=st.booleans(), rows=st.integers(1, 3), cols=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_pack_unpack_3bit_round_trip(symmetric, rows, cols, seed):
    lo, hi = qrange(3, symmetric)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (rows, cols), generator=g).to(torch.int8 if symmetric else torch.uint8)
    packed = pack(q, 3, symmetric=symmetric)
    assert packed.shape == (rows, packed_size(cols, 3))
    assert torch.equal(unpack(packed, 3, cols, symmetric=symmetric), q)
    offset = 4 if symmetric else 0
    assert packed[0].tolist() == reference_pack([int(v) + offset for v in q[0]], 3)


def test_quantlinear_3bit_stores_3_bits_per_code():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    for symmetric in (True, False):
        ql = QuantLinear.from_linear(lin, 3, 32, symmetric)
        assert ql.qweight.dtype == torch.uint8 and ql.qweight.shape == (16, 64 * 3 // 8)
        ref = quantize_weight(lin.weight, 3, group_size=32, symmetric=symmetric)
        assert torch.equal(ql.codes(), ref.q)
        lo, hi = qrange(3, symmetric)
        assert int(ql.codes().min()) >= lo and int(ql.codes().max()) <= hi
        x = torch.randn(4, 64)
        assert torch.allclose(ql(x), x @ ref.dequantize().T + lin.bias, atol=1e-5)


# --- MSE clip search ---------------------------------------------------------------------


def brute_force_clip(w, bits, group_size, symmetric, grid, x=None):
    """Per group and factor, quantize in float64 with scalar loops; error on weights, or on outputs of tokens ``x``."""
    w = w.double()
    rows, cols = w.shape
    gs = cols if group_size is None else group_size
    qmin, qmax = qrange(bits, symmetric)
    errors = torch.zeros(len(grid), rows, cols // gs, dtype=torch.float64)
    for k, c in enumerate(grid):
        for r in range(rows):
            for g in range(cols // gs):
                v = w[r, g * gs:(g + 1) * gs]
                lo, hi = min(0.0, c * float(v.min())), max(0.0, c * float(v.max()))
                if symmetric:
                    s = max(-lo, hi) / qmax
                    z = 0
                else:
                    s = (hi - lo) / (qmax - qmin)
                    z = min(max(round(qmin - lo / s), qmin), qmax)
                q = torch.clamp(torch.round(v / s) + z, qmin, qmax)
                d = v - (q - z) * s
                if x is None:
                    errors[k, r, g] = float((d * d).sum())
                else:
                    errors[k, r, g] = float(((x.double()[:, g * gs:(g + 1) * gs] @ d) ** 2).sum())
    return errors


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 8, False), (3, 16, True), (2, None, False)])
def test_clip_search_matches_brute_force(bits, group_size, symmetric):
    w = heavy_tailed(4, 32, seed=bits)
    grid = DEFAULT_GRID
    ref = brute_force_clip(w, bits, group_size, symmetric, grid)
    got = clip_errors(w, bits, group_size, symmetric, grid)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-12)
    chosen = ref.argmin(0)
    assert torch.equal(clip_factors(w, bits, group_size, symmetric, grid),
                       torch.tensor(grid, dtype=torch.float32)[chosen])
    qw = mse_clip_scales(w, bits, group_size, symmetric, grid)
    assert sq_error(w, qw) == pytest.approx(float(ref.min(0).values.sum()), rel=1e-4)
    assert (chosen > 0).any()  # heavy tails: some group really is clipped


def test_clip_search_with_gram_is_the_output_error():
    w = heavy_tailed(3, 32, seed=5)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    x[:, 3] *= 20  # an outlier input channel
    gram = x.T @ x
    ref = brute_force_clip(w, 4, 16, False, DEFAULT_GRID, x)
    assert torch.allclose(clip_errors(w, 4, 16, False, gram=gram), ref, rtol=1e-3)
    assert torch.equal(clip_factors(w, 4, 16, False, gram=gram), torch.tensor(DEFAULT_GRID)[ref.argmin(0)])


def test_clip_factor_one_is_plain_rtn():
    w = heavy_tailed(8, 64, seed=3)
    for symmetric in (True, False):
        qw = mse_clip_scales(w, 4, 32, symmetric, grid=(1.0,))
        ref = quantize_weight(w, 4, group_size=32, symmetric=symmetric)
        assert torch.equal(qw.q, ref.q) and torch.equal(qw.scale, ref.scale)
        assert (qw.zero is None) == symmetric and (symmetric or torch.equal(qw.zero, ref.zero))


# --- HQQ ---------------------------------------------------------------------------------


def test_shrink_lp():
    x = torch.tensor([-2.0, -0.01, 0.0, 0.01, 2.0], dtype=torch.float64)
    soft = shrink_lp(x, beta=10.0, p=1.0)  # soft threshold at 1/beta = 0.1
    assert torch.allclose(soft, torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9], dtype=torch.float64))
    lp = shrink_lp(x, beta=10.0, p=0.7)  # threshold |x|^(p-1)/beta: large for small x, small for large x
    expected = torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12) ** -0.3 / 10)
    assert torch.allclose(lp, expected) and lp[1] == 0 and lp[3] == 0 and lp[2] == 0
    assert float(lp[4]) == pytest.approx(2 - 2 ** -0.3 / 10)


def test_hqq_without_iterations_is_rtn_and_iterations_help():
    w = heavy_tailed(16, 128, seed=2)
    ref = quantize_weight(w, 4, group_size=64, symmetric=False)
    zero_iters = hqq_quantize(w, 4, 64, iters=0)
    assert torch.equal(zero_iters.q, ref.q) and torch.equal(zero_iters.scale, ref.scale)
    assert torch.equal(zero_iters.zero, ref.zero)
    assert sq_error(w, hqq_quantize(w, 4, 64)) < 0.97 * sq_error(w, ref)


def test_hqq_group_update_matches_reference_least_squares():
    """One iteration on a single group, redone by hand in float64 (shrink, LS fit, integer zero, refit)."""
    w = heavy_tailed(1, 16, seed=11)
    qmin, qmax = 0, 15
    ref = quantize_weight(w, 4, group_size=16, symmetric=False)
    wd = w.double()[0]
    q = ref.q.double()[0]
    s, z = float(ref.scale[0, 0]), float(ref.zero[0, 0])
    t = wd - shrink_lp(wd - (q - z) * s, 10.0, 0.7)
    a = float(((q - q.mean()) * (t - t.mean())).sum() / ((q - q.mean()) ** 2).sum())
    b = float(t.mean() - a * q.mean())
    z1 = min(max(round(-b / a), qmin), qmax)
    s1 = float((t * (q - z1)).sum() / ((q - z1) ** 2).sum())
    q1 = torch.clamp(torch.round(wd / s1) + z1, qmin, qmax)
    err1 = float(((wd - (q1 - z1) * s1) ** 2).sum())
    got = hqq_quantize(w, 4, 16, iters=1)
    if err1 < sq_error(w, ref):  # the iterate is kept only when it is better
        assert int(got.zero[0, 0]) == z1 and float(got.scale[0, 0]) == pytest.approx(s1, rel=1e-6)
        assert sq_error(w, got) == pytest.approx(err1, rel=1e-5)
    else:
        assert torch.equal(got.q, ref.q)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    rows=st.integers(1, 8),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 16, 32, None]),
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
)
def test_range_search_never_worse_than_rtn(seed, rows, n_groups, group_size, bits, symmetric):
    cols = n_groups * (group_size or 16)
    w = heavy_tailed(rows, cols, seed)
    rtn = quantize_weight(w, bits, group_size=group_size, symmetric=symmetric)
    base = sq_error(w, rtn)
    mse = mse_clip_scales(w, bits, group_size, symmetric)
    assert sq_error(w, mse) <= base * (1 + 1e-6) + 1e-12
    results = [mse]
    if not symmetric:
        hqq = hqq_quantize(w, bits, group_size)
        assert sq_error(w, hqq) <= base * (1 + 1e-6) + 1e-12
        results.append(hqq)
    lo, hi = qrange(bits, symmetric)
    n_g = 1 if group_size is None else cols // group_size
    for qw in results:  # exact code ranges and storage dtypes
        assert qw.q.shape == (rows, cols) and qw.scale.shape == (rows, n_g) and qw.scale.dtype == torch.float32
        assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
        assert bool((qw.scale > 0).all())
        if symmetric:
            assert qw.zero is None and qw.q.dtype == torch.int8
        else:
            assert qw.zero.dtype == torch.uint8 and int(qw.zero.max()) <= hi and qw.q.dtype == torch.uint8


def test_bad_arguments():
    w = heavy_tailed(2, 16, seed=0)
    with pytest.raises(ValueError, match="grid"):
        mse_clip_scales(w, 4, 8, True, grid=(1.0, 0.0))
    with pytest.raises(ValueError, match="binary"):
        mse_clip_scales(w, 1, 8, True)
    with pytest.raises(ValueError, match="lp"):
        hqq_quantize(w, 4, 8, lp=1.5)
    with pytest.raises(ValueError, match="gram"):
        clip_errors(w, 4, 8, True, gram=torch.eye(8))
    with pytest.raises(ValueError, match="NaN"):
        hqq_quantize(torch.full((2, 8), float("nan")), 4, 8)
