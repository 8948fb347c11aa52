"""Sparsity schedules and the GradualPruner training-loop callback."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.errors import ConfigError
from slimkit.core.masks import get_mask, masked_modules
from slimkit.pruning.schedules import (
    Gradual,
    GradualPruner,
    Iterative,
    iterative_sparsity,
    polynomial_sparsity,
)


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """The paper's formula at a pruning step t = t0 + j*dt (0 <= j <= n)."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def test_polynomial_matches_the_paper_on_pruning_steps():
    for j in range(11):
        t = 100 + j * 50
        assert polynomial_sparsity(t, 0.1, 0.9, 100, 600, 50) == pytest.approx(zhu_gupta(t, 0.1, 0.9, 100, 10, 50))


def test_polynomial_is_constant_outside_and_between_pruning_steps():
    args = {"initial": 0.0, "final": 0.8, "begin_step": 10, "end_step": 110, "frequency": 20}
    assert polynomial_sparsity(0, **args) == 0.0 and polynomial_sparsity(9, **args) == 0.0
    assert polynomial_sparsity(110, **args) == 0.8 and polynomial_sparsity(10_000, **args) == 0.8
    assert polynomial_sparsity(10, **args) == 0.0
    # Between pruning steps the value holds: 30..49 all equal the value at 30.
    at30 = polynomial_sparsity(30, **args)
    assert all(polynomial_sparsity(t, **args) == at30 for t in range(30, 50))
    assert polynomial_sparsity(50, **args) > at30
    values = [polynomial_sparsity(t, **args) for t in range(130)]
    assert values == sorted(values)  # monotone
    # end_step off the frequency grid still reaches the final value exactly at end_step.
    assert polynomial_sparsity(104, 0.0, 0.5, 0, 105, 10) < 0.5 == polynomial_sparsity(105, 0.0, 0.5, 0, 105, 10)
    assert polynomial_sparsity(50, 0.0, 0.5, 0, 100, 1, power=1) == pytest.approx(0.25)


@pytest.mark.parametrize("kwargs, match", [
    ({"begin_step": 10, "end_step": 10}, "end_step must be an integer > begin_step"),
    ({"frequency": 0}, "frequency must be an integer >= 1"),
    ({"initial": 0.6, "final": 0.5}, "0 <= initial <= final < 1"),
    ({"final": 1.0}, "0 <= initial <= final < 1"),
    ({"power": 0}, "power must be a positive number"),
])
def test_polynomial_bad_arguments(kwargs, match):
    args = {"step": 5, "initial": 0.0, "final": 0.5, "begin_step": 0, "end_step": 100, "frequency": 10}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        polynomial_sparsity(**args)


def test_iterative_sparsity():
    assert [iterative_sparsity(r, 4, 0.8) for r in range(6)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 0.8])
    geo = [iterative_sparsity(r, 3, 0.875, geometric=True) for r in range(4)]
    assert geo == pytest.approx([0, 0.5, 0.75, 0.875])  # half of the survivors each round


@pytest.mark.parametrize("kwargs, match", [
    ({"begin_step": 100, "end_step": 100}, r"Gradual.end_step: must be an integer > begin_step \(100\)"),
    ({"frequency": 0}, r"Gradual.frequency: must be an integer >= 1"),
    ({"initial_sparsity": 0.6, "final_sparsity": 0.5}, r"Gradual.initial_sparsity: must not exceed final_sparsity"),
    ({"final_sparsity": 1.0}, r"Gradual.final_sparsity: must be a number in \[0, 1\)"),
    ({"initial_sparsity": -0.1}, r"Gradual.initial_sparsity"),
    ({"criterion": "l5"}, r"Gradual.criterion: must be one of"),
    ({"scope": "globl"}, r"Gradual.scope: .*did you mean 'global'"),
    ({"ignore": "fc"}, r"Gradual.ignore: must be a list"),
])
def test_gradual_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Gradual(**kwargs)


def test_iterative_config_errors():
    with pytest.raises(ConfigError, match="Iterative.rounds: must be an integer >= 1"):
        Iterative(rounds=0)
    with pytest.raises(ConfigError, match=r"Iterative.final_sparsity: must be a number in \[0, 1\)"):
        Iterative(final_sparsity=1.2)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_gradual_pruner_follows_schedule_and_masks_only_grow():
    model = _net()
    cfg = Gradual(initial_sparsity=0.0, final_sparsity=0.75, begin_step=5, end_step=45, frequency=10,
                  ignore=["4"])
    pruner = GradualPruner(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(64, 10), torch.randn(64, 4)
    previous = None
    changes = []
    for step in range(60):
        if pruner.step(step):
            changes.append(step)
            masks = {n: get_mask(m).clone() for n, m in masked_modules(model)}
            if previous is not None:
                for n, mask in masks.items():
                    assert not (mask & ~previous[n]).any()  # once pruned, stays pruned
            previous = masks
        expected = cfg.sparsity_at(step)
        if step >= 15:
            for name in ("0", "2"):  # exact counts at the scheduled sparsity, through the training steps
                w = model.get_submodule(name).weight
                assert int((w == 0).sum()) == round(pruner.target * w.numel()), (step, name)
            assert pruner.target == expected
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert changes == [15, 25, 35, 45]  # step 5 schedules 0.0: nothing to prune yet
    assert pruner.done and pruner.sparsity == pytest.approx(0.75, abs=1e-3)
    assert get_mask(model[4]) is None  # ignored
    pruner.finish()
    assert masked_modules(model) == []
    assert int((model[2].weight == 0).sum()) == 768
    assert sk.load(model) is model and model._slimkit_info["steps"][-1]["type"] == "Gradual"


def test_gradual_pruner_before_begin_and_global_scope():
    model = _net()
    pruner = GradualPruner(model, Gradual(initial_sparsity=0.3, final_sparsity=0.6, begin_step=10, end_step=20,
                                          frequency=5, scope="global"))
    assert not pruner.step(3) and pruner.sparsity == 0.0  # nothing before begin_step
    assert pruner.step(10) and pruner.sparsity == pytest.approx(0.3, abs=1e-3)
    assert not pruner.step(12)
    assert pruner.step(20) and pruner.sparsity == pytest.approx(0.6, abs=1e-3)
    pruner.finish(strip=False)
    assert len(masked_modules(model)) == 3


def test_iterative_rounds():
    model = _net()
    pruner = GradualPruner(model, Iterative(final_sparsity=0.8, rounds=4))
    assert not pruner.step(0)
    for r, expected in zip(range(1, 5), (0.2, 0.4, 0.6, 0.8)):
        assert pruner.step(r)
        for _, m in masked_modules(model):
            assert int((m.weight == 0).sum()) == round(expected * m.weight.numel())
    assert pruner.done


def test_gradual_pruner_rejects_one_shot_config_and_bad_layers():
    with pytest.raises(ConfigError, match="GradualPruner takes a Gradual or Iterative schedule"):
        GradualPruner(_net(), sk.Magnitude())
    with pytest.raises(ConfigError, match="include pattern"):
        GradualPruner(_net(), Gradual(include=["nope"]))
