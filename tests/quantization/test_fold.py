"""BatchNorm folding: the formula against a hand-written reference, graph discovery, atomic failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.errors import DataError, UnsupportedError
from slimkit.quantization.fold import FoldedBatchNorm, fold_batchnorm, fold_conv_bn

torch.set_num_threads(1)


def randomize_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn.eval()


@pytest.mark.parametrize("conv_bias, affine", [(True, True), (False, True), (True, False), (False, False)])
def test_fold_conv_bn_matches_formula_and_eval_output(conv_bias, affine):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=conv_bias).eval()
    bn = randomize_bn(nn.BatchNorm2d(4, affine=affine, eps=1e-3), 1)
    w_before = conv.weight.detach().clone()
    new = fold_conv_bn(conv, bn)
    # the obvious reference, channel by channel
    for c in range(4):
        gamma = bn.weight[c] if affine else 1.0
        beta = bn.bias[c] if affine else 0.0
        k = gamma / torch.sqrt(bn.running_var[c] + 1e-3)
        b = conv.bias[c] if conv_bias else 0.0
        assert torch.allclose(new.weight[c], conv.weight[c] * k, atol=1e-6)
        assert torch.allclose(new.bias[c], beta + (b - bn.running_mean[c]) * k, atol=1e-6)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(new(x), bn(conv(x)), atol=1e-5)
    assert torch.equal(conv.weight, w_before) and new is not conv  # pure


def test_fold_conv_bn_refuses_batch_stats_only_and_shape_mismatch():
    conv = nn.Conv2d(2, 4, 1)
    with pytest.raises(UnsupportedError, match="running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(UnsupportedError, match="3 features.*4 outputs"):
        fold_conv_bn(conv, nn.BatchNorm2d(3))


class Residual(nn.Module):
    """conv_a -> bn_a feeds conv_b -> bn_b, whose conv output is also added back: only (a) folds."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.conv_a(x)))
        y = self.conv_b(h)
        return self.bn_b(y) + y


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = self.body(x)
        return x


def test_fold_batchnorm_traced_respects_other_users():
    torch.manual_seed(0)
    model = Residual()
    randomize_bn(model.bn_a, 1), randomize_bn(model.bn_b, 2)
    model.eval()
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model) == ["conv_a+bn_a"]
        assert isinstance(model.bn_a, nn.Identity) and isinstance(model.bn_b, nn.BatchNorm2d)
        assert model.conv_a.bias is not None
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_fold_batchnorm_falls_back_to_sequential_pairs():
    torch.manual_seed(0)
    model = Untraceable()
    randomize_bn(model.body[1], 3)
    model.eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model) == ["body.0+body.1"]
        assert isinstance(model.body[1], nn.Identity)
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_fold_batchnorm_digits_cnn_keeps_predictions():
    from slimkit.zoo.digits import load_digits_split, load_pretrained

    model = load_pretrained()
    x, _ = load_digits_split("calibration")
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model)
        assert folded == ["features.0+features.1", "features.4+features.5", "features.8+features.9"]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert isinstance(model.features[1], FoldedBatchNorm) and model.features[1].num_features == 32
        assert torch.allclose(model(x), ref, atol=1e-4)


def test_fold_batchnorm_nan_statistics_name_the_pair_and_change_nothing():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).eval()
    model[3].running_var[0] = float("nan")
    with pytest.raises(DataError, match=r"'3'.*'2'"):
        fold_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.BatchNorm2d)
