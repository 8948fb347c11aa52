"""Fake quantization: forwards equal primitives.fake_quantize; STE, LSQ and binary gradients by hand and by reference."""

from __future__ import annotations

import math

import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.quantization.fake_quant import (
    FakeQuantizer,
    binary_fake_quantize,
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_init_scale,
    ste_fake_quantize,
)
from slimkit.quantization.primitives import fake_quantize, qrange, tensor_qparams

torch.set_num_threads(1)


def lsq_reference(x, s, z, qmin, qmax, g):
    """The obvious LSQ: round with its residual detached, grad-scaled step size (Esser et al. 2019, App. A)."""
    s = s * g + (s - s * g).detach()  # value s, gradient scaled by g
    v = x / s
    v = v + (torch.round(v) - v).detach()
    zz = 0 if z is None else z.to(x.dtype)
    q = torch.clamp(v + zz, qmin, qmax)
    return (q - zz) * s


@pytest.mark.parametrize("bits, symmetric, axis", [(8, True, None), (4, False, 0), (2, True, 0), (4, True, 1), (8, False, None)])
def test_forwards_equal_primitives_fake_quantize(bits, symmetric, axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 10, generator=g) * 3
    scale, zero = tensor_qparams(x, bits, symmetric=symmetric, axis=axis)
    scale = scale * 0.8  # some values clamp
    zp = None if symmetric else zero
    expected = fake_quantize(x, scale, zp, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    assert torch.equal(ste_fake_quantize(x, scale, zp, qmin, qmax), expected)
    assert torch.equal(lsq_fake_quantize(x, scale, zp, qmin, qmax, 0.1), expected)


def test_binary_forward_equals_primitives():
    x = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.1, 0.2, -0.3, 0.0]])
    s = tensor_qparams(x, 1, axis=0)[0]  # mean|x| per row: 1.0, 0.15
    assert torch.allclose(s.flatten(), torch.tensor([1.0, 0.15]))
    out = binary_fake_quantize(x, s)
    assert torch.equal(out, fake_quantize(x, s, None, 1, True))
    assert torch.equal(out[0], torch.tensor([1.0, -1.0, 1.0, 1.0]))  # 0 -> +1


def test_ste_gradient_by_hand_symmetric_and_asymmetric():
    x = torch.tensor([-5.0, -3.4, -0.2, 0.3, 3.49, 3.8, 10.0], requires_grad=True)
    # s = 0.5, int4 symmetric [-7, 7]: round(x/s) = -10, -7, 0, 1, 7, 8, 20
    ste_fake_quantize(x, torch.tensor(0.5), None, -7, 7).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0, 0]))
    # asymmetric [0, 15], z = 3: inside iff -3 <= round(x/s) <= 12  (x in [-1.75, 6.25) roughly)
    x2 = torch.tensor([-2.0, -1.5, 0.0, 6.2, 6.3], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    ste_fake_quantize(x2, scale, torch.tensor(3), 0, 15).sum().backward()
    assert torch.equal(x2.grad, torch.tensor([0.0, 1, 1, 1, 0]))  # round: -4, -3, 0, 12, 13
    assert scale.grad is None  # no gradient to the scale


def test_lsq_gradient_by_hand():
    x = torch.tensor([0.3, 0.74, -2.0, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    # x/s = 0.6, 1.48, -4, 10 -> round 1, 1, -4, 10 (clamped to 7): ds = 0.4, -0.48, 0, 7
    out = lsq_fake_quantize(x, s, None, -7, 7, 0.5)
    assert torch.allclose(out, torch.tensor([0.5, 0.5, -2.0, 3.5]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 0]))
    assert s.grad.item() == pytest.approx((0.4 - 0.48 + 0 + 7) * 0.5, abs=1e-6)
    # below the range the derivative is qmin - z: asymmetric [0, 15], z = 4, x far below -> (0 - 4)
    s2 = torch.tensor(1.0, requires_grad=True)
    lsq_fake_quantize(torch.tensor([-100.0]), s2, torch.tensor(4), 0, 15, 1.0).sum().backward()
    assert s2.grad.item() == pytest.approx(-4.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_per_channel_matches_reference(symmetric):
    torch.manual_seed(0)
    bits = 4
    qmin, qmax = qrange(bits, symmetric)
    w = torch.randn(5, 12, dtype=torch.float64) * 2
    s0, z0 = tensor_qparams(w.float(), bits, symmetric=symmetric, axis=0)
    s0 = (s0 * 0.7).double()  # clamp some values
    z = None if symmetric else z0
    up = torch.randn(5, 12, dtype=torch.float64)
    g = lsq_grad_scale(12, qmax)
    grads = []
    for fn in (lambda a, b: lsq_fake_quantize(a, b, z, qmin, qmax, g), lambda a, b: lsq_reference(a, b, z, qmin, qmax, g)):
        a, b = w.clone().requires_grad_(), s0.clone().requires_grad_()
        out = fn(a, b)
        (out * up).sum().backward()
        grads.append((out.detach(), a.grad, b.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = grads
    assert torch.allclose(o1, o2) and torch.allclose(gx1, gx2)  # the reference computes x·(1/s)·s
    assert gs1.shape == (5, 1) and torch.allclose(gs1, gs2, atol=1e-10)
    assert (gx1 == 0).any() and (gx1 == up).any()  # both regions exercised


def test_gradcheck_where_finite_differences_apply():
    # In the clamped region the forward is (q - z)·s with q fixed: finite differences are exact there.
    x = torch.tensor([[-9.0, 11.0, 30.0], [-40.0, 25.0, 12.0]], dtype=torch.float64)
    s = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[2], [5]])
    assert torch.autograd.gradcheck(lambda sc: lsq_fake_quantize(x, sc, z, 0, 7, 1.0), (s,))
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ste_fake_quantize(a, s.detach(), z, 0, 7), (xg,))
    # binary: d(s·sign x)/ds = sign(x) exactly
    xb = torch.tensor([[0.3, -1.2, 0.0], [2.0, -0.5, 0.7]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda sc: binary_fake_quantize(xb, sc), (s,))


def test_binary_gradients_identity_and_clipped():
    x = torch.tensor([[0.5, -1.5, 0.2, 2.5]], requires_grad=True)
    s = torch.tensor([[1.0]], requires_grad=True)
    binary_fake_quantize(x, s, grad_scale=0.25).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity STE
    assert s.grad.item() == pytest.approx((1 - 1 + 1 + 1) * 0.25)
    x.grad = None
    binary_fake_quantize(x, s.detach(), clip=1.0).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0, 1, 0]]))


def test_lsq_helpers():
    assert lsq_grad_scale(100, 7) == pytest.approx(1 / math.sqrt(700))
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    assert torch.allclose(lsq_init_scale(w, 7, (1,)), torch.tensor([[4.0], [1.0]]) / math.sqrt(7))


# --- FakeQuantizer ------------------------------------------------------------------------


def test_weight_quantizer_current_per_channel_equals_rtn_and_passes_ste():
    torch.manual_seed(0)
    w = torch.randn(4, 9, requires_grad=True)
    fq = FakeQuantizer(4, True, axis=0)
    out = fq(w)
    scale, zero = tensor_qparams(w, 4, symmetric=True, axis=0)
    assert torch.equal(out, fake_quantize(w, scale, None, 4, True))
    s, z = fq.qparams(w)
    assert s.shape == (4,) and torch.equal(s, scale.flatten()) and torch.equal(z, torch.zeros(4, dtype=torch.int32))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # min/max range: nothing clamps
    with pytest.raises(ValueError, match="pass x"):
        fq.qparams()


def test_binary_weight_quantizer_uses_mean_abs_per_channel():
    w = torch.tensor([[1.0, -3.0], [0.5, -0.1]])
    fq = FakeQuantizer(1, True, axis=0)
    assert torch.allclose(fq(w), torch.tensor([[2.0, -2.0], [0.3, -0.3]]))


def test_activation_quantizer_moving_average_states():
    fq = FakeQuantizer(8, False, observer="moving_average", averaging_constant=0.5, freeze_after=2)
    with pytest.raises(DataError, match="observed no data"):
        fq.eval()(torch.ones(3))
    fq.train()
    a = torch.tensor([0.0, 4.0])
    fq(a)
    assert fq.min_val.item() == 0.0 and fq.max_val.item() == 4.0
    fq(torch.tensor([-2.0, 8.0]))  # moving average with c = 0.5
    assert fq.min_val.item() == -1.0 and fq.max_val.item() == 6.0
    assert not fq.observing  # frozen after 2 batches
    fq(torch.tensor([-100.0, 100.0]))
    assert fq.max_val.item() == 6.0
    fq.eval()
    x = torch.linspace(-3, 9, 25)
    scale, zero = fq.qparams()
    assert scale.item() == pytest.approx(7 / 255)
    assert torch.equal(fq(x), fake_quantize(x, scale, zero, 8, False))


def test_activation_quantizer_minmax_is_running_and_eval_does_not_update():
    fq = FakeQuantizer(8, False, observer="minmax")
    fq(torch.tensor([0.0, 1.0]))
    fq(torch.tensor([-1.0, 0.5]))
    assert (fq.min_val.item(), fq.max_val.item()) == (-1.0, 1.0)
    fq.eval()(torch.tensor([-50.0, 50.0]))
    assert (fq.min_val.item(), fq.max_val.item()) == (-1.0, 1.0)


def test_learnable_weight_scale_is_trained_and_qparams_match_forward():
    torch.manual_seed(0)
    w = torch.randn(3, 16)
    fq = FakeQuantizer(4, True, axis=0, learnable=True, channels=3)
    assert isinstance(fq.scale, torch.nn.Parameter) and [n for n, _ in fq.named_parameters()] == ["scale"]
    fq.initialize(w)
    rtn_scale = tensor_qparams(w, 4, symmetric=True, axis=0)[0].flatten()
    assert torch.allclose(fq.scale.detach(), rtn_scale)  # starts at the PTQ grid
    wp = w.clone().requires_grad_()
    out = fq(wp)
    assert torch.equal(out, fake_quantize(w, rtn_scale.reshape(3, 1), None, 4, True))
    target = torch.randn(3, 16)
    ((out - target) ** 2).sum().backward()
    # the step size's gradient is LSQ's with N = 16 values per channel
    s_ref = rtn_scale.reshape(3, 1).clone().requires_grad_()
    ((lsq_reference(w, s_ref, None, -7, 7, lsq_grad_scale(16, 7)) - target) ** 2).sum().backward()
    assert torch.allclose(fq.scale.grad, s_ref.grad.flatten(), atol=1e-6)
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    opt.step()
    s, _ = fq.qparams()
    assert not torch.allclose(s, rtn_scale)
    assert torch.equal(fq(w), fake_quantize(w, s.reshape(3, 1), None, 4, True))


def test_learnable_lsq_init_and_activation_lsq():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    fq = FakeQuantizer(4, True, axis=0, learnable=True, channels=2, init="lsq")
    fq.initialize(w)
    assert torch.allclose(fq.scale.detach(), torch.tensor([4.0, 1.0]) / math.sqrt(7))
    act = FakeQuantizer(8, False, observer="moving_average", learnable=True)
    x = torch.rand(4, 10, requires_grad=True)
    act(x).sum().backward()  # first training batch initialises, then the scale is learned
    assert act.initialized and act.scale.grad is not None
    before = act.scale.detach().clone()
    act(x * 10)
    assert torch.equal(act.scale.detach(), before)  # observation no longer moves a learned scale


def test_disabled_quantizer_passes_through_and_bad_args_refused():
    fq = FakeQuantizer(2, True, axis=0)
    fq.enabled = False
    x = torch.randn(3, 4)
    assert torch.equal(fq(x), x)
    with pytest.raises(ValueError, match="observer"):
        FakeQuantizer(8, observer="kl")
    with pytest.raises(ValueError, match="binary"):
        FakeQuantizer(1, True, observer="moving_average")
    with pytest.raises(ValueError, match="channels"):
        FakeQuantizer(4, True, axis=0, learnable=True)
    with pytest.raises(DataError, match="NaN"):
        FakeQuantizer(8, False, observer="minmax")(torch.tensor([float("nan")]))
