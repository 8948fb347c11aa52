"""Pruning masks as parametrizations: they survive training, strip bakes them in, save writes plain weights."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import slimkit as sk
from slimkit.core.errors import DataError
from slimkit.core.measure import layer_sparsity
from slimkit.core.masks import (
    WeightMask,
    apply_mask,
    attach_masks_from_zeros,
    get_mask,
    masked_modules,
    masked_state_dict,
    raw_weight,
    sparsity_report,
    strip,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))


def _random_mask(shape, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) >= p


def test_apply_mask_zeroes_weight_and_original():
    layer = nn.Linear(8, 4)
    mask = _random_mask(layer.weight.shape)
    original = layer.weight
    apply_mask(layer, mask)
    assert parametrize.is_parametrized(layer, "weight")
    assert torch.equal(get_mask(layer), mask)
    assert torch.equal(layer.weight != 0, mask & (original.detach() != 0))
    assert raw_weight(layer) is original  # the same Parameter: an optimizer holding it stays valid
    assert (raw_weight(layer).detach()[~mask] == 0).all()


def test_apply_mask_combines_or_replaces():
    layer = nn.Linear(8, 4)
    a, b = _random_mask((4, 8), 1), _random_mask((4, 8), 2)
    apply_mask(layer, a)
    apply_mask(layer, b)
    assert torch.equal(get_mask(layer), a & b)
    assert len(layer.parametrizations.weight) == 1  # combined into the one mask, not stacked
    apply_mask(layer, b, combine=False)
    assert torch.equal(get_mask(layer), b)


def test_apply_mask_wrong_shape():
    with pytest.raises(DataError, match=r"mask of shape \(3, 3\) does not match Linear.weight of shape \(4, 8\)"):
        apply_mask(nn.Linear(8, 4), torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
])
def test_masks_survive_optimizer_steps(make_opt):
    model = _mlp()
    masks = {name: _random_mask(m.weight.shape, i) for i, (name, m) in enumerate(
        [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)])}
    for name, mask in masks.items():
        apply_mask(model.get_submodule(name), mask)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    opt = make_opt(model.parameters())
    x, y = torch.randn(32, 12), torch.randn(32, 6)
    for _ in range(5):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for name, mask in masks.items():  # gradients reach only kept weights
            grad = model.get_submodule(name).parametrizations.weight.original.grad
            assert (grad[~mask] == 0).all()
        opt.step()
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert (module.weight.detach()[~mask] == 0).all()
        assert (raw_weight(module).detach()[~mask] == 0).all()  # decay and momentum did not move them
        assert not torch.equal(module.weight.detach()[mask], before[name][mask])  # kept weights trained


def test_strip_leaves_plain_parameters_with_zeros():
    model = _mlp()
    mask = _random_mask((16, 12))
    apply_mask(model[0], mask)
    original = raw_weight(model[0])
    x = torch.randn(5, 12)
    out = model(x)
    assert masked_modules(model) == [("0", model[0])]
    assert strip(model) is model
    assert not parametrize.is_parametrized(model[0])
    assert type(model[0]) is nn.Linear
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight is original
    assert torch.equal(model[0].weight != 0, mask & (model[0].weight != 0))
    assert (model[0].weight.detach()[~mask] == 0).all()
    assert torch.equal(model(x), out)
    assert masked_modules(model) == []


def test_strip_of_a_deepcopy_leaves_the_original_masked():
    # deepcopy shares the Parametrized class; stripping one copy must not break the other.
    model = _mlp()
    apply_mask(model[0], _random_mask((16, 12)))
    twin = copy.deepcopy(model)
    x = torch.randn(3, 12)
    strip(twin)
    assert torch.equal(model(x), twin(x))
    assert get_mask(model[0]) is not None


def test_attach_masks_from_zeros():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[:, :6] = 0
    assert attach_masks_from_zeros(model) == ["0"]  # model[2] has no zero: left alone
    assert torch.equal(get_mask(model[0]), model[0].weight != 0)
    assert get_mask(model[2]) is None
    assert attach_masks_from_zeros(_mlp(), ignore=["0", "2"]) == []


def test_sparsity_report_counts():
    model = _mlp()
    apply_mask(model[0], _random_mask((16, 12), 3))
    with torch.no_grad():
        model[2].weight[0] = 0
    report = sparsity_report(model)
    assert [r.name for r in report.layers] == ["0", "2"]
    for row in report.layers:
        w = model.get_submodule(row.name).weight
        assert row.shape == tuple(w.shape)
        assert row.total == w.numel()
        assert row.zeros == int((w == 0).sum())
        assert row.sparsity == pytest.approx(layer_sparsity(model)[row.name])
    assert report.overall == report.zeros / report.total == (report["0"].zeros + report["2"].zeros) / (192 + 96)
    text = report.to_markdown()
    assert "| 0 | 16×12 |" in text and "**overall**" in text and str(report) == text
    assert report.to_dict()["layers"][1]["zeros"] == 16


def test_masked_state_dict_plain_names_and_model_untouched():
    model = _mlp()
    mask = _random_mask((16, 12))
    apply_mask(model[0], mask)
    state = masked_state_dict(model)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(state["0.weight"], model[0].weight.detach())
    assert isinstance(model[0].parametrizations.weight[0], WeightMask)  # masks still on
    fresh = _mlp(1)
    fresh.load_state_dict(state, strict=True)


def test_save_masked_model_reload_equal(tmp_path):
    model = _mlp()
    sk.prune_(model, sk.Magnitude(sparsity=0.5))
    x = torch.randn(4, 12)
    out = model(x)
    sk.save(model, tmp_path / "ck")
    assert len(masked_modules(model)) == 2  # saving kept the masks on the model
    reloaded = sk.load(tmp_path / "ck", skeleton=_mlp(1))
    assert masked_modules(reloaded) == []
    assert torch.equal(reloaded(x), out)
    assert torch.equal(reloaded[0].weight, model[0].weight.detach())
    assert sparsity_report(reloaded).overall == pytest.approx(0.5, abs=0.01)
    # A masked skeleton loads too: its masks are stripped, the file's zeros come in.
    masked_skeleton = _mlp(2)
    apply_mask(masked_skeleton[0], torch.ones(16, 12, dtype=torch.bool))
    assert torch.equal(sk.load(tmp_path / "ck", skeleton=masked_skeleton)(x), out)


def test_quantizing_a_masked_model_bakes_the_masks_in_first_and_says_so():
    import slimkit as sk
    from slimkit.core.registry import Context

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    sk.prune_(model, sk.Magnitude(sparsity=0.5))
    assert masked_modules(model)
    ctx = Context()
    sk.quantize_(model, sk.RTN(bits=8), ctx=ctx)  # no manual strip needed any more
    assert any("baked the pruning masks of 2 layer(s)" in n for n in ctx.notes)
    assert not masked_modules(model)
    assert type(model[0]).__name__ == "QuantLinear"
    assert float((model[0].dense_weight() == 0).float().mean()) >= 0.5
