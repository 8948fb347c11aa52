"""QAT: config, prepare (fold + fake-quantized layers), training, convert to the PTQ layer types."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.registry import Context, handler_for
from slimkit.quantization import ptq
from slimkit.quantization.fake_quant import FakeQuantizer
from slimkit.quantization.modules import QuantConv2d, QuantLinear
from slimkit.quantization.primitives import quantize_weight
from slimkit.quantization.qat import QAT, QATConv2d, QATLinear, QATTrain, qat_layers
from slimkit.quantization.weight_only import RTN

torch.set_num_threads(1)


def run(model, cfg, data=None):
    ctx = Context(data=data)
    handler_for(cfg)(model, cfg, ctx)
    return ctx


class Net(nn.Module):
    """conv-bn-relu, conv-relu (no BN), pool, two Linears."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            bn = self.features[1]
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.pool(self.features(x)).flatten(1))))


def images(n=16, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def train_steps(model, n=5, lr=1e-2, seed=0):
    """A few steps of a user's own loop (random targets: only the plumbing matters here)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x = torch.rand(8, 1, 8, 8, generator=g)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# --- config -------------------------------------------------------------------------------


def test_config_base_from_mapping_round_trips_and_bad_values_are_named():
    cfg = QAT(base={"type": "RTN", "bits": 4, "ignore": ["head"]}, learnable_scales=True)
    assert cfg.base == RTN(bits=4, ignore=("head",)) and cfg.family == "quantize"
    data = cfg.to_dict()
    assert data["base"]["type"] == "RTN" and data["base"]["ignore"] == ["head"]
    assert Config.from_dict(data) == cfg
    with pytest.raises(ConfigError, match=r"QAT.base: .*RTN.bits"):
        QAT(base={"type": "RTN", "bits": 5})
    with pytest.raises(ConfigError, match="not DynamicQuant"):
        QAT(base={"type": "DynamicQuant"})
    with pytest.raises(ConfigError, match="embeddings"):
        QAT(base=RTN(embeddings=True))
    with pytest.raises(ConfigError, match="QAT.step"):
        QAT(base=RTN(), step="train")
    with pytest.raises(ConfigError, match="freeze_observers_after"):
        QAT(base=RTN(), freeze_observers_after=0)
    with pytest.raises(ConfigError, match="QAT.base"):
        QAT()
    with pytest.raises(ConfigError, match="QATTrain.steps"):
        QATTrain(steps=0)
    for option in (dict(smooth_alpha=0.5), dict(attention=True), dict(reduce_range=True)):
        with pytest.raises(ConfigError, match=f"QAT does not support {next(iter(option))}"):
            QAT(base=ptq.StaticQuant(**option))


# --- prepare ------------------------------------------------------------------------------


def test_prepare_folds_bn_swaps_layers_and_keeps_parameters():
    model = Net().eval()
    x = images()
    with torch.no_grad():
        ref = model(x)
    fc_weight = model.fc.weight
    ctx = run(model, QAT(base=RTN(bits=8)))
    assert isinstance(model.features[1], nn.Identity)  # BN folded
    assert [type(m) for _, m in qat_layers(model)] == [QATConv2d, QATConv2d, QATLinear, QATLinear]
    assert model.fc.weight is fc_weight  # the float weight stays the trainable Parameter
    assert model.fc.input_quant is None  # RTN: weights only
    assert any("folded 1 BatchNorm" in n for n in ctx.notes)
    assert "2 Linear and 2 Conv2d" in ctx.notes[-1] and "int8" in ctx.notes[-1]
    with torch.no_grad():
        assert (model(x) - ref).abs().max() < 0.02 * ref.abs().max()  # 8-bit fake quant is close to float
    with pytest.raises(ConfigError, match="already prepared"):
        run(model, QAT(base=RTN(bits=8)))


def test_prepare_respects_include_ignore_bits_map_and_group_size():
    model = Net().eval()
    base = RTN(bits={"re:features.*": 8, "default": 4}, group_size=16, ignore=["head"])
    ctx = run(model, QAT(base=base, fold_bn=False))
    assert isinstance(model.features[1], nn.BatchNorm2d)  # fold_bn=False
    # convs cannot take group-wise scales (as in PTQ): skipped with a note; head ignored
    assert [n for n, _ in qat_layers(model)] == ["fc"]
    assert type(model.head) is nn.Linear
    assert any("skipped features.0" in n and "group-wise" in n for n in ctx.notes)
    assert model.fc.bits == 4 and model.fc.group_size == 16
    assert model.fc.weight_quant.qparams(model.fc.weight_rows())[0].shape == (32 * 4,)


def test_nan_weight_raises_naming_layer_before_any_change():
    model = Net().eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="'fc'"):
        run(model, QAT(base=RTN(bits=4)))
    assert isinstance(model.features[1], nn.BatchNorm2d) and not qat_layers(model)


def test_learnable_scales_are_parameters_of_the_model():
    model = Net().eval()
    run(model, QAT(base=RTN(bits=4), learnable_scales=True))
    names = [n for n, _ in model.named_parameters()]
    assert "fc.weight_quant.scale" in names and "features.0.weight_quant.scale" in names
    before = model.fc.weight_quant.scale.detach().clone()
    train_steps(model, n=3)
    assert not torch.equal(model.fc.weight_quant.scale.detach(), before)


# --- convert ------------------------------------------------------------------------------


def test_convert_untrained_equals_rtn_ptq():
    """Before any training step, prepare -> convert gives exactly RTN's codes (the grids start equal)."""
    model = Net().eval()
    base = RTN(bits=4, group_size=16)
    fc = model.fc.weight.detach().clone()
    run(model, QAT(base=base, fold_bn=False))
    run(model, QAT(base=base, step="convert"))
    ref = quantize_weight(fc, 4, group_size=16)
    assert isinstance(model.fc, QuantLinear) and model.fc.act_mode is None
    assert torch.equal(model.fc.codes(), ref.q) and torch.equal(model.fc.scale, ref.scale)


@pytest.mark.parametrize("bits, symmetric, learnable, group_size", [
    (4, True, False, None), (4, False, True, None), (2, True, True, 16), (8, False, False, 32), (1, True, False, None),
    (1, True, True, None),
])
def test_convert_reproduces_the_prepared_model(bits, symmetric, learnable, group_size):
    model = Net().eval()
    base = RTN(bits=bits, symmetric=symmetric, group_size=group_size)
    run(model, QAT(base=base, learnable_scales=learnable))
    train_steps(model)
    x = images(seed=1)
    with torch.no_grad():
        prepared = model(x)
    scale_before = model.fc.weight_quant.qparams(model.fc.weight_rows())[0]
    ctx = run(model, QAT(base=base, step="convert", learnable_scales=learnable))
    assert isinstance(model.fc, QuantLinear) and model.fc.bits == bits and model.fc.symmetric == symmetric
    assert torch.equal(model.fc.scale.flatten(), scale_before)  # the trained grid, not a fresh min/max
    if group_size is None:
        assert isinstance(model.features[0], QuantConv2d) and model.features[0].bits == bits
    assert not qat_layers(model) and "codes on the trained grid" in ctx.notes[-1]
    with torch.no_grad():
        assert torch.allclose(model(x), prepared, atol=1e-5, rtol=1e-5)


def test_learned_grid_differs_from_min_max_after_training():
    model = Net().eval()
    base = RTN(bits=4)
    run(model, QAT(base=base, learnable_scales=True))
    train_steps(model, n=10)
    fc_w = model.fc.weight.detach().clone()
    run(model, QAT(base=base, step="convert"))
    assert not torch.equal(model.fc.scale, quantize_weight(fc_w, 4).scale)


def test_convert_errors():
    with pytest.raises(UnsupportedError, match="prepare"):
        run(Net(), QAT(base=RTN(bits=4), step="convert"))
    model = Net().eval()
    run(model, QAT(base=RTN(bits=4)))
    with pytest.raises(ConfigError, match="layer 'features.0'.*prepared with"):
        run(model, QAT(base=RTN(bits=8), step="convert"))
    with torch.no_grad():
        model.head.weight[1, 1] = float("inf")
    with pytest.raises(DataError, match="'head'"):
        run(model, QAT(base=RTN(bits=4), step="convert"))
    assert len(qat_layers(model)) == 4  # nothing converted


# --- static (weights + inputs) ------------------------------------------------------------


def test_static_base_calibrated_inputs_convert_like_ptq():
    from slimkit.quantization.ptq import StaticQuant

    data = CalibrationData.from_tensors(images(32), batch_size=8)
    base = StaticQuant(bits=4)
    ptq_model = Net().eval()
    run(ptq_model, base, data)
    model = Net().eval()
    ctx = run(model, QAT(base=base), data)
    assert all(m.input_quant is not None and m.input_quant.initialized for _, m in qat_layers(model))
    assert "initialised from minmax on the calibration data" in ctx.notes[-1]
    run(model, QAT(base=base, step="convert"))
    for name in ("features.0", "features.3", "fc", "head"):
        q, p = model.get_submodule(name), ptq_model.get_submodule(name)
        assert type(q) is type(p) and q.act_mode == p.act_mode == "static"
        assert torch.allclose(q.act_scale, p.act_scale) and torch.equal(q.act_zero, p.act_zero)
        assert torch.equal(q.codes(), p.codes())
    x = images(seed=3)
    with torch.no_grad():
        assert torch.allclose(model(x), ptq_model(x), atol=1e-5)


def test_static_base_trained_inputs_and_freeze():
    from slimkit.quantization.ptq import StaticQuant

    base = StaticQuant(bits=4, act_symmetric=False)
    model = Net().eval()
    run(model, QAT(base=base, freeze_observers_after=3))  # no data: ranges come from training batches
    with pytest.raises(DataError, match="observed no data"):
        model(images())  # eval before any training forward: the input range is unknown
    model2 = Net().eval()
    run(model2, QAT(base=base))
    with pytest.raises(DataError, match="'features.0' never saw an input"):
        run(model2, QAT(base=base, step="convert"))
    train_steps(model, n=5)
    fq = model.fc.input_quant
    assert fq.steps == 3 and not fq.observing
    x = images(seed=2)
    with torch.no_grad():
        prepared = model(x)
    run(model, QAT(base=base, step="convert"))
    scale, zero = fq.qparams()
    assert model.fc.act_mode == "static" and torch.equal(model.fc.act_scale, scale) and torch.equal(model.fc.act_zero, zero)
    with torch.no_grad():
        assert torch.allclose(model(x), prepared, atol=1e-5)


# --- training -----------------------------------------------------------------------------


def test_qattrain_recovers_2bit_digits_cnn_without_labels():
    from slimkit.zoo.digits import accuracy, load_digits_split, load_pretrained

    x_test, y_test = load_digits_split("test")
    x_cal, _ = load_digits_split("calibration")
    data = CalibrationData.from_tensors(x_cal, batch_size=32)
    model = load_pretrained()
    base = RTN(bits=2)
    run(model, QAT(base=base, learnable_scales=True))
    before = accuracy(model, x_test, y_test)
    ctx = run(model, QATTrain(steps=80, lr=1e-3), data)
    after = accuracy(model, x_test, y_test)
    assert before < 0.6 and after > 0.93, (before, after)  # 2-bit PTQ collapses, QAT recovers
    assert "KL" in ctx.notes[-1] and not model.training
    with torch.no_grad():
        prepared = model(x_test)
    run(model, QAT(base=base, step="convert"))
    assert isinstance(model.features[0], QuantConv2d) and model.features[0].bits == 2
    with torch.no_grad():
        assert torch.allclose(model(x_test), prepared, atol=1e-4)


def test_qattrain_needs_a_prepared_model_and_data():
    data = CalibrationData.from_tensors(images(8))
    with pytest.raises(UnsupportedError, match="prepare"):
        run(Net(), QATTrain(steps=1), data)
    model = Net().eval()
    run(model, QAT(base=RTN(bits=4)))
    with pytest.raises(DataError, match="needs data"):
        run(model, QATTrain(steps=1))
    assert not any(not m.enabled for m in model.modules() if isinstance(m, FakeQuantizer))


def test_public_verbs_record_the_steps():
    import slimkit as sk
    from slimkit.core.io import model_info

    model = Net().eval()
    sk.quantize_(model, sk.QAT(base=sk.RTN(bits=4)))
    train_steps(model, n=2)
    sk.quantize_(model, sk.QAT(base=sk.RTN(bits=4), step="convert"))
    steps = model_info(model)["steps"]
    assert [s["step"] for s in steps] == ["prepare", "convert"] and steps[0]["base"]["bits"] == 4
    assert sk.fold_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()) == ["0+1"]
