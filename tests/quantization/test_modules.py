"""QuantLinear / QuantEmbedding: exact forward, closeness, spec and safetensors round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.modules import module_type
from slimkit.quantization.modules import QuantEmbedding, QuantLinear
from slimkit.quantization.primitives import bits_per_weight

torch.set_num_threads(1)

SCHEMES = [(8, None, True), (8, 16, False), (4, 16, True), (4, 8, False), (2, 16, True), (2, 8, False)]


def _linear(seed=0, in_features=32, out_features=12, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES)
def test_quant_linear_forward_is_linear_of_dense_weight(bits, group_size, symmetric):
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group_size, symmetric=symmetric)
    x = torch.randn(3, 5, 32)
    assert torch.equal(q(x), F.linear(x, q.dense_weight(), lin.bias))
    assert q.qweight.dtype == (torch.uint8 if bits < 8 or not symmetric else torch.int8)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (12, 32 // (group_size or 32))
    assert (q.zero is None) == symmetric
    # Measured storage matches the formula (scales float32, zero points one byte).
    expected = bits_per_weight(bits, group_size, 32, scale_bits=32, zero_bits=0 if symmetric else 8)
    assert q.weight_bits_per_element() == pytest.approx(expected)


def test_quant_linear_close_to_float_at_8_bits():
    lin = _linear(1, 64, 48)
    q = QuantLinear.from_linear(lin)
    x = torch.randn(16, 64)
    y, yq = lin(x), q(x)
    assert ((yq - y).norm() / y.norm()) < 0.01


@pytest.mark.parametrize("bits,limit", [(4, 0.2), (2, 0.8)])
def test_low_bit_group_wise_is_reasonable(bits, limit):
    lin = _linear(2, 64, 16)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=16, symmetric=False)
    x = torch.randn(8, 64)
    err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert err < limit
    assert q.qweight.shape == (16, 64 * bits // 8)


def test_quant_linear_follows_input_dtype_and_no_bias():
    q = QuantLinear.from_linear(_linear(bias=False))
    assert q.bias is None
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    out = q(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, q.dense_weight(torch.bfloat16)))


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES)
def test_quant_linear_spec_and_safetensors_round_trip(bits, group_size, symmetric, tmp_path):
    q = QuantLinear.from_linear(_linear(3), bits=bits, group_size=group_size, symmetric=symmetric)
    spec = json.loads(json.dumps(q.slimkit_spec()))  # the spec is plain JSON data
    assert spec == {
        "in_features": 32, "out_features": 12, "bias": True, "bits": bits, "group_size": group_size, "symmetric": symmetric,
        "act_mode": None, "act_bits": 8, "act_symmetric": False,
    }
    empty = module_type("QuantLinear").from_slimkit_spec(spec)
    empty.load_state_dict(q.state_dict(), strict=True)
    x = torch.randn(4, 32)
    assert torch.equal(empty(x), q(x))

    path = tmp_path / "q.safetensors"
    save_file(q.state_dict(), str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == q.state_dict().keys()
    for k, v in q.state_dict().items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    fresh = QuantLinear.from_slimkit_spec(spec)
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh(x), q(x))


def test_quant_linear_param_counts_and_repr():
    lin = _linear(4)
    with torch.no_grad():
        lin.weight[0] = 0.0
        lin.weight[1, :5] = 0.0
    q = QuantLinear.from_linear(lin, bits=4, group_size=8)
    total, nonzero = q.slimkit_param_counts()
    assert total == 12 * 32
    assert nonzero == int(torch.count_nonzero(q.dense_weight())) <= 12 * 32 - 37
    assert [n for n, _ in q.named_parameters()] == ["bias"]  # codes and scales are buffers
    assert "bits=4" in repr(q) and "group_size=8" in repr(q)


def test_quant_linear_rejects_bad_group():
    with pytest.raises(ValueError, match="32.*12"):
        QuantLinear(32, 4, group_size=12)


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES)
def test_quant_embedding(bits, group_size, symmetric, tmp_path):
    torch.manual_seed(5)
    emb = nn.Embedding(20, 32, padding_idx=0)
    q = QuantEmbedding.from_embedding(emb, bits=bits, group_size=group_size, symmetric=symmetric)
    idx = torch.tensor([[0, 3, 19], [7, 7, 1]])
    out = q(idx)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(idx, q.dense_weight()))
    assert torch.equal(out[0, 0], torch.zeros(32))  # the zero padding row stays exactly zero
    assert q.padding_idx == 0
    expected = bits_per_weight(bits, group_size, 32, zero_bits=0 if symmetric else 8)
    assert q.weight_bits_per_element() == pytest.approx(expected)

    spec = json.loads(json.dumps(q.slimkit_spec()))
    path = tmp_path / "e.safetensors"
    save_file(q.state_dict(), str(path))
    fresh = module_type("QuantEmbedding").from_slimkit_spec(spec)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    assert torch.equal(fresh(idx), out)


def test_quant_embedding_close_at_8_bits_and_keeps_dtype():
    torch.manual_seed(6)
    emb = nn.Embedding(50, 16).to(torch.bfloat16)
    q = QuantEmbedding.from_embedding(emb)
    idx = torch.arange(50)
    assert q(idx).dtype == torch.bfloat16
    ref = emb(idx).float()
    assert ((q(idx).float() - ref).norm() / ref.norm()) < 0.02
    assert QuantEmbedding.from_slimkit_spec(q.slimkit_spec()).dtype == torch.bfloat16
