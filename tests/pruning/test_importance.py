"""Importance criteria against hand computations with explicit float64 loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.pruning.graph import build_groups
from slimkit.pruning.group import IN, OUT, Group
from slimkit.pruning.importance import (
    BNScaleImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    make_importance,
)

torch.set_num_threads(1)


def chain(seed: int = 0) -> nn.Sequential:
    """conv(2->5) -> BN -> ReLU -> conv(5->3): one group of 5 filters with three members."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 3, 3))
    with torch.no_grad():
        net[1].weight.normal_()
    return net.eval()


def test_l1_is_the_mean_of_filter_gamma_and_next_layer_column_sums():
    net = chain()
    (group,) = [g for g in build_groups(net, torch.randn(1, 2, 6, 6)) if g.root == "0"]
    got = MagnitudeImportance(p=1)(group)
    conv1, bn, conv2 = (net[i].weight.detach().double() for i in (0, 1, 3))
    for f in range(5):
        filt = sum(abs(float(conv1[f, c, i, j])) for c in range(2) for i in range(3) for j in range(3))
        gamma = abs(float(bn[f]))
        column = sum(abs(float(conv2[o, f, i, j])) for o in range(3) for i in range(3) for j in range(3))
        assert float(got[f]) == pytest.approx((filt + gamma + column) / 3, rel=1e-12)


def test_l2_sums_squares_like_torch_pruning():
    net = chain(1)
    (group,) = [g for g in build_groups(net, torch.randn(1, 2, 6, 6)) if g.root == "0"]
    got = MagnitudeImportance(p=2)(group)
    w1, g, w2 = net[0].weight.double(), net[1].weight.double(), net[3].weight.double()
    want = ((w1 ** 2).sum((1, 2, 3)) + g ** 2 + (w2 ** 2).sum((0, 2, 3))) / 3
    torch.testing.assert_close(got, want)


def test_flattened_columns_add_up_per_filter():
    torch.manual_seed(2)
    conv, fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 2 * 2, 3)
    net = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc, nn.ReLU(), nn.Linear(3, 2))
    (group,) = [g for g in build_groups(net, torch.randn(2, 1, 4, 4)) if g.root == "0"]
    got = MagnitudeImportance(p=1)(group)
    for f in range(4):
        filt = float(conv.weight[f].detach().double().abs().sum())
        cols = sum(abs(float(fc.weight.detach()[o, f * 4 + k])) for o in range(3) for k in range(4))
        assert float(got[f]) == pytest.approx((filt + cols) / 2, rel=1e-9)


def test_bn_scale_is_the_mean_gamma_of_every_batchnorm_in_the_group():
    torch.manual_seed(3)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            x = self.bn_a(self.a(x))
            return self.head(torch.relu(x + self.bn_b(self.b(x))))

    model = Res().eval()
    with torch.no_grad():
        model.bn_a.weight.normal_()
        model.bn_b.weight.normal_()
    (group,) = build_groups(model, torch.randn(1, 3, 3, 3))
    assert {m.name for m in group.members} >= {"bn_a", "bn_b"}
    got = BNScaleImportance()(group)
    torch.testing.assert_close(got, (model.bn_a.weight.abs() + model.bn_b.weight.abs()).double() / 2)


def test_bn_scale_without_batchnorm_is_refused_naming_the_group():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    (group,) = build_groups(net, torch.randn(2, 3))
    with pytest.raises(UnsupportedError, match="group '0' has none"):
        BNScaleImportance()(group)


def test_taylor_equals_an_explicit_weight_times_gradient_sum():
    net = chain(4)
    x, y = torch.randn(4, 2, 6, 6), torch.randn(4, 3, 4, 4)
    nn.functional.mse_loss(net(x), y).backward()
    (group,) = [g for g in build_groups(net, torch.randn(1, 2, 6, 6)) if g.root == "0"]
    got = TaylorImportance()(group)
    terms = []
    for w, dim in ((net[0].weight, 0), (net[1].weight, 0), (net[3].weight, 1)):
        prod = (w * w.grad).detach().double().abs()
        # (a 1-D BN weight is already per unit: sum(dim=()) would reduce everything)
        terms.append(prod.transpose(0, dim).reshape(prod.shape[dim], -1).sum(1))
    torch.testing.assert_close(got, sum(terms) / 3)


def test_taylor_without_gradients_names_the_layer():
    net = chain()
    (group,) = [g for g in build_groups(net, torch.randn(1, 2, 6, 6)) if g.root == "0"]
    with pytest.raises(UnsupportedError, match=r"0\.weight has no \.grad"):
        TaylorImportance()(group)


def test_random_is_seeded():
    group = Group(root="x", units=7)
    a, b, c = RandomImportance(1)(group), RandomImportance(1)(group), RandomImportance(2)(group)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (7,)


def test_make_importance_names_and_rejects_unknown_ones():
    assert isinstance(make_importance("l1"), MagnitudeImportance) and make_importance("l2").p == 2
    assert make_importance("taylor").needs_gradients and not make_importance("l1").needs_gradients
    assert isinstance(make_importance("bn_scale"), BNScaleImportance)
    assert isinstance(make_importance("random"), RandomImportance)
    with pytest.raises(ConfigError, match="did you mean 'l1'"):
        make_importance("l11")


@settings(max_examples=15, deadline=None)
@given(out_f=st.integers(1, 6), in_f=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_l1_of_multi_channel_units_matches_a_loop(out_f, in_f, k, seed):
    """Units owning k consecutive rows of one Linear and k columns of the next: the loop sum, averaged."""
    g = torch.Generator().manual_seed(seed)
    first, second = nn.Linear(in_f, out_f * k), nn.Linear(out_f * k, 2)
    with torch.no_grad():
        first.weight.copy_(torch.randn(first.weight.shape, generator=g))
        second.weight.copy_(torch.randn(second.weight.shape, generator=g))
    group = Group(root="first", units=out_f, unit="neuron")
    index = torch.arange(out_f * k).reshape(out_f, k)
    group.add("first", first, OUT, index)
    group.add("second", second, IN, index)
    got = MagnitudeImportance(p=1)(group)
    for u in range(out_f):
        rows = sum(abs(float(first.weight.detach()[r, c])) for r in range(u * k, (u + 1) * k) for c in range(in_f))
        cols = sum(abs(float(second.weight.detach()[o, r])) for o in range(2) for r in range(u * k, (u + 1) * k))
        assert float(got[u]) == pytest.approx((rows + cols) / 2, rel=1e-9, abs=1e-12)
