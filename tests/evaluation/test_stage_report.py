"""The per-stage report: run_recipe's after_stage callback, the "After each stage" rows measured by
`slimkit compress`, their JSON, Markdown and HTML, and when they are (not) measured."""

import copy
import json
import re

import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.core.measure import size_on_disk
from slimkit.evaluation.report import CompressionReport, ModelMeasurement, StageMeasurement
from slimkit.recipe.schema import Recipe

PRUNE_THEN_INT8 = """version: 1
stages:
  - name: prune
    steps:
      - {type: Magnitude, sparsity: 0.5}
  - name: quantize
    steps:
      - {type: RTN, bits: 8, embeddings: true}
evaluate: [%s]
"""
ONE_STAGE = "version: 1\nstages:\n  - name: quantize\n    steps:\n      - {type: RTN, bits: 8}\nevaluate: [size, perplexity]\n"
LIGHT = "size, params, sparsity, perplexity"  # no latency: these tests are about the rows, not timing


def _recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _images(page):
    return re.findall(r'<img [^>]*src="data:image/png;base64,', page)


# -- run_recipe(after_stage=...) ---------------------------------------------------------------------


def test_after_stage_is_called_once_per_stage_in_order_with_the_model_as_it_is_then(tiny_llama, tmp_path):
    from slimkit.quantization.modules import QuantLinear
    from slimkit.recipe.runner import run_recipe

    recipe = Recipe.from_yaml(_recipe(tmp_path, PRUNE_THEN_INT8 % "size"))
    calls = []

    def after_stage(name, model, ctx):
        q = model.model.layers[0].self_attn.q_proj
        zeros = float((q.weight == 0).float().mean()) if not isinstance(q, QuantLinear) else None
        calls.append((name, model, isinstance(q, QuantLinear), zeros, len(ctx.notes)))

    ctx = run_recipe(tiny_llama, recipe, after_stage=after_stage)
    assert [c[0] for c in calls] == ["prune", "quantize"]
    assert all(c[1] is tiny_llama for c in calls) and ctx.model is tiny_llama
    # after "prune" the layer is still float and half zeros; after "quantize" it is int8
    assert not calls[0][2] and calls[0][3] == pytest.approx(0.5, abs=0.01)
    assert calls[1][2]
    assert 0 < calls[0][4] < calls[1][4]  # the context is the run's: notes of the steps so far


def test_after_stage_gets_the_model_a_distill_stage_put_in_place(tiny_llama, monkeypatch, tmp_path):
    """A Distill step returns a new model (the student); the callback of its stage and later ones get it."""
    import slimkit.recipe.runner as runner

    real_apply = runner.apply_step
    students = []

    def apply_step(model, step, data, ctx):
        if step.family == "distill":  # stand-in for training: a new module, as a student is
            students.append(copy.deepcopy(model))
            return students[-1]
        return real_apply(model, step, data, ctx)

    monkeypatch.setattr(runner, "apply_step", apply_step)
    text = ("version: 1\nstages:\n  - name: prune\n    steps:\n      - {type: Magnitude, sparsity: 0.5}\n"
            "  - name: recover\n    steps:\n      - {type: Distill, student: '', steps: 1}\n"
            "  - name: quantize\n    steps:\n      - {type: RTN, bits: 8}\n")
    seen = []
    ctx = runner.run_recipe(tiny_llama, Recipe.from_yaml(_recipe(tmp_path, text)),
                            after_stage=lambda name, model, ctx: seen.append((name, model)))
    assert [n for n, _ in seen] == ["prune", "recover", "quantize"]
    assert seen[0][1] is tiny_llama and seen[1][1] is students[0] and seen[2][1] is students[0]
    assert ctx.model is students[0]


def test_without_after_stage_the_run_is_unchanged(tiny_llama, tmp_path):
    from slimkit.recipe.runner import run_recipe

    recipe = Recipe.from_yaml(_recipe(tmp_path, PRUNE_THEN_INT8 % "size"))
    other = copy.deepcopy(tiny_llama)
    run_recipe(tiny_llama, recipe)
    run_recipe(other, recipe, after_stage=lambda *a: None)
    ids = torch.arange(16).unsqueeze(0)
    assert torch.equal(tiny_llama(ids).logits, other(ids).logits)


# -- slimkit compress: the rows ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged_run(tiny_lm_dir, tmp_path_factory):
    """`slimkit compress` of a prune-then-int8 recipe (latency included), run once for the tests below."""
    from tests.test_cli import slimkit_cli

    tmp = tmp_path_factory.mktemp("staged")
    recipe = _recipe(tmp, PRUNE_THEN_INT8 % "size, params, sparsity, latency, perplexity")
    r = slimkit_cli("compress", "--model", tiny_lm_dir, "--recipe", recipe, "--out", tmp / "out", "--json")
    assert r.returncode == 0, r.stderr
    return tmp / "out", json.loads(r.stdout)


def _expected_sizes(tiny_lm_dir, tmp_path):
    """Bytes of the checkpoints of the same model pruned, then pruned and quantized, saved independently."""
    import slimkit as sk
    from slimkit.core.io import load, save

    model = load(tiny_lm_dir)
    sk.prune_(model, sk.Magnitude(sparsity=0.5))
    save(model, tmp_path / "pruned")
    sk.quantize_(model, sk.RTN(bits=8, embeddings=True))
    save(model, tmp_path / "int8")
    return size_on_disk(tmp_path / "pruned"), size_on_disk(tmp_path / "int8")


def test_compress_reports_one_row_per_stage_with_measured_sizes(staged_run, tiny_lm_dir, tmp_path):
    _, report = staged_run
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["prune", "quantize"]
    base = report["baseline"]["size_bytes"]
    pruned, int8 = (s["measurement"]["size_bytes"] for s in stages)
    # measured as the final size is: the bytes of a saved checkpoint, here equal to saving the same model
    assert (pruned, int8) == _expected_sizes(tiny_lm_dir, tmp_path)
    assert int8 == report["compressed"]["size_bytes"]
    # 50% zeros stored as bitmask + values (~0.53 of fp32 for the pruned matrices; embeddings stay fp32);
    # then int8 codes (a quarter of fp32, and sparse codes less) for every weight
    assert 0.55 * base < pruned < 0.85 * base
    assert int8 < 0.5 * pruned and int8 < 0.36 * base
    prune_m = stages[0]["measurement"]
    assert prune_m["params_nonzero"] < 0.75 * prune_m["params_total"]
    assert prune_m["latency"]["median_ms"] > 0 and prune_m["quality"]["perplexity"] > 1
    assert stages[1]["measurement"] == report["compressed"]  # the last stage's row is the compressed model
    assert prune_m["details"]["quality data"] == report["baseline"]["details"]["quality data"]  # same data


def test_stage_rows_reach_json_markdown_and_html(staged_run):
    out, report = staged_run
    loaded = CompressionReport.from_json((out / "report.json").read_text())
    assert loaded.to_dict()["stages"] == report["stages"]
    md = (out / "report.md").read_text()
    assert "## After each stage" in md
    section = md.split("## After each stage")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| Stage", "| baseline", "| prune", "| quantize"]
    assert "Latency median (ms)" in rows[0] and "perplexity" in rows[0] and "Size on disk (MB)" in rows[0]
    assert re.search(r"\| quantize \| [0-9.]+ \(0\.\d\dx\) \|", md)
    page = (out / "report.html").read_text()
    assert 'id="stage-table"' in page and 'id="stage-plot"' in page and ">prune<" in page
    without = CompressionReport.from_json((out / "report.json").read_text())
    without.stages = []
    assert len(_images(page)) == len(_images(without.to_html())) + 1


def test_no_per_stage_gives_no_rows_and_the_same_model(staged_run, tiny_lm_dir, tmp_path):
    from tests.test_cli import slimkit_cli

    recipe = _recipe(tmp_path, PRUNE_THEN_INT8 % LIGHT)
    r = slimkit_cli("compress", "--model", tiny_lm_dir, "--recipe", recipe, "--out", tmp_path / "out", "--json",
                    "--no-per-stage")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stages"] == []
    assert "After each stage" not in (tmp_path / "out" / "report.md").read_text()
    assert 'id="stage-plot"' not in (tmp_path / "out" / "report.html").read_text()
    # measuring between stages left the recipe's result as it was
    weights = "model/model.safetensors"
    assert (tmp_path / "out" / weights).read_bytes() == (staged_run[0] / weights).read_bytes()


def test_one_stage_recipe_has_no_rows_unless_asked(tiny_lm_dir, tmp_path):
    from tests.test_cli import slimkit_cli

    recipe = _recipe(tmp_path, ONE_STAGE)
    r = slimkit_cli("compress", "--model", tiny_lm_dir, "--recipe", recipe, "--out", tmp_path / "a", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stages"] == []
    r = slimkit_cli("compress", "--model", tiny_lm_dir, "--recipe", recipe, "--out", tmp_path / "b", "--per-stage")
    assert r.returncode == 0, r.stderr
    assert "After each stage" in r.stdout  # the terminal shows the table too
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["quantize"]


# -- the report object: JSON, versions, notes -------------------------------------------------------------


def _m(name, size, ppl, nonzero=1000):
    return ModelMeasurement(name=name, kind="causal-lm", size_bytes=size, params_total=1000, params_nonzero=nonzero,
                            quality={"perplexity": ppl})


def _staged(ppls=(10.0, 14.0, 11.0, 11.5)):
    base, *after = ppls
    stages = [StageMeasurement(f"s{i}", _m(f"s{i}", 4_000_000 // (i + 1), p, 500)) for i, p in enumerate(after, 1)]
    return CompressionReport(baseline=_m("fp32", 4_000_000, base), compressed=stages[-1].measurement,
                             stages=stages, environment={"date": "2026-01-01"})


def test_json_round_trip_and_old_reports_still_load():
    r = _staged()
    assert CompressionReport.from_json(r.to_json()) == r
    old = r.to_dict()
    del old["stages"]
    old["format_version"] = 1
    assert CompressionReport.from_dict(old).stages == []
    old["stages"] = []  # a version-1 report never had stages
    with pytest.raises(DataError, match="stages"):
        CompressionReport.from_dict(old)
    bad = r.to_dict()
    bad["stages"][0]["stag"] = "x"
    with pytest.raises(DataError, match="stag"):
        CompressionReport.from_dict(bad)
    bad = r.to_dict()
    bad["format_version"] = 3
    with pytest.raises(DataError, match="format_version 3"):
        CompressionReport.from_dict(bad)


def test_table_changes_are_against_the_baseline():
    md = _staged().to_markdown()
    assert "| s1 | 2 (0.50x) | 1,000 (1.00x) | 50.0% | 14 (+4) |" in md
    assert "| s3 | 1 (0.25x) | 1,000 (1.00x) | 50.0% | 11.5 (+1.5) |" in md
    assert "| baseline | 4 | 1,000 | 0.0% | 10 |" in md


def test_note_names_the_stage_that_cost_more_than_the_whole_recipe():
    notes = _staged().stage_notes()
    assert len(notes) == 1 and "'s1'" in notes[0] and "+4" in notes[0] and "+1.5" in notes[0]
    assert _staged((10.0, 10.5, 11.0, 11.5)).stage_notes() == []  # steady, each step costs less than the total
    assert _staged((10.0, 9.0, 9.05, 9.0)).stage_notes() == []  # +0.05 is noise (< 1%)
