"""SmoothQuant (scale maths, folding on several decoder architectures, W8A8 after it) and
per-token dynamic input quantization (QuantLinear act_mode="dynamic_token", DynamicQuant(per_token=True))."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit as sk
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.registry import Context
from slimkit.quantization.modules import QuantConv2d, QuantLinear
from slimkit.quantization.smoothquant import SmoothQuant, channel_absmax, smooth_scales
from tests.llm_archs import tiny_causal_lm, token_batches

torch.set_num_threads(1)


def _calib(n: int = 4, seq: int = 32) -> CalibrationData:
    return CalibrationData.from_tensors(token_batches(n, seq), batch_size=2)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _plant_outliers(model: nn.Module, factor: float = 40.0, channels=(3, 17, 42)) -> nn.Module:
    """Make a few hidden channels of every Llama-style norm output huge, compensated in the consumers' weights.

    The function is unchanged (up to float rounding) but the inputs of q/k/v and gate/up now
    have outlier channels, as real LLMs do.
    """
    with torch.no_grad():
        for layer in model.model.layers:
            pairs = ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                     (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)))
            for norm, linears in pairs:
                for c in channels:
                    norm.weight[c] *= factor
                    for lin in linears:
                        lin.weight[:, c] /= factor
    return model


# --- the scale maths ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=16), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
def test_smooth_scales_formula_and_balance(act, alpha, seed):
    a = torch.tensor(act, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, len(act), generator=g, dtype=torch.float64) * 10 + 1e-3  # three layers share the input
    s = smooth_scales(a.float(), [w[i].float() for i in range(3)], alpha).double()
    w_max = w.amax(dim=0)
    expected = a.pow(alpha) / w_max.pow(1 - alpha)
    assert torch.allclose(s, expected, rtol=1e-5)
    # The migrated maxima follow the formula: max|X_j|/s_j = a^(1-α) w^(1-α), max|W_j|·s_j = a^α w^α,
    # so at α = 0.5 activations and weights end up with the same per-channel maximum.
    assert torch.allclose(a / s, (a * w_max).pow(1 - alpha), rtol=1e-4)
    assert torch.allclose(w_max * s, (a * w_max).pow(alpha), rtol=1e-4)
    # a stacked (n_layers, in) tensor is reduced the same way as a list
    assert torch.equal(smooth_scales(a.float(), w.float(), alpha), s.float())


def test_smooth_scales_guards_zero_channels_and_bad_input():
    a = torch.tensor([0.0, 2.0, 3.0, 4.0])
    w = torch.tensor([1.0, 0.0, 4.0, float("inf")])
    s = smooth_scales(a, w, 0.5)
    assert s[0] == 1 and s[1] == 1 and s[3] == 1  # zero activation, zero weight, non-finite: nothing migrated
    assert s[2] == pytest.approx(3 ** 0.5 / 4 ** 0.5)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(a, w, 1.5)
    with pytest.raises(ValueError, match="length"):
        smooth_scales(a, w[:3], 0.5)


def test_channel_absmax_is_the_per_channel_max_of_abs():
    x = torch.tensor([[1.0, -5.0], [-3.0, 2.0], [0.5, 0.0]])
    assert torch.equal(channel_absmax(x), torch.tensor([3.0, 5.0]))


# --- the handler --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt"])
def test_smoothquant_keeps_the_function_and_folds(arch):
    model = tiny_causal_lm(arch)
    ids = token_batches(2, 24, seed=5)
    ref = _logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = Context()
    sk.quantize_(model, SmoothQuant(alpha=0.5), data=_calib(), ctx=ctx)
    assert _rel(_logits(model, ids), ref) < 1e-4
    assert all(type(m) is not QuantLinear for m in model.modules())  # a float transform: no layer type changes
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    layer0 = "model.decoder.layers.0" if arch == "opt" else "model.layers.0"
    norm = "self_attn_layer_norm" if arch == "opt" else "input_layernorm"
    q = "self_attn.q_proj"
    assert f"{layer0}.{norm}.weight" in changed and f"{layer0}.{q}.weight" in changed
    # the MLP's second Linear is smoothed through its sibling (up_proj, or fc1 across OPT's ReLU)
    second = "fc2" if arch == "opt" else "mlp.down_proj"
    assert f"{layer0}.{second}.weight" in changed
    summary = ctx.notes[-1]
    assert "smoothed" in summary and "2 block(s)" in summary
    if arch in ("llama", "qwen2"):  # grouped-query attention: v heads are shared, o_proj cannot be folded
        assert f"{layer0}.self_attn.o_proj.weight" not in changed
        assert any("o_proj not smoothed" in n for n in ctx.notes)
    else:
        o = "self_attn.out_proj" if arch == "opt" else "self_attn.o_proj"
        assert f"{layer0}.{o}.weight" in changed


def test_smoothing_flattens_planted_outliers_and_beats_naive_w8a8():
    model = _plant_outliers(tiny_causal_lm("llama"))
    ids = token_batches(2, 32, seed=7)
    ref = _logits(model, ids)
    calib = _calib(6)

    def q_input_ratio(m):
        seen = []
        h = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        _logits(m, ids)
        h.remove()
        amax = channel_absmax(seen[0])
        return float(amax.max() / amax.median())

    smooth = copy.deepcopy(model)
    sk.quantize_(smooth, SmoothQuant(alpha=0.5), data=calib)
    assert q_input_ratio(model) > 20 and q_input_ratio(smooth) < q_input_ratio(model) / 4

    errors = {}
    for label, steps in {"naive_token": [sk.DynamicQuant(per_token=True)],
                         "smooth_token": [SmoothQuant(alpha=0.5), sk.DynamicQuant(per_token=True)],
                         "naive_static": [sk.StaticQuant()],
                         "smooth_static": [SmoothQuant(alpha=0.5), sk.StaticQuant()]}.items():
        m = copy.deepcopy(model)
        for step in steps:
            sk.quantize_(m, step, data=calib)
        errors[label] = _rel(_logits(m, ids), ref)
    assert errors["smooth_token"] < 0.5 * errors["naive_token"]
    assert errors["smooth_static"] < 0.5 * errors["naive_static"]
    # s_j depends on max|X_j|·max|W_:,j| only, which the planting leaves unchanged: SmoothQuant undoes
    # it, so the smoothed W8A8 model of the planted and of the original model are the same model.
    plain = tiny_causal_lm("llama")
    for step in (SmoothQuant(alpha=0.5), sk.DynamicQuant(per_token=True)):
        sk.quantize_(plain, step, data=calib)
    assert abs(_rel(_logits(plain, ids), ref) - errors["smooth_token"]) < 0.1 * errors["smooth_token"]


def test_a_partly_ignored_group_is_left_alone_and_noted():
    model = tiny_causal_lm("mistral")
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    ctx = Context()
    sk.quantize_(model, SmoothQuant(ignore=("model.layers.0.self_attn.k_proj",)), data=_calib(2), ctx=ctx)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert any("k_proj is not selected" in n for n in ctx.notes)
    assert not torch.equal(model.model.layers[1].input_layernorm.weight, norm)  # other blocks still smoothed


def test_smoothquant_config_is_validated_and_needs_data():
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match="alpha"):
            SmoothQuant(alpha=bad)
    with pytest.raises(ConfigError, match="include"):
        SmoothQuant(include="q_proj")
    assert SmoothQuant.from_dict(SmoothQuant(alpha=0.8, ignore=("lm_head",)).to_dict()) == SmoothQuant(
        alpha=0.8, ignore=("lm_head",))
    with pytest.raises(DataError, match="calibration"):
        sk.quantize_(tiny_causal_lm("llama"), SmoothQuant())


def test_smoothed_per_token_model_saves_and_reloads(tmp_path):
    model = tiny_causal_lm("qwen2")
    calib = _calib(2)
    sk.quantize_(model, SmoothQuant(alpha=0.5), data=calib)
    sk.quantize_(model, sk.DynamicQuant(per_token=True))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.act_mode == "dynamic_token" and layer.act_symmetric
    ids = token_batches(1, 16, seed=3)
    out = _logits(model, ids)
    again = sk.load(sk.save(model, tmp_path / "w8a8"))
    assert again.model.layers[0].mlp.down_proj.act_mode == "dynamic_token"
    assert torch.equal(_logits(again, ids), out)


# --- per-token dynamic input quantization ------------------------------------------------


def _per_row_fake_quant64(x: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Slow float64 reference: every row of the (tokens, in) view quantized to 8 bits with its own range."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, r in enumerate(rows):
        lo, hi = min(float(r.min()), 0.0), max(float(r.max()), 0.0)
        if symmetric:
            scale = max(-lo, hi) / 127 or 1.0
            scale = float(torch.tensor(scale, dtype=torch.float32))  # stored scales are float32
            out[i] = torch.clamp(torch.round(r / scale), -127, 127) * scale
        else:
            scale = (hi - lo) / 255 or 1.0
            scale = float(torch.tensor(scale, dtype=torch.float32))
            zero = min(max(round(0 - lo / scale), 0), 255)
            out[i] = (torch.clamp(torch.round(r / scale) + zero, 0, 255) - zero) * scale
    return out.reshape(x.shape)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(2, 24), st.booleans(), st.integers(0, 2**31 - 1))
def test_per_token_input_matches_a_float64_per_row_reference(b, t, features, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, features, generator=g) * torch.rand(b, t, 1, generator=g) * 10
    x[0, 0] = 0.0  # an all-zero token: scale 1, exact zeros
    layer = QuantLinear(features, 3, act_mode="dynamic_token", act_symmetric=symmetric)
    got = layer.quantize_input(x).double()
    ref = _per_row_fake_quant64(x, symmetric)
    step = x.abs().amax(dim=-1, keepdim=True).double() / 100  # a step is ≤ max|x|/127 (·2 asymmetric)
    # got is float32: values up to ~40 carry float32 rounding (an ulp is 2^-23 relative) beside the float64 reference
    assert torch.allclose(got, ref, atol=1e-6, rtol=2.4e-7)
    assert bool(((got - x.double()).abs() <= step * 0.8 + 1e-7).all())
    assert torch.equal(got[0, 0], torch.zeros(features, dtype=torch.float64))


def test_per_token_differs_from_per_tensor_on_an_outlier_token():
    x = torch.randn(2, 8, 16)
    x[0, 0] *= 1000  # one huge token: per tensor it sets everyone's step, per token only its own
    per_tensor = QuantLinear(16, 4, act_mode="dynamic", act_symmetric=True).quantize_input(x)
    per_token = QuantLinear(16, 4, act_mode="dynamic_token", act_symmetric=True).quantize_input(x)
    rest = (slice(1, None),)
    assert float((per_token[rest] - x[rest]).abs().max()) < 0.05 * float((per_tensor[rest] - x[rest]).abs().max())


def test_dynamic_quant_per_token_linear_equals_reference_and_field_is_checked():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    model = nn.Sequential(lin)
    x = torch.randn(5, 32) * 3
    sk.quantize_(model, sk.DynamicQuant(per_token=True))
    q = model[0]
    assert q.act_mode == "dynamic_token" and q.act_symmetric and q.bits == 8
    w = q.dense_weight().double()
    expected = _per_row_fake_quant64(x, True) @ w.t() + lin.bias.double()
    with torch.no_grad():
        assert torch.allclose(model(x).double(), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="per_token"):
        sk.DynamicQuant(per_token=1)
    with pytest.raises(ValueError, match="QuantLinear only"):
        QuantConv2d(3, 4, (3, 3), act_mode="dynamic_token")


def test_per_token_layer_exports_to_onnx_exactly(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    sk.quantize_(model, sk.DynamicQuant(per_token=True))
    result = export_onnx(model, tmp_path / "m.onnx", example=torch.randn(4, 6, 16) * 5, check=True)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
