"""``.weight`` of quantized and factorized layers, for parents that read it instead of calling the layer.

torch's ``nn.TransformerEncoderLayer`` runs a fused kernel in eval mode without gradients
that reads ``linear1.weight``, ``self_attn.out_proj.weight`` ... directly, and
``nn.MultiheadAttention`` never calls ``out_proj``. A tiny ViT built from them goes through
RTN, DynamicQuant, StaticQuant and SVD, and must compute what the dense model with the
dequantized (or multiplied-out) weights computes.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.measure import count_parameters
from slimkit.core.registry import Context
from slimkit.evaluation.suite import bits_per_weight, layer_bits
from slimkit.factorization.svd import FactorizedLinear
from slimkit.quantization.llm_int8 import LLMInt8Linear
from slimkit.quantization.modules import QuantConv2d, QuantEmbedding, QuantLinear

torch.set_num_threads(1)


class ViT(nn.Module):
    """Patch embedding (Conv2d 4x4 / 4), two nn.TransformerEncoderLayers (batch first), mean pool, head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 64, 4, 4)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (batch, 16 patches, 64)
        return self.head(self.encoder(tokens).mean(1))


IMAGES = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "rtn": sk.RTN(bits=4, group_size=32),
    "dynamic": sk.DynamicQuant(),
    "static": sk.StaticQuant(),
    "svd": sk.SVD(rank_ratio=0.4),
}


def compress(name):
    model = ViT().eval()
    ctx = Context()
    cfg = CONFIGS[name]
    verb = sk.factorize_ if cfg.family == "factorize" else sk.quantize_
    data = sk.CalibrationData.from_tensors(IMAGES, batch_size=4) if cfg.needs_data else None
    verb(model, cfg, data=data, ctx=ctx)
    return model, ctx


def dense_twin(model):
    """The model with every compressed layer replaced by the float layer of its dense weight (fast path intact)."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, (QuantLinear, FactorizedLinear)):
            out_f, in_f = m.out_features, m.in_features
            new = nn.Linear(in_f, out_f, bias=m.bias is not None)
        elif isinstance(m, QuantConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            bias=m.bias is not None)
        else:
            continue
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, new)
    return dense.eval()


@contextlib.contextmanager
def no_fused_path():
    """torch's fused encoder/attention kernels off: every child layer is called."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.parametrize("name", ["rtn", "svd"])
def test_weight_only_layers_compute_what_the_dense_model_computes(name):
    model, _ = compress(name)
    kind = QuantLinear if name == "rtn" else FactorizedLinear
    replaced = [n for n, m in model.named_modules() if isinstance(m, kind)]
    assert "encoder.layers.0.linear1" in replaced and "head" in replaced
    if name == "rtn":  # weight-only: out_proj, read through .weight by MultiheadAttention, is quantized too
        assert "encoder.layers.0.self_attn.out_proj" in replaced
    with torch.no_grad():
        got, want = model(IMAGES), dense_twin(model)(IMAGES)  # the fused path reads .weight in both
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with no_fused_path():  # each layer's own forward (two matmuls for SVD)
            torch.testing.assert_close(model(IMAGES), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["dynamic", "static"])
def test_input_quantizing_layers_are_called_by_the_fused_encoder(name, monkeypatch):
    model, ctx = compress(name)
    assert isinstance(model.encoder.layers[0].linear1, QuantLinear)
    assert type(model.encoder.layers[0].self_attn.out_proj) is not QuantLinear  # never called: refused, noted
    assert any("out_proj" in n and "never calls out_proj" in n for n in ctx.notes)
    if name == "static":
        assert isinstance(model.patch, QuantConv2d)
    calls = []
    quantize_input = QuantLinear.quantize_input
    monkeypatch.setattr(QuantLinear, "quantize_input", lambda self, x: calls.append(self) or quantize_input(self, x))
    with torch.no_grad():
        fused = model(IMAGES)  # eval, no grad, batch first: the encoder's fused path unless a child must run
        linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert len(linears) == 5 and {id(m) for m in calls} == {id(m) for m in linears}  # every input quantized
        with no_fused_path():
            called = model(IMAGES)
        dequantized = dense_twin(model)(IMAGES)  # the same weights with float inputs
    torch.testing.assert_close(fused, called, rtol=1e-4, atol=1e-5)  # (attention kernels differ in the last bits)
    drift = (fused - dequantized).abs().max()
    assert (fused - called).abs().max() * 10 < drift < 0.05 * dequantized.abs().max()


def test_weight_property_is_read_only_and_adds_nothing_to_state_or_counts(tmp_path):
    float_params = count_parameters(ViT()).total
    model, _ = compress("rtn")
    layer = model.head
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.float32 and layer.weight.shape == (10, 64)
    assert torch.equal(layer.weight, layer.dense_weight())
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(10, 64)
    state = model.state_dict()
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert not any(f"{n}.weight" in state for n in quantized)  # codes and scales only
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in dict(layer.named_buffers())
    assert count_parameters(model).total == float_params  # logical weights, counted once
    bits = layer_bits(model)
    assert bits["head"] == pytest.approx(layer.weight_bits_per_element()) and 4 < bits["head"] < 6
    assert 4 < bits_per_weight(model, quantized_only=True) < 6

    sk.save(model, tmp_path / "vit")
    reloaded = sk.load(tmp_path / "vit", skeleton=ViT())
    with torch.no_grad():
        assert torch.equal(reloaded(IMAGES), model(IMAGES))


def test_svd_factors_expose_product_and_bias():
    model, _ = compress("svd")
    f = model.encoder.layers[1].linear2
    assert isinstance(f, FactorizedLinear)
    torch.testing.assert_close(f.weight, f.second.weight @ f.first.weight)
    assert f.bias is f.second.bias
    state = model.state_dict()
    assert "encoder.layers.1.linear2.weight" not in state and "encoder.layers.1.linear2.first.weight" in state
    assert count_parameters(model).total < count_parameters(ViT()).total


def test_every_layer_kind_answers_weight_in_its_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, 8)
    assert q.weight.dtype == torch.bfloat16 and q.slimkit_spec()["dtype"] == "bfloat16"
    again = QuantLinear.from_slimkit_spec(q.slimkit_spec())
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.weight, q.weight)
    assert "dtype" not in QuantLinear.from_linear(nn.Linear(16, 8), 8).slimkit_spec()  # float32 specs unchanged
    conv = QuantConv2d.from_conv(nn.Conv2d(3, 4, 3), 8)
    assert conv.weight.shape == (4, 3, 3, 3) and torch.equal(conv.weight, conv.dense_weight())
    emb = QuantEmbedding.from_embedding(nn.Embedding(10, 8), 8)
    assert emb.weight.shape == (10, 8)
    int8 = LLMInt8Linear.from_linear(nn.Linear(16, 8))
    assert torch.equal(int8.weight, int8.dense_weight())


@pytest.mark.parametrize("name", ["rtn", "dynamic"])
def test_vit_exports_to_onnx_with_the_twins_answering_weight(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx

    model, _ = compress(name)
    # The encoder layer reads its children's .weight while choosing a path, and MultiheadAttention
    # reads out_proj's: every export twin answers it (out_proj as DequantizeLinear, not MatMulNBits).
    result = export_onnx(model, tmp_path / "vit.onnx", example=IMAGES[:2], check=True)
    assert result.max_abs_diff < 0.01
    if name == "rtn":
        assert any("out_proj" in n and "read by the parent" in n for n in result.notes)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [(4, 32, True, False), (4, 16, False, False),
                                                                 (2, 16, False, False), (4, 16, True, True)])
def test_export_twins_weight_is_the_layer_weight(bits, group_size, symmetric, act_order):
    from slimkit.export.nbits import NBitsLinear
    from slimkit.export.twins import _ExportLinear
    from slimkit.quantization.gptq import gptq_quantize

    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    H = 2 * x.T @ x / x.shape[0]
    qw = gptq_quantize(lin.weight.detach(), H, bits=bits, group_size=group_size, symmetric=symmetric,
                       act_order=act_order).weight
    q = QuantLinear.from_linear(lin, weight=qw)
    assert (q.g_idx is not None) == act_order
    torch.testing.assert_close(NBitsLinear(q).weight, q.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(_ExportLinear(q, 20).weight, q.weight, rtol=0, atol=1e-6)


def test_smoothed_layer_weight_is_what_it_applies_to_its_input():
    from slimkit.quantization.primitives import quantize_weight

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    s = torch.rand(16) * 3 + 0.5
    q = QuantLinear.from_linear(lin, weight=quantize_weight(lin.weight.detach() * s, 8), input_multiplier=1 / s)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.weight.T + q.bias, rtol=1e-5, atol=1e-6)  # W, not W·diag(s)
        assert not torch.allclose(q.weight, q.dense_weight())
        assert (q.weight - lin.weight).abs().max() < 0.05
