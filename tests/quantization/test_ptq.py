"""Dynamic and static PTQ, per-layer bit maps, the accuracy-aware fallback and mixed precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.registry import Context, handler_for
from slimkit.quantization.mixed import CastPrecision, LowPrecision
from slimkit.quantization.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quantization.primitives import quantize_weight, scale_zero_from_range
from slimkit.quantization.ptq import DynamicQuant, StaticQuant

torch.set_num_threads(1)


def run(model, cfg, data=None):
    ctx = Context(data=data)
    handler_for(cfg)(model, cfg, ctx)
    return ctx


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc0 = nn.Linear(16, 32)
        self.fc1 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(torch.relu(self.fc0(x)))))


def calib(n=4, rows=8, seed=0, dim=16):
    g = torch.Generator().manual_seed(seed)
    return CalibrationData.from_tensors([torch.randn(rows, dim, generator=g) for _ in range(n)])


def test_dynamic_matches_hand_computed_reference():
    model = MLP()
    ref = MLP()
    run(model, DynamicQuant())
    assert all(isinstance(getattr(model, n), QuantLinear) for n in ("fc0", "fc1", "head"))
    x = torch.randn(5, 16) * 4

    def dyn(lin, h):  # per-batch uint8 input, int8 per-channel weight
        s, z = scale_zero_from_range(h.min(), h.max(), 8, False)
        hq = (torch.clamp(torch.round(h / s) + z, 0, 255) - z) * s
        return F.linear(hq, quantize_weight(lin.weight, 8).dequantize(), lin.bias)

    h = torch.relu(dyn(ref.fc0, x))
    h = torch.relu(dyn(ref.fc1, h))
    assert torch.allclose(model(x), dyn(ref.head, h), atol=1e-5)


def test_static_scales_are_the_calibration_min_max():
    model, ref = MLP(), MLP()
    data = calib()
    seen = {"fc1": [], "head": []}
    hooks = [getattr(ref, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0])) for n in seen]
    for b in data:
        ref(b)
    for h in hooks:
        h.remove()
    run(model, StaticQuant(), data)
    for name, xs in seen.items():
        allx = torch.cat(xs)
        s, z = scale_zero_from_range(allx.min(), allx.max(), 8, False)
        layer = getattr(model, name)
        assert layer.act_mode == "static"
        assert float(layer.act_scale.detach()) == pytest.approx(float(s), rel=1e-6)
        assert int(layer.act_zero) == int(z)
    x = next(iter(data))
    assert (model(x) - ref(x)).abs().max() < 0.05 * ref(x).abs().max()


def test_static_on_conv_bn_folds_and_stays_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    for bn in (model[1], model[4]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(16, 1, 8, 8)
    expected = model(x)
    ctx = run(model, StaticQuant(), CalibrationData.from_tensors(x, batch_size=8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, QuantConv2d) for m in model.modules()) == 2
    assert any("folded 2 BatchNorm" in n for n in ctx.notes)
    assert (model(x) - expected).abs().max() < 0.05 * expected.abs().max()


def test_per_layer_bit_map():
    model = MLP()
    run(model, StaticQuant(bits={"re:fc[01]": 4, "head": 2, "default": 8}), calib())
    assert (model.fc0.bits, model.fc1.bits, model.head.bits) == (4, 4, 2)
    cfg = StaticQuant(bits={"fc0": 4, "default": 8})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_weight_observer_mse_not_worse_than_minmax_on_outliers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight[:, 0] = 40.0  # one outlier column per row
    from slimkit.quantization.ptq import observed_weight

    w = lin.weight.detach()
    err = {o: (observed_weight(w, 4, True, o).dequantize() - w).pow(2).sum() for o in ("minmax", "mse")}
    assert err["mse"] <= err["minmax"]


def test_fallback_returns_the_sensitive_layer_to_float():
    model, ref = MLP(), MLP()
    with torch.no_grad():  # fc1 sees one huge input feature: a per-tensor int8 grid crushes the rest
        model.fc0.weight[0] *= 300
        ref.fc0.weight[0] *= 300
        model.fc1.weight[:, 0] /= 300
        ref.fc1.weight[:, 0] /= 300
    data = calib()
    plain = MLP()
    plain.load_state_dict(ref.state_dict())
    run(plain, StaticQuant(), data)
    err = {}
    for name, m in (("plain", plain),):
        x = torch.cat(list(data))
        err[name] = 1 - F.cosine_similarity(m(x), ref(x), dim=-1).mean()
    ctx = run(model, StaticQuant(tolerance=float(err["plain"]) / 10), data)
    assert isinstance(model.fc1, QuantLinear) and model.fc1.act_mode is None  # int8 weights kept, input float
    assert isinstance(model.head, QuantLinear) and model.head.act_mode == "static"
    assert any("fc1 back to float input" in n for n in ctx.notes)
    assert any("met" in n and "NOT" not in n for n in ctx.notes)
    x = torch.cat(list(data))
    assert 1 - F.cosine_similarity(model(x), ref(x), dim=-1).mean() < err["plain"]
    full = MLP()
    full.load_state_dict(ref.state_dict())
    run(full, StaticQuant(tolerance=float(err["plain"]) / 10, fallback_to="float"), data)
    assert type(full.fc1) is nn.Linear and isinstance(full.head, QuantLinear)


def test_bad_input_is_refused_clearly():
    with pytest.raises(DataError, match="calibration data"):
        run(MLP(), StaticQuant(), None)
    with pytest.raises(DataError):
        run(MLP(), StaticQuant(), CalibrationData([]))
    with pytest.raises(DataError, match="batch 1"):
        CalibrationData.from_tensors([torch.randn(4, 16), torch.full((4, 16), float("nan"))])

    class Overflow(nn.Module):  # finite data that turns to inf inside the model
        def forward(self, x):
            return x * 1e38 * 1e38

    blowup = nn.Sequential(nn.Linear(16, 8), Overflow(), nn.Linear(8, 4))
    with pytest.raises(DataError, match="input of 2"):
        run(blowup, StaticQuant(), calib())
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(DataError, match="fc1"):
        run(model, StaticQuant(), calib())
    assert type(model.fc0) is nn.Linear  # nothing changed before the error
    with pytest.raises(DataError, match="every batch must match"):
        CalibrationData([torch.randn(4, 16), torch.randn(4, 12)])
    for bad in (dict(bits=5), dict(bits=32), dict(act_bits=4), dict(act_observer="minmx"), dict(tolerance=2.0),
                dict(bits={"fc0": 4}), dict(weight_observer="kl"), dict(act_options={"percentile": 150.0},
                                                                            act_observer="percentile")):
        with pytest.raises(ConfigError):
            StaticQuant(**bad)
    with pytest.raises(ConfigError, match="minmax"):
        StaticQuant(act_observer="minmx")
    with pytest.raises(ConfigError):
        DynamicQuant(bits=4)


def test_unsupported_layers_are_skipped_and_listed():
    class DoubledLinear(nn.Linear):  # a forward that is not x·Wᵀ + b: a QuantLinear cannot stand in
        def forward(self, x):
            return 2 * super().forward(x)

    class PlainSubclass(nn.Linear):  # nn.Linear's own forward: Linear-like, quantized
        pass

    model = nn.Sequential(nn.Linear(16, 8), DoubledLinear(8, 8), PlainSubclass(8, 4))
    ctx = run(model, StaticQuant(), calib())
    assert isinstance(model[0], QuantLinear) and type(model[1]) is DoubledLinear
    assert isinstance(model[2], QuantLinear)
    assert any("skipped 1" in n and "DoubledLinear" in n and "forward" in n for n in ctx.notes)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "kl", "mse"])
def test_every_activation_observer_runs_on_tiny_llama(tiny_llama, observer, tmp_path):
    import slimkit

    data = CalibrationData([{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(2)])
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = tiny_llama(input_ids=ids).logits
    run(tiny_llama, StaticQuant(act_observer=observer, embeddings=True, ignore=("lm_head",)), data)
    assert isinstance(tiny_llama.model.embed_tokens, QuantEmbedding)
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        after = tiny_llama(input_ids=ids).logits
    assert F.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.98
    if observer == "kl":  # save and reload: identical outputs
        out = slimkit.save(tiny_llama, tmp_path / "q")
        again = slimkit.load(out)
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, after)


def test_cast_precision_bf16_layers_save_and_reload(tmp_path):
    import slimkit

    model = MLP()
    x = torch.randn(3, 16)
    before = model(x)
    ctx = run(model, CastPrecision(dtype="bfloat16", include=("fc0", "fc1")))
    assert isinstance(model.fc0, LowPrecision) and model.fc0.inner.weight.dtype == torch.bfloat16
    assert type(model.head) is nn.Linear and "2 layer(s)" in ctx.notes[-1]
    out = model(x)
    assert out.dtype == torch.float32
    assert (out - before).abs().max() < 0.05 * before.abs().max()
    path = slimkit.save(model, tmp_path / "bf16")
    again = slimkit.load(path, skeleton=MLP())
    assert torch.equal(again(x), out)
    with pytest.raises(ConfigError):
        CastPrecision(dtype="float8")


def test_smoothing_scale_formula_and_zero_channels():
    from slimkit.quantization.ptq import smoothing_scale

    a = torch.tensor([4.0, 0.0, 9.0, 1.0])
    w = torch.tensor([1.0, 2.0, 4.0, 0.0])
    s = smoothing_scale(a, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 1.5, 1.0]))  # sqrt(4)/sqrt(1), 1, sqrt(9)/sqrt(4), 1


class Shared(nn.Module):
    """Two Linears reading the same tensor (like q/k/v), one outlier input channel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = x * torch.tensor([40.0] + [1.0] * 15)
        return self.c(self.a(x) + self.b(x))


def test_smoothing_shares_scales_keeps_the_function_and_helps():
    data = calib()
    x = torch.cat(list(data))
    ref = Shared()
    plain, smooth = Shared(), Shared()
    run(plain, StaticQuant(act_symmetric=True), data)
    ctx = run(smooth, StaticQuant(act_symmetric=True, smooth_alpha=0.5, smooth_include=("a", "b")), data)
    assert smooth.a.input_multiplier is not None and smooth.c.input_multiplier is None
    assert torch.equal(smooth.a.input_multiplier, smooth.b.input_multiplier)  # one shared input -> one scale
    assert any("1 shared scale vector" in n for n in ctx.notes)
    # exact algebra: (x / s) @ (W diag(s))^T == x @ W^T, so only rounding differs
    lin = ref.a
    s = 1 / smooth.a.input_multiplier
    assert torch.allclose(F.linear(x * (1 / s), lin.weight * s, lin.bias), lin(x), atol=1e-4)
    err = {n: (m(x) - ref(x)).pow(2).mean() for n, m in (("plain", plain), ("smooth", smooth))}
    assert err["smooth"] < err["plain"] / 2
    with pytest.raises(ConfigError):
        StaticQuant(smooth_alpha=1.5)
