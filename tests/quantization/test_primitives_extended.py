"""Per-axis, binary and 16-bit quantization against slow float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import DataError
from slimkit.quantization.primitives import (
    binary_scale,
    code_dtype,
    dequantize,
    fake_quantize,
    pack,
    qrange,
    quantize,
    quantize_weight,
    tensor_qparams,
    unpack,
)


def reference_per_axis(x: torch.Tensor, bits: int, symmetric: bool, axis: int):
    """Slow reference: loop over the slices along ``axis`` in float64, quantize each with its own min/max."""
    x64 = x.double().movedim(axis, 0)
    out = torch.empty_like(x64)
    for c in range(x64.shape[0]):
        sl = x64[c]
        lo, hi = min(float(sl.min()), 0.0), max(float(sl.max()), 0.0)
        if symmetric:
            qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
            s = max(-lo, hi) / qmax
        else:
            qmin, qmax = 0, 2**bits - 1
            s = (hi - lo) / (qmax - qmin)
        s = torch.tensor(s, dtype=torch.float32).item() or 1.0
        z = 0 if symmetric else min(max(round(qmin - lo / s), qmin), qmax)
        q = torch.clamp(torch.round(sl.float() / s).double() + z, qmin, qmax)
        out[c] = (q - z) * s
    return out.movedim(0, axis)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False), (16, True)])
def test_per_axis_matches_reference(axis, bits, symmetric):
    torch.manual_seed(axis + bits)
    x = torch.randn(3, 5, 7) * torch.linspace(0.1, 3, 7)
    scale, zero = tensor_qparams(x, bits, symmetric=symmetric, axis=axis)
    keep = axis % 3
    assert scale.shape == tuple(x.shape[d] if d == keep else 1 for d in range(3))
    got = fake_quantize(x, scale, None if symmetric else zero, bits, symmetric)
    assert torch.allclose(got.double(), reference_per_axis(x, bits, symmetric, axis), atol=1e-6)


def test_per_tensor_error_bound_and_codes_dtype():
    x = torch.randn(64, 32)
    for bits, symmetric in [(8, True), (8, False), (16, True), (16, False)]:
        scale, zero = tensor_qparams(x, bits, symmetric=symmetric)
        q = quantize(x, scale, None if symmetric else zero, bits, symmetric)
        assert q.dtype == code_dtype(symmetric, bits)
        qmin, qmax = qrange(bits, symmetric)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
        err = (dequantize(q, scale, None if symmetric else zero) - x).abs().max()
        assert err <= scale.max() / 2 + 1e-6  # round to nearest inside the range: half a step


def test_int16_is_far_finer_than_int8():
    x = torch.randn(256, 64)
    e8 = (fake_quantize(x, *_sym(x, 8), 8, True) - x).abs().max()
    e16 = (fake_quantize(x, *_sym(x, 16), 16, True) - x).abs().max()
    assert qrange(16, True) == (-32767, 32767)
    assert e16 < e8 / 200


def _sym(x, bits):
    scale, _ = tensor_qparams(x, bits, symmetric=True)
    return scale, None


def test_binary_codes_and_l2_optimal_scale():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.1, -0.2, 0.3, 0.0]])
    qw = quantize_weight(w, 1)
    assert qw.q.tolist() == [[1, -1, 1, 1], [-1, -1, 1, 1]]  # 0 -> +1
    assert torch.allclose(qw.scale.squeeze(1), w.abs().mean(1))
    # mean|w| minimizes ||w - s·sign(w)||²: any other scale is worse
    best = (qw.dequantize() - w).pow(2).sum()
    for factor in (0.9, 1.1):
        assert (qw.dequantize() * factor - w).pow(2).sum() > best
    assert qrange(1, True) == (-1, 1)


def test_binary_grouped_and_per_axis():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    qw = quantize_weight(w, 1, group_size=8)
    ref = w.reshape(4, 2, 8).abs().mean(-1)
    assert torch.allclose(qw.scale, ref)
    scale, _ = tensor_qparams(w, 1, symmetric=True, axis=1)
    assert torch.allclose(scale.squeeze(0), w.abs().mean(0))
    assert torch.allclose(binary_scale(torch.zeros(3)), torch.ones(()))


def test_binary_pack_is_one_bit_per_code():
    q = torch.tensor([[1, -1, -1, 1, 1, 1, -1, -1, 1]], dtype=torch.int8)
    packed = pack(q, 1)
    # first code in the low bit: 1,0,0,1,1,1,0,0 -> 0b00111001 = 57; then the 9th code 1 -> byte 1
    assert packed.tolist() == [[57, 1]]
    assert torch.equal(unpack(packed, 1, 9), q)
    with pytest.raises(ValueError):
        pack(torch.tensor([[0, 1]], dtype=torch.int8), 1)


def test_bits_outside_allowed_refused_and_nan_refused():
    for bad in (0, 9, 12, 32, True):
        with pytest.raises(ValueError):
            qrange(bad, True)
    with pytest.raises(DataError):
        tensor_qparams(torch.tensor([1.0, float("nan")]), 8)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8, 16]),
    symmetric=st.booleans(),
    axis=st.sampled_from([None, 0, 1]),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_fake_quantize_is_idempotent_and_bounded(bits, symmetric, axis, seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 9, generator=g) * spread
    scale, zero = tensor_qparams(x, bits, symmetric=symmetric, axis=axis)
    zp = None if symmetric else zero
    once = fake_quantize(x, scale, zp, bits, symmetric)
    twice = fake_quantize(once, scale, zp, bits, symmetric)
    assert torch.allclose(once, twice, atol=1e-5 * spread)  # grid points map to themselves
    assert ((once - x).abs() <= scale / 2 * (1 + 1e-4) + 1e-6 * spread).all()
