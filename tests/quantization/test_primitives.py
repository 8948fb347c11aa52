"""Quantization maths against slow float64 references on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.quantization.primitives import (
    bits_per_weight,
    dequantize,
    pack,
    packed_size,
    qrange,
    quantize,
    quantize_weight,
    scale_zero_from_range,
    unpack,
)

torch.set_num_threads(1)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as the stored scale is."""
    return torch.tensor(x, dtype=torch.float32).item()


def reference_quantize_weight(w, bits, group_size, symmetric):
    """Slow, obvious RTN: python loops in float64 over rows and groups."""
    rows, cols = w.shape
    gs = cols if group_size is None else group_size
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    q = [[0] * cols for _ in range(rows)]
    scales, zeros = [], []
    for r in range(rows):
        srow, zrow = [], []
        for g in range(cols // gs):
            xs = [float(w[r, c]) for c in range(g * gs, (g + 1) * gs)]
            lo, hi = min(min(xs), 0.0), max(max(xs), 0.0)
            s = max(-lo, hi) / qmax if symmetric else (hi - lo) / (qmax - qmin)
            s = _f32(s) or 1.0  # all-zero group -> scale 1
            z = 0 if symmetric else min(max(round(qmin - lo / s), qmin), qmax)
            for c in range(g * gs, (g + 1) * gs):
                q[r][c] = min(max(round(float(w[r, c]) / s) + z, qmin), qmax)  # round: half to even
            srow.append(s)
            zrow.append(z)
        scales.append(srow)
        zeros.append(zrow)
    return q, scales, zeros


def reference_dequantize(q, scales, zeros, gs):
    return [[(q[r][c] - zeros[r][c // gs]) * scales[r][c // gs] for c in range(len(q[0]))] for r in range(len(q))]


def test_qrange():
    assert qrange(8, True) == (-127, 127)
    assert qrange(4, True) == (-7, 7)
    assert qrange(2, True) == (-1, 1)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, False) == (0, 15)
    assert qrange(2, False) == (0, 3)


def test_round_half_to_even_and_clamp():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 500.0, -500.0])
    q = quantize(x, torch.tensor(1.0), None, 8, True)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -127]
    assert q.dtype == torch.int8


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_weight_matches_reference(bits, group_size, symmetric):
    torch.manual_seed(bits * 10 + (group_size or 0) + symmetric)
    w = torch.randn(5, 12) * torch.rand(5, 1) * 3
    w[2] = 0.0  # all-zero row
    w[3] = w[3].abs()  # all-positive row: asymmetric range must still include 0
    qw = quantize_weight(w, bits, group_size=group_size, symmetric=symmetric)
    q_ref, s_ref, z_ref = reference_quantize_weight(w, bits, group_size, symmetric)
    assert qw.q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert qw.q.tolist() == q_ref
    assert torch.allclose(qw.scale.double(), torch.tensor(s_ref, dtype=torch.float64), rtol=1e-6, atol=0)
    if symmetric:
        assert qw.zero is None
    else:
        assert qw.zero.dtype == torch.uint8 and qw.zero.tolist() == z_ref
    gs = 12 if group_size is None else group_size
    w_ref = torch.tensor(reference_dequantize(q_ref, s_ref, z_ref, gs), dtype=torch.float64)
    assert torch.allclose(qw.dequantize().double(), w_ref, rtol=1e-6, atol=1e-7)
    assert qw.dequantize().dtype == torch.float32


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bound_and_zero_rows(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(6, 16)
    w[1] = 0.0
    w[4, 8:] = 0.0  # an all-zero group
    qw = quantize_weight(w, bits, group_size=8, symmetric=symmetric)
    w_hat = qw.dequantize()
    s = qw.scale.repeat_interleave(8, dim=1)  # (6, 16): each weight's scale
    assert ((w - w_hat).abs() <= s / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(w_hat[1], torch.zeros(16))
    assert torch.equal(w_hat[4, 8:], torch.zeros(8))
    assert w_hat[w == 0].abs().max() == 0  # zero is exactly representable


def test_scale_zero_guard_and_broadcast():
    xmin = torch.tensor([[0.0, -1.0], [-2.0, 0.5]])
    xmax = torch.tensor([[0.0, 3.0], [-1.0, 4.0]])
    s, z = scale_zero_from_range(xmin, xmax, 8, False)
    assert s.shape == z.shape == (2, 2) and s.dtype == torch.float32
    assert s[0, 0] == 1.0 and z[0, 0] == 0  # all-zero range
    assert torch.isclose(s[0, 1], torch.tensor(4.0 / 255)) and z[0, 1] == round(1.0 / (4.0 / 255))
    assert z[1, 0] == 255  # all-negative range: 0 sits at the top
    assert z[1, 1] == 0  # all-positive range: 0 sits at the bottom
    s, z = scale_zero_from_range(xmin, xmax, 4, True)
    assert torch.allclose(s, torch.tensor([[1.0, 3.0 / 7], [2.0 / 7, 4.0 / 7]])) and (z == 0).all()


def test_dequantize_formula():
    q = torch.tensor([0, 3, 255], dtype=torch.uint8)
    out = dequantize(q, torch.tensor(0.5), torch.tensor(3))
    assert out.tolist() == [-1.5, 0.0, 126.0]


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="12.*8"):
        quantize_weight(torch.randn(2, 12), 4, group_size=8)


def test_non_finite_weight_refused():
    w = torch.randn(2, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(w, 8)


def test_pack_order_hand_computed():
    # 4 bit signed: codes q + 8 -> 9, 6, 11; first element in the low nibble: 0x69, then 0x0B (padded).
    q = torch.tensor([[1, -2, 3]], dtype=torch.int8)
    assert pack(q, 4).tolist() == [[0x69, 0x0B]]
    # 4 bit unsigned: 1 | 2 << 4
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4, symmetric=False).tolist() == [0x21]
    # 2 bit signed: codes q + 2 -> 3, 2, 1, 3 -> 3 | 2<<2 | 1<<4 | 3<<6 = 219
    assert pack(torch.tensor([1, 0, -1, 1], dtype=torch.int8), 2).tolist() == [219]
    # 8 bit signed: q + 128, one per byte
    assert pack(torch.tensor([-127, 0, 127], dtype=torch.int8), 8).tolist() == [1, 128, 255]
    assert unpack(torch.tensor([[0x69, 0x0B]], dtype=torch.uint8), 4, 3).tolist() == [[1, -2, 3]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="range"):
        pack(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([1], dtype=torch.int8), 7)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([8, 6, 5, 4, 2]),
    symmetric=st.booleans(),
    lead=st.lists(st.integers(0, 3), max_size=2),
    last=st.integers(1, 19),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, symmetric, lead, last, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    dtype = torch.int8 if symmetric else torch.uint8
    q = torch.randint(lo, hi + 1, (*lead, last), generator=g).to(dtype)
    packed = pack(q, bits, symmetric=symmetric)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_size(last, bits))
    # whole words: 4 codes in 3 bytes at 6 bit, 8 codes in 5 bytes at 5 bit, else whole bytes
    per_word = {6: 4, 5: 8}.get(bits, 8 // bits if bits < 8 else 1)
    assert packed.shape[-1] == -(-last // per_word) * (per_word * bits // 8)
    back = unpack(packed, bits, last, symmetric=symmetric)
    assert back.dtype == dtype and torch.equal(back, q)


_values = st.floats(-1e4, 1e4, allow_nan=False, width=32).map(lambda v: 0.0 if abs(v) < 1e-20 else v)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([8, 4, 2]),
    symmetric=st.booleans(),
    rows=st.lists(st.lists(_values, min_size=8, max_size=8), min_size=1, max_size=3),
)
def test_scale_zero_validity(bits, symmetric, rows):
    w = torch.tensor(rows, dtype=torch.float32)
    qw = quantize_weight(w, bits, group_size=4, symmetric=symmetric)
    qmin, qmax = qrange(bits, symmetric)
    assert int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    if not symmetric:
        assert int(qw.zero.min()) >= qmin and int(qw.zero.max()) <= qmax
    err = (w.double() - qw.dequantize().double()).abs()
    s = qw.scale.double().repeat_interleave(4, dim=1)
    assert (err <= s * (0.5 + 1e-4)).all()


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([8, 4, 2]),
    symmetric=st.booleans(),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 12)),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_equals_channel_when_group_is_row(bits, symmetric, shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    per_channel = quantize_weight(w, bits, symmetric=symmetric)
    grouped = quantize_weight(w, bits, group_size=shape[1], symmetric=symmetric)
    assert per_channel.scale.shape == grouped.scale.shape == (shape[0], 1)
    assert torch.equal(per_channel.q, grouped.q)
    assert torch.equal(per_channel.scale, grouped.scale)
    assert torch.equal(per_channel.dequantize(), grouped.dequantize())
    if not symmetric:
        assert torch.equal(per_channel.zero, grouped.zero)


def test_bits_per_weight():
    assert bits_per_weight(4, 128, 4096) == 4.25
    assert bits_per_weight(8, None, 64) == 8.5
    assert bits_per_weight(4, 32, 4096, scale_bits=16, zero_bits=4) == 4 + 20 / 32
