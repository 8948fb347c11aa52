"""`slimkit advise` from the command line: bad input exits 2 with one line; the recommendation becomes a recipe."""

from __future__ import annotations

import json

import pytest
import torch

from slimkit.auto import advise as A
from slimkit.auto.facts import machine_facts, model_facts
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.schema import resolve_recipe
from tests.test_cli import slimkit_cli


def _run(*args: str):
    r = slimkit_cli("advise", *args)
    r.output = r.stdout + r.stderr
    return r


def test_unknown_target_and_impossible_max_drop_exit_2():
    r = _run("stdlib-coder", "--target", "speed")
    assert r.returncode == 2 and "unknown target 'speed'" in r.output
    r = _run("stdlib-coder", "--max-drop", "5")
    assert r.returncode == 2 and "must be a fraction in [0, 1)" in r.output


def _advice(excluded: str | None):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    from slimkit.tasks import GenericTask, set_task

    set_task(model, GenericTask(example_inputs=torch.zeros(2, 8)))
    c = A.Candidate("int8 weight-only", "torch", (RTN(bits=8),), "low", "torch int8 weight-only", expected_bytes=72,
                    expected_ms=1.0)
    c.excluded = excluded
    return A.Advice(machine_facts(), model_facts(model), "latency", None, [("q?", "a.")], {"torch": 2.0}, "ms", [],
                    [c], model_name="stdlib-coder")


def test_write_recipe_refuses_when_the_recommendation_is_no_compression(tmp_path, monkeypatch):
    advice = _advice(None)
    facts = advice.model
    advice.candidates = [A.uncompressed("torch", facts), *advice.candidates]
    monkeypatch.setattr(A, "advise", lambda *a, **k: advice)
    out = tmp_path / "advised.yaml"
    r = _run("stdlib-coder", "--write-recipe", str(out))
    assert r.returncode == 2 and "no compression step to write" in r.output and not out.exists()


@pytest.mark.parametrize("excluded", [None, "drop 5% > max_drop 1%"])
def test_write_recipe_writes_the_recommendation_or_exits_2_when_there_is_none(tmp_path, monkeypatch, excluded):
    monkeypatch.setattr(A, "advise", lambda *a, **k: _advice(excluded))
    out = tmp_path / "advised.yaml"
    r = _run("stdlib-coder", "--write-recipe", str(out), "--json")
    if excluded is None:
        assert r.returncode == 0, r.output
        assert json.loads(r.stdout)["recommendation"] == "int8 weight-only"
        recipe = resolve_recipe(out)
        assert recipe.model == "stdlib-coder" and recipe.steps == [RTN(bits=8)]
    else:
        assert r.returncode == 2 and "no candidate is recommendable" in r.output and not out.exists()
