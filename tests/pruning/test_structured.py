"""StructuredPrune end to end: selection against hand references, refusals, Taylor, MAC targets, ONNX."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.registry import Context
from slimkit.core.measure import count_macs
from slimkit.pruning.structured import StructuredPrune
from slimkit.zoo.digits import load_digits_split, load_pretrained

torch.set_num_threads(1)


def convs(model):
    return [m for m in model.features if isinstance(m, nn.Conv2d)]


def l1_scores(model) -> list[torch.Tensor]:
    """digits-cnn's per-filter group L1 by hand: mean of Σ|filter|, |gamma| and Σ|next layer's column|."""
    c, bns = convs(model), [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    nxt = [c[1].weight, c[2].weight, model.classifier.weight]
    out = []
    for conv, bn, w in zip(c, bns, nxt):
        w = w.detach().double()
        cols = w.abs().sum((0, 2, 3)) if w.dim() == 4 else w.abs().sum(0)
        out.append((conv.weight.detach().double().abs().sum((1, 2, 3)) + bn.weight.detach().double().abs() + cols) / 3)
    return out


def kept_filters(dense, pruned) -> list[torch.Tensor]:
    """Which of the dense model's filters each pruned layer kept, found through its BN's gamma.

    (Every gamma of the trained model is distinct, so it identifies its filter; the conv
    rows cannot be matched directly because their input channels were pruned too.)
    """
    bn_d = [m for m in dense.features if isinstance(m, nn.BatchNorm2d)]
    bn_p = [m for m in pruned.features if isinstance(m, nn.BatchNorm2d)]
    assert all(d.weight.unique().numel() == d.num_features for d in bn_d)
    return [torch.tensor([int((d.weight == g).nonzero()[0]) for g in p.weight]) for d, p in zip(bn_d, bn_p)]


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": True}, "ratio"), ({"ratio": "half"}, "ratio"),
    ({"importance": "l3"}, "importance"), ({"scope": "model"}, "scope"), ({"round_to": 0}, "round_to"),
    ({"round_to": 2.0}, "round_to"), ({"min_units": 0}, "min_units"), ({"targets": ("filters",)}, "targets"),
    ({"targets": ("heads", "heads")}, "targets"), ({"example_input_shape": (1, 0, 8)}, "example_input_shape"),
    ({"target_macs": 1.0}, "target_macs"), ({"target_macs": 0}, "target_macs"),
    ({"ratio": {"features.0": 0.2}}, "ratio"), ({"ratio": {"default": 0.2}, "scope": "global"}, "ratio"),
    ({"ratio": {"default": 1.5}}, "ratio"), ({"recalibrate_bn": "yes"}, "recalibrate_bn"),
    ({"include": "features.0"}, "include"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"StructuredPrune.{field}"):
        StructuredPrune(**kwargs)


def test_unknown_importance_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'taylor'"):
        StructuredPrune(importance="tayler")


def test_config_round_trips_and_knows_when_it_needs_data():
    cfg = StructuredPrune(ratio={"features.0": 0.1, "default": 0.3}, round_to=4, example_input_shape=[2, 1, 8, 8])
    assert cfg.example_input_shape == (2, 1, 8, 8)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert not cfg.needs_data and StructuredPrune(importance="taylor").needs_data
    assert StructuredPrune(recalibrate_bn=True).needs_data
    assert sk.StructuredPrune is StructuredPrune


# -- selection -------------------------------------------------------------------------------
def test_per_layer_l1_keeps_the_highest_group_scores():
    dense = load_pretrained()
    model = load_pretrained()
    ctx = Context()
    sk.prune_(model, StructuredPrune(ratio=0.3), ctx=ctx)
    widths = [c.out_channels for c in convs(model)]
    assert widths == [int(32 * 0.7), int(64 * 0.7), int(128 * 0.7)] == [22, 44, 89]
    for scores, got in zip(l1_scores(dense), kept_filters(dense, model)):
        want = torch.sort(torch.argsort(scores, descending=True)[: len(got)]).values
        assert torch.equal(got, want)
    # the kept slices are the dense weights at the kept filters (and kept input channels)
    k0, k1 = kept_filters(dense, model)[:2]
    torch.testing.assert_close(convs(model)[1].weight, convs(dense)[1].weight[k1][:, k0])
    assert model.arch_config()["channels"] == widths
    assert "parameters 94186 -> " in ctx.notes[0] and "features.0 32->22" in ctx.notes[0]
    with torch.no_grad():
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_global_scope_ranks_mean_normalized_scores_across_layers():
    dense = load_pretrained()
    model = load_pretrained()
    sk.prune_(model, StructuredPrune(ratio=0.4, scope="global"))
    scores = [s / s.mean() for s in l1_scores(dense)]
    flat = torch.cat(scores)
    n_remove = 224 - int(224 * 0.6)
    threshold = torch.sort(flat).values[n_remove - 1]
    want = [int((s > threshold).sum()) for s in scores]
    assert [c.out_channels for c in convs(model)] == want
    assert sum(want) == 224 - n_remove


def test_per_layer_map_round_to_and_include_ignore():
    model = load_pretrained()
    sk.prune_(model, StructuredPrune(ratio={"features.0": 0.5, "default": 0.25}, round_to=8))
    assert [c.out_channels for c in convs(model)] == [16, 48, 96]
    model = load_pretrained()
    sk.prune_(model, StructuredPrune(ratio=0.5, ignore=["features.4"]))
    assert [c.out_channels for c in convs(model)] == [16, 64, 64]
    model = load_pretrained()
    sk.prune_(model, StructuredPrune(ratio=0.5, include=["features.8"]))
    assert [c.out_channels for c in convs(model)] == [32, 64, 64]
    with pytest.raises(ConfigError, match="match no prunable group"):
        sk.prune_(load_pretrained(), StructuredPrune(include=["features.2"]))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 2), nn.Linear(2, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_ratio_that_empties_a_layer_is_refused_by_name_before_any_change():
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"'fc1' with 0 of its 2 neurons"):
        sk.prune_(model, StructuredPrune(ratio=0.6, example_input_shape=[2, 6]))
    with pytest.raises(ConfigError, match="'fc1'.*round_to=4"):
        sk.prune_(model, StructuredPrune(ratio=0.1, round_to=4, example_input_shape=[2, 6]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # global ranking never empties a group: fc1 keeps min_units
    sk.prune_(model, StructuredPrune(ratio=0.6, scope="global", example_input_shape=[2, 6]))
    assert model.fc1.out_features >= 1 and model.fc1.out_features + model.fc2.out_features == int(18 * 0.4)


def test_bn_scale_without_batchnorm_is_refused_and_the_model_untouched():
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedError, match="bn_scale .* group 'fc1' has none"):
        sk.prune_(model, StructuredPrune(importance="bn_scale", example_input_shape=[2, 6]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bn = load_pretrained()
    sk.prune_(bn, StructuredPrune(importance="bn_scale", ratio=0.5))
    gammas = [m.weight.detach().abs() for m in load_pretrained().features if isinstance(m, nn.BatchNorm2d)]
    for dense_gamma, got in zip(gammas, kept_filters(load_pretrained(), bn)):
        assert torch.equal(got, torch.sort(torch.argsort(dense_gamma, descending=True)[: len(got)]).values)


def test_inputs_for_tracing_a_users_module():
    with pytest.raises(UnsupportedError, match="example_input_shape"):
        sk.prune_(Tiny(), StructuredPrune())
    model = Tiny()
    sk.prune_(model, StructuredPrune(ratio=0.5, ignore=["fc1"]), data=CalibrationData.from_tensors(torch.randn(4, 6)))
    assert (model.fc1.out_features, model.fc2.out_features) == (2, 8)
    with pytest.raises(UnsupportedError, match="heads and neurons are found in transformers models"):
        sk.prune_(Tiny(), StructuredPrune(targets=("heads",), example_input_shape=[2, 6]))


def test_an_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedError, match="cannot trace Branchy.forward"):
        sk.prune_(Branchy(), StructuredPrune(example_input_shape=[1, 4]))


# -- Taylor ------------------------------------------------------------------------------------
def taylor_reference(model, x, labels) -> list[torch.Tensor]:
    ref = copy.deepcopy(model).eval()
    nn.functional.cross_entropy(ref(x), labels).backward()
    c, bns = convs(ref), [m for m in ref.features if isinstance(m, nn.BatchNorm2d)]
    nxt = [c[1].weight, c[2].weight, ref.classifier.weight]
    out = []
    for conv, bn, w in zip(c, bns, nxt):
        wg = (w * w.grad).detach().double().abs()
        cols = wg.sum((0, 2, 3)) if wg.dim() == 4 else wg.sum(0)
        filt = (conv.weight * conv.weight.grad).detach().double().abs().sum((1, 2, 3))
        out.append((filt + (bn.weight * bn.weight.grad).detach().double().abs() + cols) / 3)
    return out


def test_taylor_uses_labels_when_given_and_leaves_no_gradients_behind():
    x, y = load_digits_split("calibration")
    dense = load_pretrained()
    model = load_pretrained()
    data = CalibrationData([{"input": x, "labels": y}])
    sk.prune_(model, StructuredPrune(importance="taylor", ratio=0.5), data=data)
    for scores, got in zip(taylor_reference(dense, x, y), kept_filters(dense, model)):
        assert torch.equal(got, torch.sort(torch.argsort(scores, descending=True)[: len(got)]).values)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_without_labels_uses_the_models_predictions():
    x, _ = load_digits_split("calibration")
    dense = load_pretrained()
    with torch.no_grad():
        predicted = dense(x).argmax(1)
    model = load_pretrained()
    sk.prune_(model, StructuredPrune(importance="taylor", ratio=0.5), data=CalibrationData.from_tensors(x))
    for scores, got in zip(taylor_reference(dense, x, predicted), kept_filters(dense, model)):
        assert torch.equal(got, torch.sort(torch.argsort(scores, descending=True)[: len(got)]).values)
    with pytest.raises(DataError, match="taylor importance needs calibration data"):
        sk.prune_(load_pretrained(), StructuredPrune(importance="taylor"))


def test_taylor_with_the_users_own_gradients():
    x, y = load_digits_split("calibration")
    dense = load_pretrained()
    model = load_pretrained()
    nn.functional.cross_entropy(model(x[:50]), y[:50]).backward()
    sk.prune_(model, StructuredPrune(importance="taylor", ratio=0.5))  # no data: the .grad already there
    for scores, got in zip(taylor_reference(dense, x[:50], y[:50]), kept_filters(dense, model)):
        assert torch.equal(got, torch.sort(torch.argsort(scores, descending=True)[: len(got)]).values)


# -- MACs, BatchNorm, ONNX ---------------------------------------------------------------------
def test_target_macs_finds_the_ratio_for_half_the_macs():
    model = load_pretrained()
    x = torch.rand(2, 1, 8, 8)
    dense = count_macs(model, x)
    ctx = Context()
    sk.prune_(model, StructuredPrune(target_macs=0.5), ctx=ctx)
    macs = count_macs(model, x)
    assert 0.45 * dense < macs <= 0.5 * dense
    assert "target_macs 0.5" in ctx.notes[0]
    with pytest.raises(ConfigError, match="target_macs"):
        sk.prune_(load_pretrained(), StructuredPrune(target_macs=0.01, include=["features.8"]))


def test_recalibrate_bn_re_estimates_statistics_on_the_calibration_data():
    x, _ = load_digits_split("calibration")
    model = load_pretrained()
    sk.prune_(model, StructuredPrune(ratio=0.3, recalibrate_bn=True), data=CalibrationData.from_tensors(x, 64))
    assert not model.training
    # the first BN sees the (pruned) first conv's outputs: the average of the batch statistics
    # (momentum None: each of the batches of 64, 64 and 52 images counts once)
    with torch.no_grad():
        hs = [model.features[0](b) for b in torch.split(x, 64)]
    mean = torch.stack([h.mean((0, 2, 3)) for h in hs]).mean(0)
    var = torch.stack([h.transpose(0, 1).reshape(h.shape[1], -1).var(1) for h in hs]).mean(0)
    torch.testing.assert_close(model.features[1].running_mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.features[1].running_var, var, atol=1e-6, rtol=1e-5)
    assert model.features[1].momentum == 0.1  # restored
    with pytest.raises(DataError, match="recalibrate_bn needs calibration data"):
        sk.prune_(load_pretrained(), StructuredPrune(recalibrate_bn=True))


def test_pruned_digits_cnn_exports_to_onnx_with_the_same_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = load_pretrained()
    sk.prune_(model, StructuredPrune(ratio=0.5))
    path = tmp_path / "pruned.onnx"
    sk.export_onnx(model, path)
    x, _ = load_digits_split("test")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:64].numpy()})[0]
    with torch.no_grad():
        want = model(x[:64]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_same_channels_as_torch_pruning():
    """Optional (torch-pruning is not a dependency): L1 per layer picks exactly Torch-Pruning's channels."""
    tp = pytest.importorskip("torch_pruning")
    import warnings

    for ratio, scope in ((0.3, "layer"), (0.4, "global")):
        theirs = load_pretrained()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pruner.MetaPruner(theirs, torch.rand(2, 1, 8, 8), importance=tp.importance.MagnitudeImportance(p=1),
                                 pruning_ratio=ratio, global_pruning=scope == "global",
                                 ignored_layers=[theirs.classifier]).step()
        ours = load_pretrained()
        sk.prune_(ours, StructuredPrune(ratio=ratio, scope=scope))
        for (k, a), (k2, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k


def test_transformers_models_go_to_the_head_and_neuron_groups(tiny_llama):
    pytest.importorskip("slimkit.pruning.transformer_groups")
    ids = torch.randint(0, 128, (1, 12))
    ctx = Context()
    sk.prune_(tiny_llama, StructuredPrune(ratio=0.5), ctx=ctx)
    assert tiny_llama.model.layers[0].mlp.gate_proj.out_features == 64
    with torch.no_grad():
        assert tiny_llama(ids).logits.shape == (1, 12, 128)
    assert "StructuredPrune (l1, layer)" in ctx.notes[0]
