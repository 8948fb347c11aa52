"""Group / slice_module: slicing a layer equals computing the full layer and dropping channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.errors import UnsupportedError
from slimkit.pruning.group import IN, OUT, Group, slice_module, unit_weights

KEEP = torch.tensor([0, 2, 5])


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p)
    return module.eval()


def test_linear_out_and_in_slices_match_dense_rows_and_columns():
    lin = _seeded(nn.Linear(6, 7))
    x = torch.randn(4, 6)
    full = lin(x)
    out = _seeded(nn.Linear(6, 7))
    slice_module(out, OUT, KEEP)
    assert out.out_features == 3 and out.weight.shape == (3, 6) and out.bias.shape == (3,)
    torch.testing.assert_close(out(x), full[:, KEEP])
    inp = _seeded(nn.Linear(6, 7))
    slice_module(inp, IN, KEEP)
    assert inp.in_features == 3
    # Dropping input columns equals feeding zeros in the dropped positions.
    x_zeroed = torch.zeros_like(x)
    x_zeroed[:, KEEP] = x[:, KEEP]
    torch.testing.assert_close(inp(x[:, KEEP]), lin(x_zeroed))


def test_conv_batchnorm_and_depthwise_slices():
    conv = _seeded(nn.Conv2d(3, 6, 3, padding=1))
    x = torch.randn(2, 3, 5, 5)
    full = conv(x)
    slice_module(conv, OUT, KEEP)
    assert conv.out_channels == 3
    torch.testing.assert_close(conv(x), full[:, KEEP])

    bn = _seeded(nn.BatchNorm2d(6))
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    y = torch.randn(2, 6, 4, 4)
    full_bn = bn(y)
    slice_module(bn, OUT, KEEP)
    assert bn.num_features == 3 and bn.running_mean.shape == (3,)
    assert "running_mean" in dict(bn.named_buffers())  # still a buffer, so it is saved
    torch.testing.assert_close(bn(y[:, KEEP]), full_bn[:, KEEP])

    dw = _seeded(nn.Conv2d(6, 6, 3, padding=1, groups=6))
    full_dw = dw(y)
    slice_module(dw, IN, KEEP)  # depthwise: either side removes the channel's own kernel
    assert dw.groups == dw.in_channels == dw.out_channels == 3
    torch.testing.assert_close(dw(y[:, KEEP]), full_dw[:, KEEP])


def test_grouped_conv_and_unknown_modules_are_refused_by_name():
    with pytest.raises(UnsupportedError, match="grouped convolution"):
        slice_module(nn.Conv2d(4, 8, 3, groups=2), OUT, KEEP, "features.3")
    with pytest.raises(UnsupportedError, match="features.9"):
        slice_module(nn.MultiheadAttention(8, 2), OUT, KEEP, "features.9")


def test_group_prune_keeps_the_chain_consistent_and_renumbers():
    conv1, bn, conv2 = _seeded(nn.Conv2d(1, 6, 3, padding=1)), _seeded(nn.BatchNorm2d(6)), _seeded(nn.Conv2d(6, 2, 3))
    net = nn.Sequential(conv1, bn, nn.ReLU(), conv2).eval()
    x = torch.randn(2, 1, 6, 6)
    removed = torch.tensor([1, 3, 4])
    with torch.no_grad():
        reference = nn.Sequential(*[m for m in net]).eval()
        w = conv2.weight.clone()
        conv2.weight[:, removed] = 0  # the dropped filters' contribution removed by hand
        expected = reference(x)
        conv2.weight.copy_(w)
    group = Group("0", 6, "filter")
    units = torch.arange(6)
    group.add("0", conv1, OUT, units, "filters")
    group.add("1", bn, OUT, units)
    group.add("3", conv2, IN, units)
    text = group.details(removed)
    assert "removes 3 channel(s)" in text and "group '0': 6 filter(s)" in text
    calls = []
    group.on_prune.append(calls.append)
    group.prune(KEEP)
    torch.testing.assert_close(net(x), expected)
    assert group.units == 3 and calls and torch.equal(calls[0], KEEP)
    assert torch.equal(group.members[0].index.reshape(-1), torch.arange(3))
    with pytest.raises(UnsupportedError, match="every filter"):
        group.prune(torch.tensor([], dtype=torch.long))


def test_multi_channel_units_and_unit_weights_layout():
    lin_out, lin_in = _seeded(nn.Linear(4, 6)), _seeded(nn.Linear(6, 3))
    heads = torch.arange(6).reshape(3, 2)  # 3 "heads" of 2 channels
    group = Group("attn", 3, "head")
    group.add("q", lin_out, OUT, heads)
    group.add("o", lin_in, IN, heads)
    rows, cols = unit_weights(group.members[0]), unit_weights(group.members[1])
    assert rows.shape == (3, 8) and cols.shape == (3, 6)
    torch.testing.assert_close(rows[1], lin_out.weight[2:4].reshape(-1))
    torch.testing.assert_close(cols[2], lin_in.weight[:, 4:6].t().reshape(-1))
    group.prune(torch.tensor([2, 0]))
    assert lin_out.out_features == 4 and lin_in.in_features == 4
    assert torch.equal(group.members[0].index, torch.tensor([[0, 1], [2, 3]]))
