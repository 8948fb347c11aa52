"""slimkit auto: budgets, the allocation against brute force, plans that run as recipes, a whole run, the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.auto import plan as P
from slimkit.auto.sensitivity import LayerSensitivity, Sensitivity
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError
from slimkit.factorization.svd import FactorizedLinear
from slimkit.quantization.modules import QuantLinear
from slimkit.recipe.schema import Recipe
from slimkit.tasks import GenericTask, set_task
from tests.test_cli import slimkit_cli


@pytest.mark.parametrize(("text", "kind", "value"), [("size=0.25", "size", 0.25), ("bits=4.5", "bits", 4.5),
                                                      (" size = 0.1", "size", 0.1), ("latency=0.5", "latency", 0.5)])
def test_budget_parses(text, kind, value):
    b = P.Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize(("text", "msg"), [("size", "write size=F"), ("speed=0.5", "latency=F"),
                                           ("latency=1.2", "fraction in (0, 1) of the fp32 model's time"),
                                           ("size=abc", "not a number"), ("size=1.5", "fraction in (0, 1)"),
                                           ("bits=0.5", "in [1, 32)")])
def test_bad_budgets_name_what_to_write(text, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        P.Budget.parse(text)


def _sens(curves: list[dict[str, dict[float, tuple[int, float]]]], dense: list[int]) -> Sensitivity:
    return Sensitivity([LayerSensitivity(f"l{i}", (1, d // 4), d, c) for i, (c, d) in enumerate(zip(curves, dense))],
                       "synthetic", "KL")


def test_allocation_matches_brute_force_on_convex_curves():
    # convex (bytes, cost) curves: cost per byte saved grows as a layer shrinks
    curves = [{"quantize": {8: (250, 0.01), 4: (130, 0.05), 2: (70, 0.40)}, "prune": {0.5: (530, 0.02)}},
              {"quantize": {8: (250, 0.002), 4: (130, 0.03), 2: (70, 0.09)}},
              {"quantize": {8: (250, 0.05), 4: (130, 0.30), 2: (70, 1.50)}}]
    sens = _sens(curves, [1000, 1000, 1000])
    for target in (3000, 1500, 800, 630, 450, 390):
        choices, nbytes, cost = P.allocate(sens, target, ("quantize",))
        assert nbytes <= target
        options = [[(1000, 0.0, None)] + [(b, c, ("quantize", k)) for k, (b, c) in cur["quantize"].items()]
                   for cur in curves]
        best = min((sum(o[1] for o in combo), combo) for combo in itertools.product(*options)
                   if sum(o[0] for o in combo) <= target)
        assert cost == pytest.approx(best[0], abs=1e-12), target  # exact (budgets under 20,000 bytes: unit 1)
    choices, _, _ = P.allocate(sens, 3000, ("quantize", "prune"))
    assert choices == {}  # everything fits as it is
    with pytest.raises(ConfigError, match="raise the budget"):
        P.allocate(sens, 100, ("quantize",))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 60), st.floats(0, 5)), min_size=0, max_size=3), min_size=1,
                max_size=4), st.integers(0, 250))
def test_knapsack_is_the_brute_force_optimum(options, budget):
    dense = [60] * len(options)
    got = P.knapsack(dense, options, budget)
    combos = [c for c in itertools.product(*[[(60, 0.0, None)] + [(b, c, i) for i, (b, c) in enumerate(o)]
                                             for o in options]) if sum(x[0] for x in c) <= budget]
    if not combos:
        assert got is None
        return
    best = min(sum(x[1] for x in c) for c in combos)
    assert got is not None
    used = sum(dense[i] if j is None else options[i][j][0] for i, j in enumerate(got))
    assert used <= budget
    assert sum(0.0 if j is None else options[i][j][1] for i, j in enumerate(got)) == pytest.approx(best, abs=1e-9)


def _model(seed: int = 0, width: int = 128) -> nn.Module:
    """A 64 → width → width → 10 MLP whose task scores accuracy against its own predictions."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                          nn.Linear(width, 10)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 64, generator=gen)
    y = model(x).argmax(-1).detach()
    metric = lambda m, data: {"accuracy": float((m(data[0]).argmax(-1) == data[1]).float().mean())}
    return set_task(model, GenericTask(example_inputs=x[:4], calibration=CalibrationData.from_tensors(x, batch_size=24),
                                       eval_data=(x, y), metric=metric))


def test_plan_steps_run_as_a_recipe_in_the_order_steps_compose():
    from slimkit.recipe.runner import run_recipe

    model = _model()
    choices = {"0": ("factorize", 0.5), "2": ("prune", 0.5), "4": ("quantize", 4)}
    steps = P.plan_steps(model, choices)
    assert [s.family for s in steps] == ["factorize", "prune", "quantize"]
    recipe = P.Plan("p", choices, steps, True).recipe("m")
    assert Recipe.from_yaml_text(recipe.to_yaml()) == recipe and [st.name for st in recipe.stages] == ["factorize", "prune", "quantize"]
    ctx = run_recipe(model, recipe)
    out = ctx.model
    assert isinstance(out[0], FactorizedLinear) and isinstance(out[4], QuantLinear) and out[4].bits == 4
    assert float((out[2].weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / 128)
    # groups follow the sensitivity measurement's rule: 128 where the row splits into them, else 32, else per row
    assert out[4].group_size == 128
    assert P.plan_steps(model, {"0": ("quantize", 4)})[0].group_size == 32  # 64 inputs


def test_auto_measures_plans_within_the_budget_and_marks_the_front(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = P.auto(model, "bits=5")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert r.winner is not None and r.winner.bits <= 5 and r.winner.error is None
    assert r.plans[0] is r.winner
    fits = [p for p in r.plans if p.bits is not None and p.bits <= 5 and p.quality is not None]
    assert r.winner.quality == max(p.quality for p in fits)
    names = {p.name for p in r.plans}
    assert "allocated: quantize" in names and "int8 every layer" in names
    measured = [p for p in r.plans if p.quality is not None]
    for p in measured:  # a front point is dominated by no other point
        if p.on_front:
            assert not any(q.size_bytes <= p.size_bytes and q.quality >= p.quality
                           and (q.size_bytes < p.size_bytes or q.quality > p.quality) for q in measured)
    allocated = [p for p in r.plans if p.allocated]
    assert len(allocated) == len(P.FAMILY_SETS)
    for a, b in itertools.combinations(allocated, 2):  # an identical allocation is measured once
        if a.choices == b.choices:
            assert a.size_bytes == b.size_bytes and a.quality == b.quality and "the same choices as" in a.note + b.note
    d = r.to_dict()
    json.dumps(d)
    assert d["winner"] == r.winner.name and "recipe" in d["plans"][0]
    assert 'id="front-plot"' in r.to_html() and "(winner)" in r.to_markdown()
    with pytest.raises(ConfigError, match="max_drop"):
        P.auto(model, "bits=5", max_drop=2)


def test_cli_writes_the_winner_recipe_and_refuses_bad_budgets(tmp_path, monkeypatch):
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "speed=2", "--out", tmp_path / "a")
    assert r.returncode == 2 and "write size=F" in r.stderr and not (tmp_path / "a").exists()
    model = _model()
    result = P.auto(model, "bits=6")
    monkeypatch.setattr(P, "auto", lambda *a, **k: result)
    out = tmp_path / "auto"
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "bits=6", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["auto.json", "auto.md", "recipe.yaml", "report.html"]
    assert Recipe.from_yaml_text((out / "recipe.yaml").read_text()).steps == list(result.winner.steps)
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "bits=6", "--out", out, "--quiet")  # its own folder: replaced
    assert r.returncode == 0
    (out / "mine.txt").write_text("x")
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "bits=6", "--out", out)
    assert r.returncode == 2 and "mine.txt" in r.stderr
    result.winner = None
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "bits=6", "--out", tmp_path / "b")
    assert r.returncode == 2 and "no plan fits the budget" in r.stderr and not (tmp_path / "b").exists()
