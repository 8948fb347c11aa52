"""QuantConv2d, input (activation) quantization, 16- and 1-bit weights in the quantized layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.modules import module_type
from slimkit.quantization.modules import QuantConv2d, QuantLinear
from slimkit.quantization.primitives import quantize_weight, scale_zero_from_range


def _conv(groups=1, bias=True):
    torch.manual_seed(0)
    return nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, bias=bias)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bits", [8, 4, 1])
def test_quant_conv_is_conv_of_dequantized_kernel(groups, bits):
    conv = _conv(groups)
    q = QuantConv2d.from_conv(conv, bits)
    x = torch.randn(2, 4, 9, 9)
    ref_w = quantize_weight(conv.weight.reshape(6, -1), bits).dequantize().reshape(conv.weight.shape)
    expected = F.conv2d(x, ref_w, conv.bias, conv.stride, conv.padding, conv.dilation, groups)
    assert torch.allclose(q(x), expected, atol=1e-6)
    if bits == 8:
        assert (q(x) - conv(x)).abs().max() < 0.02 * conv(x).abs().max()


def test_quant_conv_spec_round_trip(tmp_path):
    q = QuantConv2d.from_conv(_conv(2, bias=False), 4, act_mode="static")
    q.set_input_qparams(torch.tensor(0.02), torch.tensor(128))
    spec = json.loads(json.dumps(q.slimkit_spec()))
    empty = module_type("QuantConv2d").from_slimkit_spec(spec)
    save_file(q.state_dict(), tmp_path / "c.safetensors")
    empty.load_state_dict(load_file(tmp_path / "c.safetensors"), strict=True)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(empty(x), q(x))
    assert float(empty.act_scale) == pytest.approx(0.02) and int(empty.act_zero) == 128


def test_static_input_quantization_is_exact_fake_quant():
    lin = nn.Linear(8, 3)
    q = QuantLinear.from_linear(lin, 8, act_mode="static")
    q.set_input_qparams(torch.tensor(0.05), torch.tensor(100))
    x = torch.randn(5, 8) * 3
    # slow reference: uint8 codes with zero point 100
    codes = torch.clamp(torch.round(x / 0.05) + 100, 0, 255)
    xq = (codes - 100) * 0.05
    assert torch.allclose(q(x), F.linear(xq, q.dense_weight(), lin.bias), atol=1e-6)
    # values beyond the range saturate
    big = torch.full((1, 8), 100.0)
    assert torch.allclose(q.quantize_input(big), torch.full((1, 8), (255 - 100) * 0.05))


@pytest.mark.parametrize("act_symmetric", [False, True])
def test_dynamic_input_quantization_uses_each_batch_range(act_symmetric):
    lin = nn.Linear(8, 3)
    q = QuantLinear.from_linear(lin, 8, act_mode="dynamic", act_symmetric=act_symmetric)
    for spread in (0.01, 100.0):
        x = torch.randn(4, 8) * spread
        scale, zero = scale_zero_from_range(x.min(), x.max(), 8, act_symmetric)
        step = float(scale)
        assert (q.quantize_input(x) - x).abs().max() <= step / 2 + 1e-7 * spread
        assert step < spread  # the range follows the batch, not a fixed calibration
    assert not hasattr(q, "act_scale") or q.act_scale is None
    assert "act_scale" not in q.state_dict()


def test_int16_and_binary_linear():
    torch.manual_seed(1)
    lin = nn.Linear(32, 4)
    x = torch.randn(3, 32)
    q16 = QuantLinear.from_linear(lin, 16)
    assert q16.qweight.dtype == torch.int16
    assert (q16(x) - lin(x)).abs().max() < 1e-4
    q1 = QuantLinear.from_linear(lin, 1)
    assert q1.qweight.shape == (4, 4)  # 32 codes, one bit each -> 4 bytes per row
    w = lin.weight.detach()
    assert torch.allclose(q1.dense_weight(), torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True))
    assert q1.weight_bits_per_element() == pytest.approx(1 + 32 / 32)


def test_bad_act_settings_refused():
    with pytest.raises(ValueError):
        QuantLinear(4, 4, act_mode="sometimes")
    with pytest.raises(ValueError):
        QuantLinear(4, 4, act_mode="static", act_bits=4)
    with pytest.raises(ValueError):
        QuantLinear(4, 4, bits=7)  # 5 and 6 are stored now (GGUF q5_0 / q6_k grids); 7 is not
    with pytest.raises(ValueError):
        QuantLinear.from_linear(nn.Linear(4, 4), 8).set_input_qparams(torch.tensor(1.0), torch.tensor(0))
