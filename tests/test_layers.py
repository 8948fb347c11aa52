"""The layers of docs/architecture.md are checked, not just described.

- import-linter's contracts in pyproject.toml: core < tasks < families < evaluation/export <
  recipe < api < cli, the families independent of each other, nothing below recipe
  importing the zoo;
- no code outside ``zoo/`` and ``tasks/`` compares anything with a model kind or a zoo name
  (the tasks answer such questions).
"""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

import slimkit

PACKAGE = pathlib.Path(slimkit.__file__).parent
ROOT = PACKAGE.parent
KINDS = {"causal-lm", "encoder", "classifier", "image-classifier"}  # ("module" also names an architecture source)
ZOO_NAMES = {"stdlib-coder", "stdlib-coder-student", "digits-cnn", "minilm", "stdlib", "stdlib-sentences", "digits"}


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'slimkit[test]')")
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": str(pathlib.Path(sys.executable).parent)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in r.stdout, r.stdout[-3000:]


def _branch_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants compared with (==, !=, in, match case) or used as dict keys / tuple members
    of a membership test: the ways code branches on a value."""
    found = []
    for node in ast.walk(tree):
        values: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            for comparator in [node.left, *node.comparators]:
                values.append(comparator)
                if isinstance(comparator, (ast.Tuple, ast.List, ast.Set)):
                    values.extend(comparator.elts)
        elif isinstance(node, ast.Dict):
            values.extend(k for k in node.keys if k is not None)
        elif isinstance(node, ast.MatchValue):
            values.append(node.value)
        found += [(v.lineno, v.value) for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return found


def test_no_model_kind_or_zoo_name_branch_outside_zoo_and_tasks():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("zoo", "tasks"):
            continue
        for line, value in _branch_literals(ast.parse(path.read_text())):
            if value in KINDS or value in ZOO_NAMES:
                offenders.append(f"{rel}:{line}: {value!r}")
    assert not offenders, "ask the task instead of branching on a kind or zoo name:\n" + "\n".join(offenders)


def test_the_branch_finder_finds_branches():
    tree = ast.parse('if kind == "encoder": pass\nx = {"digits-cnn": 1}\ny = kind in ("causal-lm", "b")')
    assert [v for _, v in _branch_literals(tree)] == ["encoder", "digits-cnn", "causal-lm", "b"]
