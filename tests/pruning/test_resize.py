"""Reloading a structurally pruned model: resize a fresh build to the checkpoint, restore attributes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import slimkit as sk
from slimkit.core.errors import ModelLoadError, UnsupportedError
from slimkit.pruning.graph import DependencyGraph
from slimkit.pruning.group import prune_groups
from slimkit.pruning.resize import record_attributes, resize_to_checkpoint, structure_of
from slimkit.zoo import build_zoo_architecture
from slimkit.zoo.digits import DigitsCNN, load_pretrained
from tests.pruning.test_graph import Inception, ResNetish, Separable, randomized

torch.set_num_threads(1)


def save_and_rebuild(model: nn.Module, fresh: nn.Module, tmp_path) -> nn.Module:
    """What a checkpoint reload does: state dict + structure out, header shapes in, resize, strict load."""
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (tmp_path / "structure.json").write_text(json.dumps(structure_of(model)))
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    resize_to_checkpoint(fresh, shapes, json.loads((tmp_path / "structure.json").read_text()))
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def prune_half(model: nn.Module, x: torch.Tensor) -> nn.Module:
    groups = DependencyGraph(model, x).groups
    prune_groups(groups, [torch.arange(0, g.units, 2) for g in groups])  # every other unit
    return model


@pytest.mark.parametrize("cls,shape", [(ResNetish, (2, 3, 8, 8)), (Inception, (2, 3, 6, 6)),
                                       (Separable, (2, 3, 6, 6))])
def test_a_fresh_build_resized_to_the_checkpoint_computes_the_same(cls, shape, tmp_path):
    x = torch.randn(shape)
    model = prune_half(randomized(cls()), x)
    fresh = cls()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(model.state_dict())  # the dense build no longer fits
    again = save_and_rebuild(model, fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_resize_returns_what_it_changed_and_keeps_layer_settings(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    model = prune_half(randomized(Separable()), x)
    fresh = Separable().double()
    changed = resize_to_checkpoint(fresh, {k: v.shape for k, v in model.state_dict().items()})
    assert changed == ["body.0", "body.1", "body.3", "body.4", "body.6", "body.7", "fc"]
    dw = fresh.body[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 6 and dw.padding == (1, 1)
    assert dw.weight.dtype == torch.float64 and dw.bias is None
    assert fresh.body[1].eps == model.body[1].eps and fresh.body[1].num_features == 6


def test_digits_cnn_rebuilds_from_its_updated_arch_config(tmp_path):
    model = load_pretrained()
    sk.prune_(model, sk.StructuredPrune(ratio=0.3))
    assert model.arch_config()["channels"] == [22, 44, 89]
    rebuilt = build_zoo_architecture("digits-cnn", model.arch_config())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)
    # and the generic path works on the dense zoo build too
    again = save_and_rebuild(model, DigitsCNN(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_recorded_attributes_are_json_and_set_on_rebuild(tmp_path):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.num_heads = 4
            self.head_dim = 2

        def forward(self, x):
            return self.proj(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = Heads()

        def forward(self, x):
            return self.att(x)

    model = Net()
    record_attributes(model, "att", {"num_heads": 2})
    record_attributes(model, "att", {"head_dim": 4})
    with pytest.raises(UnsupportedError, match="not a structural size"):  # only head counts and sizes are recorded
        record_attributes(model, "", {"tag": [1, 2]})
    assert structure_of(model) == {"att": {"num_heads": 2, "head_dim": 4}}
    structure_of(model)["att"]["num_heads"] = 99  # a copy
    assert structure_of(model)["att"]["num_heads"] == 2
    with pytest.raises(UnsupportedError, match="'att'.*JSON"):
        record_attributes(model, "att", {"module": nn.ReLU()})
    again = save_and_rebuild(model, Net(), tmp_path)
    assert again.att.num_heads == 2 and again.att.head_dim == 4
    assert structure_of(again) == structure_of(model)  # kept for the next save


def test_unresizable_layers_and_missing_modules_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn = nn.GroupNorm(2, 4)

    with pytest.raises(ModelLoadError, match="'gn' \\(GroupNorm\\)"):
        resize_to_checkpoint(Odd(), {"gn.weight": (2,), "gn.bias": (2,)})
    with pytest.raises(ModelLoadError, match="'nowhere'"):
        resize_to_checkpoint(Odd(), {}, {"nowhere": {"x": 1}})
    # names the checkpoint does not have are left for the strict load to report
    assert resize_to_checkpoint(Odd(), {"other.weight": (3,)}) == []
