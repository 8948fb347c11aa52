"""The dependency graph: coupled channels of CNNs and MLPs, and where it stops.

Each architecture is pruned by 30-50% in every group and compared with the unpruned
model whose removed channels were zeroed at their producers (filter, bias, BN shift and
mean): both must compute the same output, and the parameter count must match a hand count.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.core.errors import UnsupportedError
from slimkit.pruning.graph import DependencyGraph, build_groups
from slimkit.pruning.group import IN, OUT, prune_groups
from slimkit.zoo.digits import load_pretrained

torch.set_num_threads(1)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, stride=stride)
        self.conv2, self.bn2 = conv_bn(cout, cout)
        self.downsample = nn.Sequential(*conv_bn(cin, cout, k=1, stride=stride)) if (cin != cout or stride > 1) \
            else None

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + short)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.b1 = nn.Sequential(*conv_bn(8, 4, k=1), nn.ReLU())
        self.b2 = nn.Sequential(*conv_bn(8, 6), nn.ReLU())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *conv_bn(8, 10, k=1), nn.ReLU())
        self.merge = nn.Sequential(*conv_bn(20, 12), nn.ReLU())
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        return self.fc(self.merge(x).mean((2, 3)))


class Separable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(3, 12), nn.ReLU6(),
            *conv_bn(12, 12, groups=12), nn.ReLU6(),  # depthwise
            *conv_bn(12, 16, k=1), nn.ReLU6(),  # pointwise
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x))


class ConvFlat(nn.Module):
    """conv -> pool -> flatten (3x3 positions per filter) -> Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.view(x.size(0), -1))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 32), nn.Linear(32, 24), nn.Linear(24, 5)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.fc3(self.drop(nn.functional.gelu(self.fc2(torch.relu(self.fc1(x))))))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """The model with random weights and BN statistics (so every channel matters), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@torch.no_grad()
def zero_units(groups, removed) -> None:
    """Make the removed units' activations exactly zero where they are produced."""
    for g, units in zip(groups, removed):
        for m in g.members:
            if m.dim != OUT:
                continue
            ch = m.channels(units)
            mod = m.module
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight[ch] = 0
                if mod.bias is not None:
                    mod.bias[ch] = 0
            elif isinstance(mod, nn.BatchNorm2d):
                mod.bias[ch] = 0
                mod.running_mean[ch] = 0


def prune_and_compare(model: nn.Module, x: torch.Tensor, fraction: float = 0.4, seed: int = 0):
    """Prune ``fraction`` of every group at random; check against the zeroed reference; return both graphs' data."""
    reference = copy.deepcopy(model)
    graph = DependencyGraph(model, x)
    ref_groups = DependencyGraph(reference, x).groups
    assert [g.root for g in graph.groups] == [g.root for g in ref_groups]
    gen = torch.Generator().manual_seed(seed)
    keeps, removed = [], []
    for g in graph.groups:
        perm = torch.randperm(g.units, generator=gen)
        n = max(1, round(fraction * g.units))
        removed.append(perm[:n])
        keeps.append(perm[n:])
    zero_units(ref_groups, removed)
    with torch.no_grad():
        expected = reference(x)
    dense_out = copy.deepcopy(model)(x).shape
    prune_groups(graph.groups, keeps)
    with torch.no_grad():
        got = model(x)
    assert got.shape == dense_out
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return graph, {g.root: g.units for g in graph.groups}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def member(group, name, dim):
    found = [m for m in group.members if m.name == name and m.dim == dim]
    assert len(found) == 1, f"{name} dim {dim} not in {group.details()}"
    return found[0]


def test_digits_cnn_chains_conv_bn_conv_and_stops_at_the_classifier():
    model = load_pretrained()
    graph = DependencyGraph(model, torch.rand(2, 1, 8, 8))
    assert [g.root for g in graph.groups] == ["features.0", "features.4", "features.8"]
    g0 = graph.groups[0]
    assert [(m.name, m.dim) for m in g0.members] == [("features.0", OUT), ("features.1", OUT), ("features.4", IN)]
    last = graph.groups[2]
    assert member(last, "classifier", IN).index.shape == (128, 1)  # global pool: one column per filter
    assert ("classifier", "its output reaches the model's output") in graph.boundaries
    assert [r for r, _ in graph.dropped] == ["classifier"]
    assert "features.8" in graph.explain() and "classifier" in graph.explain()

    _, widths = prune_and_compare(model, torch.rand(4, 1, 8, 8), fraction=0.5)
    c0, c1, c2 = widths["features.0"], widths["features.4"], widths["features.8"]
    assert (c0, c1, c2) == (16, 32, 64)
    hand = (9 * c0 + 2 * c0) + (9 * c0 * c1 + 2 * c1) + (9 * c1 * c2 + 2 * c2) + (c2 * 10 + 10)
    assert n_params(model) == hand


def test_residual_blocks_share_one_group_with_the_downsample_branch():
    model = randomized(ResNetish())
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    roots = [g.root for g in graph.groups]
    assert roots == ["stem.0", "layer1.conv1", "layer2.conv1", "layer2.conv2"]
    stem = graph.groups[0]
    # the stem's channels run through layer1's identity shortcut: layer1.conv2 produces the same channels
    names = {(m.name, m.dim) for m in stem.members}
    assert {("stem.0", OUT), ("stem.1", OUT), ("layer1.conv1", IN), ("layer1.conv2", OUT), ("layer1.bn2", OUT),
            ("layer2.conv1", IN), ("layer2.downsample.0", IN)} == names
    assert "residual" in " ".join(stem.notes)
    wide = graph.groups[3]
    assert {("layer2.conv2", OUT), ("layer2.bn2", OUT), ("layer2.downsample.0", OUT), ("layer2.downsample.1", OUT),
            ("fc", IN)} == {(m.name, m.dim) for m in wide.members}

    _, w = prune_and_compare(model, x, fraction=0.4)
    s, a, b, c = w["stem.0"], w["layer1.conv1"], w["layer2.conv1"], w["layer2.conv2"]
    hand = (27 * s + 2 * s) + (9 * s * a + 2 * a) + (9 * a * s + 2 * s) + (9 * s * b + 2 * b) + (9 * b * c + 2 * c) \
        + (s * c + 2 * c) + (c * 5 + 5)
    assert n_params(model) == hand


def test_concat_branches_own_their_offset_slices_of_the_next_conv():
    model = randomized(Inception())
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    by_root = {g.root: g for g in graph.groups}
    assert set(by_root) == {"stem.0", "b1.0", "b2.0", "b3.1", "merge.0"}
    torch.testing.assert_close(member(by_root["b1.0"], "merge.0", IN).index.reshape(-1), torch.arange(0, 4))
    torch.testing.assert_close(member(by_root["b2.0"], "merge.0", IN).index.reshape(-1), torch.arange(4, 10))
    torch.testing.assert_close(member(by_root["b3.1"], "merge.0", IN).index.reshape(-1), torch.arange(10, 20))
    stem_inputs = {m.name for m in by_root["stem.0"].members if m.dim == IN}
    assert stem_inputs == {"b1.0", "b2.0", "b3.1"}  # the pool in front of b3 keeps channels

    _, w = prune_and_compare(model, x, fraction=0.5)
    s, b1, b2, b3, mg = (w[k] for k in ("stem.0", "b1.0", "b2.0", "b3.1", "merge.0"))
    hand = (27 * s + 2 * s) + (s * b1 + 2 * b1) + (9 * s * b2 + 2 * b2) + (s * b3 + 2 * b3) \
        + (9 * (b1 + b2 + b3) * mg + 2 * mg) + (mg * 3 + 3)
    assert n_params(model) == hand


def test_pruning_one_concat_branch_renumbers_the_others_slices():
    model = randomized(Inception())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    groups = DependencyGraph(model, x).groups
    ref_groups = DependencyGraph(reference, x).groups
    by_root = {g.root: i for i, g in enumerate(groups)}
    b2, b3 = by_root["b2.0"], by_root["b3.1"]
    # prune branch 2 alone: branch 3's slice of the merge conv moves down by the two removed channels
    prune_groups(groups, [torch.tensor([0, 2, 3, 5]) if i == b2 else torch.arange(g.units)
                          for i, g in enumerate(groups)])
    torch.testing.assert_close(member(groups[b3], "merge.0", IN).index.reshape(-1), torch.arange(8, 18))
    # then branch 3, in a second call on the same groups
    prune_groups(groups, [torch.arange(0, 10, 3) if i == b3 else torch.arange(g.units) for i, g in enumerate(groups)])
    assert model.merge[0].in_channels == 4 + 4 + 4
    zero_units([ref_groups[b2], ref_groups[b3]], [torch.tensor([1, 4]), torch.tensor([1, 2, 4, 5, 7, 8])])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_depthwise_conv_passes_channels_through():
    model = randomized(Separable())
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert [g.root for g in graph.groups] == ["body.0", "body.6"]
    first = graph.groups[0]
    assert [(m.name, m.dim) for m in first.members] == [
        ("body.0", OUT), ("body.1", OUT), ("body.3", OUT), ("body.4", OUT), ("body.6", IN)]
    assert member(first, "body.3", OUT).role.startswith("depthwise")

    _, w = prune_and_compare(model, x, fraction=0.5)
    a, b = w["body.0"], w["body.6"]
    assert model.body[3].groups == model.body[3].in_channels == model.body[3].out_channels == a
    hand = (27 * a + 2 * a) + (9 * a + 2 * a) + (a * b + 2 * b) + (b * 4 + 4)
    assert n_params(model) == hand


def test_flatten_into_linear_gives_each_filter_its_spatial_columns():
    model = randomized(ConvFlat())
    x = torch.randn(3, 1, 6, 6)
    graph = DependencyGraph(model, x)
    conv = graph.groups[0]
    assert conv.root == "conv"
    cols = member(conv, "fc1", IN)
    assert cols.index.shape == (8, 9)
    torch.testing.assert_close(cols.index[3], torch.arange(27, 36))  # filter 3 owns columns 27..35
    assert "9 per filter" in cols.role

    _, w = prune_and_compare(model, x, fraction=0.4)
    c, h = w["conv"], w["fc1"]
    assert model.fc1.in_features == 9 * c
    assert n_params(model) == (9 * c + c) + (9 * c * h + h) + (h * 10 + 10)


def test_mlp_neurons_chain_and_the_last_layer_is_kept():
    model = randomized(MLP())
    x = torch.randn(4, 20)
    graph = DependencyGraph(model, x)
    assert [g.root for g in graph.groups] == ["fc1", "fc2"] and graph.groups[0].unit == "neuron"
    assert [r for r, _ in graph.dropped] == ["fc3"]
    _, w = prune_and_compare(model, x, fraction=0.3)
    a, b = w["fc1"], w["fc2"]
    assert n_params(model) == (20 * a + a) + (a * b + b) + (b * 5 + 5)


class SharedConv(nn.Module):
    """The same conv applied twice: its inputs at both calls and its outputs are one set of channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(torch.relu(self.conv(torch.relu(self.stem(x)))))))


def test_a_module_called_twice_couples_both_calls():
    model = randomized(SharedConv())
    x = torch.randn(2, 3, 5, 5)
    graph = DependencyGraph(model, x)
    assert [g.root for g in graph.groups] == ["stem"]
    assert {(m.name, m.dim) for m in graph.groups[0].members} == {
        ("stem", OUT), ("conv", IN), ("conv", OUT), ("head", IN)}
    prune_and_compare(model, x, fraction=0.5)


# -- where the graph stops ---------------------------------------------------------------------
class Op(nn.Module):
    """conv1 -> <op> -> conv2 -> head, with a second, plain conv path that stays prunable."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.other2 = nn.Conv2d(4, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        if self.op == "view":  # split the channels in two halves and swap them
            y = y.view(-1, 2, 4, 5, 5).flip(1).reshape(-1, 8, 5, 5)
        elif self.op == "matmul":
            y = torch.matmul(y, y)
        elif self.op == "index":
            y = torch.cat([y[:, 4:], y[:, :4]], dim=1)
        elif self.op == "param":
            y = y * self.scale
        return self.conv2(y) + self.other2(torch.relu(self.other(x)))


@pytest.mark.parametrize("op,named", [("view", "Tensor.view"), ("matmul", "torch.matmul"),
                                      ("index", "operator.getitem"), ("param", "untracked tensor")])
def test_an_op_the_graph_does_not_understand_drops_the_producer_and_names_the_op(op, named):
    graph = DependencyGraph(Op(op).eval(), torch.randn(2, 3, 5, 5))
    dropped = dict(graph.dropped)
    assert "conv1" in dropped and named in dropped["conv1"], graph.explain()
    assert [g.root for g in graph.groups] == ["other"]  # the untouched path still prunes


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
            return x * 2
        return x


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.odd = DataDependent()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(self.odd(self.conv1(x)))))


def test_an_untraceable_submodule_becomes_a_named_boundary():
    graph = DependencyGraph(WithUntraceable().eval(), torch.randn(1, 3, 4, 4))
    assert any(name == "odd" and "could not be traced" in why for name, why in graph.boundaries)
    dropped = dict(graph.dropped)
    assert "odd" in dropped["conv1"]
    assert [g.root for g in graph.groups] == ["conv2"]


def test_an_untraceable_top_level_forward_is_a_clear_error():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.mean() > 0 else x

    with pytest.raises(UnsupportedError, match="cannot trace Top.forward"):
        build_groups(Top(), torch.randn(1, 3, 4, 4))


def test_grouped_conv_and_custom_leaf_layers_are_boundaries():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1),
                          nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    graph = DependencyGraph(model, torch.randn(1, 3, 9, 9))
    bounds = dict(graph.boundaries)
    assert "grouped" in bounds["2"] and "GroupNorm" in bounds["4"]
    dropped = dict(graph.dropped)
    assert "grouped" in dropped["0"] or "2 (Conv2d)" in dropped["0"]
    assert "4 (GroupNorm)" in dropped["3"]
    assert graph.groups == []


def test_tied_weights_are_not_pruned():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.c2 = nn.Linear(6, 2)
            self.c2.weight = self.c.weight

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.c(h) + self.c2(h)

    graph = DependencyGraph(Tied(), torch.randn(2, 4))
    assert [g.root for g in graph.groups] == ["a"]
    assert "tied" in dict(graph.dropped)["b"]


def test_bad_example_input_is_a_data_error():
    from slimkit.core.errors import DataError

    with pytest.raises(DataError, match="example input"):
        DependencyGraph(MLP(), torch.randn(2, 7))
    with pytest.raises(DataError, match="example input"):
        DependencyGraph(MLP(), "not a tensor")
