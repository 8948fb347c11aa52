"""LLM.int8(): the decomposed matmul against a float64 reference, its limits (threshold inf = per-token
W8A8), its benefit on planted outliers, the handler on several decoders, save/reload and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit as sk
from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.core.registry import Context
from slimkit.quantization.llm_int8 import (
    LLMInt8,
    LLMInt8Linear,
    int8_matmul,
    outlier_columns,
    per_token_int8,
)
from slimkit.quantization.modules import QuantLinear
from tests.llm_archs import tiny_causal_lm, token_batches

torch.set_num_threads(1)


def _reference64(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """Slow float64 LLM.int8: column by column and row by row, straight from the definition."""
    x = x.double()
    w = w.double()
    w_scale = w.abs().amax(dim=1) / 127  # per output row
    w_scale = torch.where(w_scale > 0, w_scale, torch.ones_like(w_scale))
    w_scale = w_scale.float().double()  # scales are stored as float32
    wq = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127)
    outliers = [j for j in range(x.shape[1]) if bool((x[:, j].abs() >= threshold).any())]
    regular = [j for j in range(x.shape[1]) if j not in outliers]
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        row = x[t, regular]
        sx = float(row.abs().max()) / 127 if len(regular) and float(row.abs().max()) > 0 else 1.0
        sx = float(torch.tensor(sx, dtype=torch.float32))
        qx = torch.clamp(torch.round(row / sx), -127, 127)
        for i in range(w.shape[0]):
            acc = float((qx * wq[i, regular]).sum())  # an exact integer
            y[t, i] = acc * sx * w_scale[i] + float((x[t, outliers] * wq[i, outliers] * w_scale[i]).sum())
    return y if bias is None else y + bias.double()


def _layer_with_outliers(seed: int = 0, tokens: int = 12, cols=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(24, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 24, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(10, generator=g))
    x = torch.randn(tokens, 24, generator=g)
    for c in cols:
        x[:, c] *= 60  # systematic outlier features, as LLMs have them
    return lin, x


# --- the maths ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["int_mm", "int32"])
def test_decomposition_equals_a_float64_reference(kernel):
    lin, x = _layer_with_outliers()
    layer = LLMInt8Linear.from_linear(lin, threshold=6.0)
    layer.kernel = kernel
    with torch.no_grad():
        got = layer(x).double()
    ref = _reference64(x, lin.weight.detach(), lin.bias.detach(), 6.0)
    assert bool(outlier_columns(x, 6.0)[[2, 9]].all())
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_both_int8_kernels_give_the_same_exact_integers():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (33, 40), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 7), generator=g, dtype=torch.int8)
    exact = a.double() @ b.double()
    assert torch.equal(int8_matmul(a, b, "int_mm").double(), exact)
    assert torch.equal(int8_matmul(a, b, "int32").double(), exact)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_per_token_int8_codes_are_in_range_and_within_half_a_step(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 50
    x[0] = 0.0
    q, s = per_token_int8(x)
    assert q.dtype == torch.int8 and s.shape == (rows, 1)
    assert int(q.abs().max()) <= 127 and s[0, 0] == 1 and not q[0].any()
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-6).all())
    amax = x.abs().amax(dim=1)
    nz = amax > 0
    assert torch.allclose(s[nz, 0], amax[nz] / 127, rtol=1e-6)  # the row's largest |x| maps to code ±127


def test_outlier_columns_reference():
    x = torch.tensor([[0.0, -6.0, 5.9], [1.0, 2.0, -5.99]])
    assert outlier_columns(x, 6.0).tolist() == [False, True, False]
    assert not outlier_columns(x, math.inf).any()


def test_threshold_inf_is_plain_per_token_w8a8():
    lin, x = _layer_with_outliers(seed=3)
    mixed = LLMInt8Linear.from_linear(lin, threshold=math.inf)
    plain = QuantLinear.from_linear(lin, 8, act_mode="dynamic_token", act_symmetric=True)
    with torch.no_grad():
        a, b = mixed(x), plain(x)
    assert torch.equal(mixed.qweight, plain.qweight) and torch.equal(mixed.scale, plain.scale)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()))


def test_outliers_in_float_beat_plain_w8a8_by_far():
    lin, x = _layer_with_outliers(seed=4)
    with torch.no_grad():
        plain_layer = QuantLinear.from_linear(lin, 8, act_mode="dynamic_token", act_symmetric=True)
        mixed, plain = LLMInt8Linear.from_linear(lin)(x).double(), plain_layer(x).double()
        # Both share the int8 weights; against x·Ŵᵀ only the activation rounding is left: per token it
        # is sized by the outliers (60×) for every column, with LLM.int8 by the regular columns only.
        weights_only = nn.functional.linear(x, plain_layer.dense_weight(), lin.bias).double()
        exact = lin(x).double()

    def err(y, ref):
        return float((y - ref).abs().mean())

    assert err(mixed, weights_only) < 0.05 * err(plain, weights_only)
    assert err(mixed, exact) < 0.6 * err(plain, exact)  # the int8 weights' own error is common to both


def test_shapes_dtype_and_a_batch_without_outliers():
    lin, _ = _layer_with_outliers()
    layer = LLMInt8Linear.from_linear(lin)
    x = torch.randn(2, 3, 24)  # |x| < 6 almost surely: all int8
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (2, 3, 10) and y.dtype == torch.float32
        ref = _reference64(x.reshape(6, 24), lin.weight.detach(), lin.bias.detach(), 6.0).reshape(2, 3, 10)
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert layer.weight_bits_per_element() == pytest.approx(8 + 32 / 24)
    total, nonzero = layer.slimkit_param_counts()
    assert total == 240 and nonzero <= 240


# --- the handler --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_llm_int8_on_decoders_replaces_every_linear_and_stays_close(arch):
    model = tiny_causal_lm(arch)
    ids = token_batches(2, 20, seed=2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    n_linear = sum(1 for m in model.modules() if type(m) is nn.Linear)
    ctx = Context()
    sk.quantize_(model, LLMInt8(ignore=("lm_head",)), ctx=ctx)
    n_int8 = sum(1 for m in model.modules() if isinstance(m, LLMInt8Linear))
    assert n_int8 == n_linear - 1 and type(model.lm_head) is nn.Linear
    assert f"{n_int8} Linear layer(s)" in ctx.notes[-1]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.02


def test_save_and_reload_give_identical_outputs(tmp_path):
    model = tiny_causal_lm("mistral")
    sk.quantize_(model, LLMInt8(threshold=2.5))  # a low threshold so that the float path is exercised
    ids = token_batches(1, 16, seed=9)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    again = sk.load(sk.save(model, tmp_path / "int8"))
    layer = again.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LLMInt8Linear) and layer.threshold == 2.5
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, out)
    inf_layer = LLMInt8Linear(8, 4, threshold=math.inf)
    assert LLMInt8Linear.from_slimkit_spec(inf_layer.slimkit_spec()).threshold == math.inf


def test_bad_threshold_and_patterns_are_refused():
    for bad in (0, -1.0, float("nan"), True, "6"):
        with pytest.raises(ConfigError, match="threshold"):
            LLMInt8(threshold=bad)
    with pytest.raises(ConfigError, match="ignore"):
        LLMInt8(ignore="lm_head")
    assert LLMInt8.from_dict(LLMInt8(threshold=4.0).to_dict()) == LLMInt8(threshold=4.0)
    assert not LLMInt8.needs_data


def test_onnx_export_is_refused_with_the_layer_named(tmp_path):
    pytest.importorskip("onnx")
    from slimkit.export.onnx import export_onnx

    model = nn.Sequential(nn.Linear(8, 4))
    sk.quantize_(model, LLMInt8())
    with pytest.raises(UnsupportedError, match=r"layer '0'.*LLMInt8Linear"):
        export_onnx(model, tmp_path / "m.onnx", example=torch.randn(2, 8))
