"""The shipped structured-pruning recipe for digits-cnn: half the MACs, accuracy kept, checkpoint reloads."""

from __future__ import annotations

import torch
from torch import nn

import slimkit as sk
from slimkit.core.measure import count_macs
from slimkit.pruning.structured import StructuredPrune
from slimkit.recipe.runner import needs_data, run_recipe
from slimkit.recipe.schema import Recipe, resolve_recipe
from slimkit.zoo.digits import load_digits_split, load_pretrained

torch.set_num_threads(1)


def test_recipe_parses_and_round_trips():
    r = resolve_recipe("structured-l1-digits")
    (step,) = r.steps
    assert isinstance(step, StructuredPrune) and step.importance == "l1" and step.ratio == 0.3
    assert step.recalibrate_bn and needs_data(r) and r.calibration.source == "digits"
    assert Recipe.from_yaml_text(r.to_yaml()) == r


def test_recipe_halves_the_macs_keeps_accuracy_and_reloads(tmp_path):
    x_test, _ = load_digits_split("test")
    dense = load_pretrained()
    model = load_pretrained()
    ctx = run_recipe(model, resolve_recipe("structured-l1-digits"))
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [22, 44, 89]
    assert "re-estimated" in ctx.notes[0]
    macs, dense_macs = count_macs(model, x_test[:1]), count_macs(dense, x_test[:1])
    assert macs <= 0.5 * dense_macs, (macs, dense_macs)  # 293,930 vs 609,536
    report = sk.evaluate(model, baseline=dense, metrics=("params", "flops", "accuracy"))
    acc, base_acc = report.compressed.quality["accuracy"], report.baseline.quality["accuracy"]
    assert report.compressed.flops <= 0.5 * report.baseline.flops
    assert report.compressed.params_total < 0.5 * report.baseline.params_total
    assert acc >= 0.95 and base_acc - acc < 0.04, (acc, base_acc)  # measured 0.970 vs 0.991, no fine-tuning
    # the zoo checkpoint records the pruned channel list, so sk.load rebuilds it
    sk.save(model, tmp_path / "pruned")
    again = sk.load(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(again(x_test), model(x_test))
