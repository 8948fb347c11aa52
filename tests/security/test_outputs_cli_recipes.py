"""Hostile and careless input to output folders, the command line and recipes.

Each attack is built here: a user's files in the folder a command would write (they must
survive, exit 2), CLI usage mistakes (one line, exit 2), SIGTERM/Ctrl-C mid-run (no temporary
left, the previous output intact), simultaneous replaces of one output, umasks, hostile YAML,
and fuzzing of the recipe parser (one SlimkitError or success, never another exception).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimkit.core import atomic
from slimkit.core.atomic import (
    MODEL_FOLDER,
    OutputFolderError,
    OutputKind,
    atomic_dir,
    atomic_write_text,
)
from slimkit.core.errors import RecipeError, SlimkitError
from slimkit.recipe.schema import MAX_DEPTH, MAX_RECIPE_BYTES, Recipe, resolve_recipe
from tests.test_cli import slimkit_cli

REPO = Path(__file__).resolve().parents[2]


def _users_folder(path: Path) -> dict[str, str]:
    """A folder of the user's: a file, a dotfile and a sub-folder. Returns {relative path: content}."""
    files = {"notes.txt": "my notes", ".bashrc": "alias ll='ls -l'", "photos/cat.txt": "a cat"}
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return files


def _assert_intact(path: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        assert (path / rel).read_text() == text, rel


def _assert_no_leftovers(parent: Path) -> None:
    names = os.listdir(parent)
    assert not [n for n in names if ".tmp-" in n or ".old-" in n or n.endswith(".lock")], names


def _fake_compress_output(path: Path) -> dict[str, str]:
    """A folder shaped like a `slimkit compress` output (what the output checks recognise)."""
    files = {"report.json": json.dumps({"baseline": {}, "compressed": {}, "environment": {}}),
             "report.md": "# report", "report.html": "<html></html>",
             "model/slimkit.json": json.dumps({"format": "slimkit"}), "model/model.safetensors": "weights"}
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return files


def _one_line_error(r, needle: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


# -- 1. output folders: nothing of the user's is deleted ----------------------------------
def test_every_writing_command_refuses_a_users_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    files = _users_folder(home)
    commands = [
        ("compress", "--model", "digits-cnn", "--out", home),
        ("distill", "--out", home),
        ("distill", "--out", tmp_path / "fresh", "--checkpoints", home),
        ("export", "compressed-tensors", "digits-cnn", home),
        ("zoo", "train", "digits-cnn", "--out", home),
    ]
    for args in commands:
        r = slimkit_cli(*args)
        _one_line_error(r, "home")
        assert "'.bashrc'" in r.stderr  # the first foreign file is named
        _assert_intact(home, files)
    assert not (tmp_path / "fresh").exists()
    _assert_no_leftovers(tmp_path)


def test_a_slimkit_output_holding_a_users_file_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ours = _fake_compress_output(out)
    (out / "model" / "diary.txt").write_text("mine")
    r = slimkit_cli("compress", "--model", "digits-cnn", "--out", out)
    _one_line_error(r, "'model/diary.txt'")
    _assert_intact(out, {**ours, "model/diary.txt": "mine"})
    (out / "report.json").write_text('{"my": "own report"}')  # a user's report.json is no slimkit marker
    (out / "model" / "diary.txt").unlink()
    _one_line_error(slimkit_cli("compress", "--model", "digits-cnn", "--out", out), "not a slimkit")


def test_recipe_checkpoint_dir_cannot_point_at_a_users_folder(tmp_path):
    victim = tmp_path / "victim"
    (victim / "last").mkdir(parents=True)
    (victim / "last" / "thesis.tex").write_text("years of work")
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        version: 1
        model: digits-cnn
        stages:
          - name: distill
            steps:
              - {{type: Distill, student: default, steps: 2, batch_size: 8, checkpoint_dir: {str(victim)!r}}}
        """))
    r = slimkit_cli("compress", "--recipe", recipe, "--out", tmp_path / "out", "-q")
    _one_line_error(r, "thesis.tex")
    assert (victim / "last" / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "out").exists()


def test_trainer_checkpoints_replace_only_their_own_folder(tmp_path):
    from slimkit.distillation.checkpoint import CheckpointError, write_checkpoint

    module = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    info = {"step": 1, "history": [], "settings": {}}
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt / "last", module, opt, info, torch.device("cpu"))
    write_checkpoint(ckpt / "last", module, opt, info, torch.device("cpu"))  # its own: replaced
    assert sorted(os.listdir(ckpt)) == ["last"]
    (ckpt / "last" / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="mine.txt"):
        write_checkpoint(ckpt / "last", module, opt, info, torch.device("cpu"))
    home = tmp_path / "home"
    home.mkdir()
    files = _users_folder(home)
    with pytest.raises(CheckpointError, match="refusing to write checkpoints there"):
        write_checkpoint(home / "last", module, opt, info, torch.device("cpu"))
    _assert_intact(home, files)
    assert (ckpt / "last" / "mine.txt").read_text() == "keep" and not (home / "last").exists()


def test_compressed_tensors_export_replaces_its_own_folder_only(tmp_path):
    import slimkit
    from slimkit.export.compressed_tensors import export_compressed_tensors
    from tests.llm_archs import tiny_causal_lm

    model = tiny_causal_lm("llama", layers=1)
    slimkit.quantize_(model, slimkit.RTN(bits=4, group_size=32))
    out = tmp_path / "ct"
    export_compressed_tensors(model, out)
    export_compressed_tensors(model, out)  # an earlier export of its own: replaced
    (out / "README.md").write_text("my model card")
    with pytest.raises(OutputFolderError, match="'README.md'"):
        export_compressed_tensors(model, out)
    assert (out / "README.md").read_text() == "my model card"
    _assert_no_leftovers(tmp_path)


def test_output_kind_checks(tmp_path):
    kind = OutputKind("test output", "marker.json", ("marker.json", "data.bin", "sub/", "sub/*.json"),
                      lambda c: c == {"ok": True})
    target = tmp_path / "t"
    for make in (lambda p: p.write_text("a file"), lambda p: p.symlink_to(tmp_path)):
        make(target)
        with pytest.raises(OutputFolderError):
            atomic.check_output_dir(target, kind)
        target.unlink()
    target.mkdir()
    atomic.check_output_dir(target, kind)  # empty: fine
    (target / "marker.json").write_text('{"ok": true}')
    (target / "sub").mkdir()
    (target / "sub" / "a.json").write_text("{}")
    atomic.check_output_dir(target, kind)
    (target / "sub" / "deep").mkdir()
    with pytest.raises(OutputFolderError, match="'sub/deep'"):
        atomic.check_output_dir(target, kind)
    (target / "sub" / "deep").rmdir()
    (target / "link.bin").symlink_to(target / "marker.json")
    with pytest.raises(OutputFolderError, match="'link.bin'"):
        atomic.check_output_dir(target, kind)
    assert "model.safetensors" in MODEL_FOLDER.paths


# -- 2. command-line usage mistakes ---------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["compres"], "No such command 'compres'"),
    (["eval"], "Missing argument"),
    (["compress", "--no-such-option"], "No such option"),
])
def test_usage_mistakes_are_one_line_and_exit_2(args, needle):
    r = subprocess.run([sys.executable, "-m", "slimkit.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=REPO, check=False)
    _one_line_error(r, needle)
    assert "--help" in r.stderr and "Traceback" not in r.stderr


# -- 3. interruption, concurrency, modes ------------------------------------------------------
_QUICK_RECIPE = """\
version: 1
model: digits-cnn
allow_partial: true
stages:
  - name: q
    steps:
      - {type: RTN, bits: 8}
evaluate: [size, params, latency, accuracy]
"""


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_compress_leaves_no_temporary_and_the_previous_output(tmp_path, sig, code, word):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(_QUICK_RECIPE)
    out = tmp_path / "out"
    out.mkdir()
    previous = _fake_compress_output(out)
    # A job started in the background (``cmd &``) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition whatever the test runner had.
    p = subprocess.Popen([sys.executable, "-m", "slimkit.cli", "compress", "--model", "digits-cnn", "--recipe",
                          str(recipe), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # Signalled once the model is saved in the temporary folder: the measuring that follows takes seconds.
    while not list(tmp_path.glob(".out.tmp-*/model")) and p.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == word
    _assert_intact(out, previous)
    assert sorted(os.listdir(tmp_path)) == ["out", "q.yaml"]


def test_sigterm_in_a_library_call_cleans_up_then_dies_by_sigterm(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, time
        from slimkit.core.atomic import atomic_dir
        with atomic_dir({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "f").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO,
                       check=False)
    assert r.returncode == -signal.SIGTERM, r.stderr
    assert os.listdir(tmp_path) == []


def _writer_script(target: Path, tag: str) -> str:
    return textwrap.dedent(f"""
        import time
        from slimkit.core.atomic import atomic_dir
        with atomic_dir({str(target)!r}) as tmp:
            for k in range(5):
                (tmp / f"f{{k}}").write_text({tag!r})
            time.sleep(0.02)
        """)


def test_concurrent_replaces_all_succeed_and_leave_one_complete_output(tmp_path):
    target = tmp_path / "out"
    errors = []

    def write(tag: str) -> None:
        try:
            with atomic_dir(target) as tmp:
                for k in range(5):
                    (tmp / f"f{k}").write_text(tag)
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    procs = [subprocess.Popen([sys.executable, "-c", _writer_script(target, f"p{i}")], cwd=REPO) for i in range(10)]
    threads = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0] * 10
    assert errors == []
    contents = {(target / f"f{k}").read_text() for k in range(5)}
    assert len(contents) == 1 and sorted(os.listdir(target)) == [f"f{k}" for k in range(5)]  # one writer, whole
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_rename_restores_the_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("old")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="No space"), atomic_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}.{atomic._HOST_TAG}-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}.{atomic._HOST_TAG}-def"
    foreign_host = tmp_path / f".out.tmp-{dead.pid}.00000000-ghi"
    for d in (stale, live, foreign_host):
        d.mkdir()
        (d / "x").write_text("partial")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert not stale.exists() and live.exists() and foreign_host.exists()


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_modes_follow_the_umask(tmp_path, mask, dir_mode, file_mode):
    from safetensors.torch import save_file

    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            with atomic_dir(tmp / "model") as inner:  # a nested output (slimkit.save inside compress)
                (inner / "slimkit.json").write_text("{}")
        atomic_write_text(tmp_path / "out" / "report.json", "{}")  # mkstemp writes 0600
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in [out, out / "model", *out.rglob("*")]}
    assert {p: m for p, m in modes.items() if m != (dir_mode if p.is_dir() else file_mode)} == {}


# -- 4. recipes --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    ("stages:\n  - name: q\n    steps:\n      - {type: RTN, bits: 8, bits: 2}\n", r"duplicate key 'bits' .*line 4"),
    ("version: 1\nversion: 1\nstages: []\n", r"duplicate key 'version'"),
    ("stages: " + "[" * 200 + "]" * 200, f"nested deeper than {MAX_DEPTH}"),
    ("stages: " + "{a: " * 5000 + "1" + "}" * 5000, f"nested deeper than {MAX_DEPTH}"),
    ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
     + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
     + "stages: []\n", "anchors and aliases"),
    ("x: &x {type: RTN}\nstages: [{name: q, steps: [*x]}]\n", "anchors and aliases"),
    ("stages: [{name: q, steps: [{<<: {type: RTN}}]}]\n", "merge keys"),
    ("version: 1" + "0" * 5000 + "\nstages: []\n", "not valid YAML"),
    ("version: 2001-13-45\nstages: []\n", "not valid YAML"),
    ("a: " + "x" * (MAX_RECIPE_BYTES + 1), "at most"),
])
def test_hostile_yaml_is_one_recipe_error(text, needle):
    with pytest.raises(RecipeError, match=needle) as info:
        Recipe.from_yaml_text(text)
    assert "\n" not in str(info.value)


def test_hostile_recipe_files(tmp_path):
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # 200 MB (sparse): refused from its size, never read
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="at most"):
        Recipe.from_yaml(huge)
    assert time.perf_counter() - start < 1
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(RecipeError, match="regular file"):
            resolve_recipe(path)


def test_recipe_names_cannot_leave_the_shipped_folder(tmp_path, monkeypatch):
    from slimkit.recipe import schema

    shipped = tmp_path / "pkg" / "recipes"
    shipped.mkdir(parents=True)
    (shipped / "good.yaml").write_text("stages: [{name: q, steps: [{type: RTN}]}]\n")
    (tmp_path / "pkg" / "outside.yaml").write_text("stages: [{name: q, steps: [{type: RTN}]}]\n")
    monkeypatch.setattr(schema, "builtin_recipe_dir", lambda: shipped)
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("good").steps
    for name in ("../outside", "pkg/../pkg/outside", "..\\outside", ".hidden"):
        with pytest.raises(RecipeError, match="not found"):
            resolve_recipe(name)


def test_a_group_size_that_skips_every_layer_is_one_line(tmp_path):
    recipe = tmp_path / "g.yaml"
    recipe.write_text("version: 1\nmodel: digits-cnn\nstages:\n  - name: q\n    steps:\n"
                      "      - {type: RTN, bits: 4, group_size: 1099511627776}\n")
    r = slimkit_cli("compress", "--recipe", recipe, "--out", tmp_path / "out", "-q")
    _one_line_error(r, "RTN changed 0 of")
    assert not (tmp_path / "out").exists()


# -- fuzzing: one SlimkitError or success, never another exception ---------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["RTN", "GPTQ", "Magnitude", "Distill", "QAT", "SVD", "StructuredPrune", "Wanda",
                                      "stdlib", "digits", "lm_head", "auto", "kd", ""]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                       max_leaves=12)


@st.composite
def _steps(draw) -> dict:
    """A step of a registered config type with some of its real fields set to random values."""
    import dataclasses

    from slimkit.core.registry import config_types

    types = config_types()
    name = draw(st.sampled_from(sorted(types)))
    fields = [f.name for f in dataclasses.fields(types[name])]
    keys = draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)) if fields else []
    step = {"type": name, **{k: draw(_values) for k in keys}}
    if draw(st.booleans()):
        step[draw(st.text(max_size=8))] = draw(_values)  # and sometimes a key no config has
    return step


_recipes = st.fixed_dictionaries(
    {"stages": st.lists(st.fixed_dictionaries({"name": _scalars, "steps": st.lists(_steps(), max_size=3)}),
                        max_size=2)},
    optional={"version": _scalars, "model": _values, "calibration": _values, "data": _values,
              "allow_partial": _scalars, "evaluate": _values})

_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parses_or_refuses(parse, value) -> None:
    try:
        parse(value)
    except SlimkitError:
        pass


@_FUZZ
@given(st.one_of(_recipes, _values))
def test_fuzz_from_dict(data):
    _parses_or_refuses(Recipe.from_dict, data)


@_FUZZ
@given(st.one_of(_recipes.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=200),
                 st.lists(st.sampled_from(["stages:", " - ", "{", "}", "[", "]", ": ", "&a", "*a", "!!str", "<<",
                                           "\n", "  ", "type: RTN", "bits: 8", "'", '"', "#", "?", "%YAML 1.1",
                                           "---", "...", "!!binary", "2001-02-30"]), max_size=30).map("".join)))
def test_fuzz_from_yaml_text(text):
    _parses_or_refuses(Recipe.from_yaml_text, text)
