"""The shipped QAT recipe end to end on digits-cnn: prepare, label-free training, convert, save, reload."""

from __future__ import annotations

import re

import torch
from torch import nn

import slimkit as sk
from slimkit.quantization.modules import QuantConv2d, QuantLinear
from slimkit.quantization.qat import QAT, QATTrain, qat_layers
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe, resolve_recipe
from slimkit.zoo.digits import accuracy, load_digits_split, load_pretrained

torch.set_num_threads(1)


def test_recipe_parses_and_round_trips():
    r = resolve_recipe("qat-int4-digits")
    assert r.model == "digits-cnn" and r.calibration.source == "digits"
    prepare, train, convert = r.steps
    assert isinstance(prepare, QAT) and prepare.step == "prepare" and type(prepare.base).__name__ == "StaticQuant"
    assert isinstance(train, QATTrain) and isinstance(convert, QAT) and convert.step == "convert"
    assert convert.base == prepare.base and prepare.base.bits == 4
    assert Recipe.from_yaml_text(r.to_yaml()) == r


def test_recipe_end_to_end_quantizes_to_int4_and_keeps_accuracy(tmp_path):
    x_test, y_test = load_digits_split("test")
    model = load_pretrained()
    ctx = run_recipe(model, resolve_recipe("qat-int4-digits"))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, QuantConv2d))]
    assert len(convs) == 3 and all(isinstance(m, QuantConv2d) and m.bits == 4 for m in convs)
    assert isinstance(model.classifier, QuantLinear) and model.classifier.bits == 4
    assert all(m.act_mode == "static" for m in convs + [model.classifier])
    assert not qat_layers(model) and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # the training step ran and reduced its distillation loss
    first, last = map(float, re.search(r"KL ([\d.]+) -> ([\d.]+)", ctx.notes[-2]).groups())
    assert last < first
    acc = accuracy(model, x_test, y_test)
    assert acc >= 0.98, acc  # fp32 0.991; 4-bit weights + int8 inputs must stay close
    # the artifact reloads (the folded BatchNorms are recorded) and computes the same logits
    sk.save(model, tmp_path / "qat")
    again = sk.load(tmp_path / "qat")
    with torch.no_grad():
        assert torch.equal(again(x_test), model(x_test))
