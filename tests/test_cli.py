"""The `slimkit` command end to end on a tiny model folder, and its handling of user mistakes."""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from unittest import mock

import pytest
import torch

from slimkit.cli import main


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def slimkit_cli(*args):
    """Run the CLI's entry point in this process (a subprocess would re-import torch each time)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["slimkit", *map(str, args)]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def test_entry_point_runs_as_a_program():
    r = subprocess.run([sys.executable, "-m", "slimkit.cli", "compress", "--model", "/no/such/dir"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_compress_writes_model_and_reports_and_eval_reproduces(tiny_lm_dir, tmp_path):
    out = tmp_path / "out"
    r = slimkit_cli("compress", "--model", tiny_lm_dir, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.html", "report.json", "report.md"]
    assert report["compressed"]["size_bytes"] < 0.5 * report["baseline"]["size_bytes"]
    ppl = report["compressed"]["quality"]["perplexity"]
    # `slimkit eval DIR` reproduces the report's perplexity from the saved checkpoint
    r = slimkit_cli("eval", out / "model", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quality"]["perplexity"] == pytest.approx(ppl, rel=1e-6)


def test_eval_on_users_text_file(tiny_lm_dir, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("def mul(a, b):\n    return a * b\n" * 40)
    r = slimkit_cli("eval", tiny_lm_dir, "--data", text, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["quality"]["perplexity"] > 1.0 and "mine.txt" in got["details"]["quality data"]


def _assert_user_error(r, needle, out):
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_unknown_recipe_key_exits_2(tiny_lm_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nstages:\n  - name: q\n    steps:\n      - {type: RTN, bitz: 8}\n")
    out = tmp_path / "out"
    _assert_user_error(slimkit_cli("compress", "--model", tiny_lm_dir, "--recipe", recipe, "--out", out),
                       "unknown key 'bitz'", out)


def test_missing_model_exits_2(tmp_path):
    out = tmp_path / "out"
    _assert_user_error(slimkit_cli("compress", "--model", tmp_path / "no-such-model", "--out", out), "not found", out)


def test_truncated_weights_exit_2(tiny_lm_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_lm_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    _assert_user_error(slimkit_cli("compress", "--model", broken, "--out", out), "corrupt or truncated", out)


def test_refuses_to_overwrite_a_foreign_folder(tiny_lm_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = slimkit_cli("compress", "--model", tiny_lm_dir, "--out", tmp_path)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_zoo_list_json():
    r = slimkit_cli("zoo", "list", "--json")
    assert r.returncode == 0, r.stderr
    names = [row["name"] for row in json.loads(r.stdout)]
    assert names == ["stdlib-coder", "stdlib-coder-student", "digits-cnn", "minilm"]


@pytest.mark.parametrize("step, needle", [
    ("{type: Magnitude, sparsity: 1.0}", "sparsity must be a number in [0, 1)"),
    ("{type: Wanda, pattern: '2:4', sparsity: 0.7}", "the pattern 2:4 prunes exactly 0.5"),
    ("{type: StructuredPrune, ratio: 0.99, min_units: 1, targets: [neurons]}", "with 0 of its 64 neurons"),
])
def test_impossible_pruning_settings_exit_2(tiny_lm_dir, tmp_path, step, needle):
    assert_one_step_recipe_exits_2(tiny_lm_dir, tmp_path, step, needle)


def assert_one_step_recipe_exits_2(model_dir, tmp_path, step, needle):
    """`slimkit compress` with a recipe of the one ``step`` exits 2, leaves no output, and says ``needle``."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\ncalibration: {corpus: stdlib, samples: 2, seq_len: 16}\n"
                      f"stages:\n  - name: s\n    steps:\n      - {step}\n")
    out = tmp_path / "out"
    r = slimkit_cli("compress", "--model", model_dir, "--recipe", recipe, "--out", out)
    # Progress lines may come first (the model loads before the step fails); the error is one line, last.
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists()
    assert needle in r.stderr.strip().splitlines()[-1], r.stderr


def test_distill_trains_a_student_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "kd"
    r = slimkit_cli("distill", "--recipe", "kd-digits", "--steps", "3", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["compressed"]["params_total"] < 0.1 * report["baseline"]["params_total"]  # 8/16/32 vs 32/64/128
    assert "accuracy" in report["compressed"]["quality"]
    assert any("Distill: 3 steps of batch 64" in n for n in report["notes"])
    ckpt = tmp_path / "kd.checkpoints" / "last"
    assert (ckpt / "model.safetensors").is_file() and json.loads((ckpt / "trainer.json").read_text())["step"] == 3
    # An interrupted or extended run continues from the checkpoint instead of starting over.
    r = slimkit_cli("distill", "--recipe", "kd-digits", "--steps", "5", "--resume", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert any("Distill: 5 steps (resumed at step 3)" in n for n in json.loads(r.stdout)["notes"])


def test_distill_user_mistakes_exit_2(tmp_path):
    out = tmp_path / "kd"
    r = slimkit_cli("distill", "--recipe", "kd-digits", "--student", "layers:7", "--steps", "2", "--out", out, "--quiet")
    _assert_user_error(r, "layers", out)
    r = slimkit_cli("distill", "--recipe", "int8-weight-only", "--out", out)
    _assert_user_error(r, "no Distill step", out)


@pytest.mark.parametrize("step, needle", [
    ("{type: SVD, rank: -1}", "must be a positive integer"),
    ("{type: SVD, rank: 40, force: true}", "above the full rank 32"),
    ("{type: SVD, rank: 20}", "above the break-even rank 15"),
    ("{type: SVD, param_ratio: 0.5, energy: 0.9}", "set exactly one of"),
    ("{type: Tucker, param_ratio: 0.5}", "has none selected; use SVD"),
])
def test_impossible_factorization_settings_exit_2(tiny_lm_dir, tmp_path, step, needle):
    assert_one_step_recipe_exits_2(tiny_lm_dir, tmp_path, step, needle)
