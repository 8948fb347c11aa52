"""benchmarks.harness: markdown sections written in place, and Table rendering (fast, no models)."""

import os

import pytest

from benchmarks.harness import DEFAULT_HEADER, Table, replace_section, saved_size, write_section

START, END = "<!-- bench:int8:start -->", "<!-- bench:int8:end -->"


def test_write_section_creates_file_with_header(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "int8", "| a |\n|---|\n| 1 |")
    text = path.read_text()
    assert text.startswith(DEFAULT_HEADER)
    assert text.endswith(f"{START}\n| a |\n|---|\n| 1 |\n{END}\n")


def test_write_section_replaces_existing_section_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    before = "# Title\n\nintro line\n\n"
    after = "\n\n## Other\n\nkept <!-- bench:other:start -->x<!-- bench:other:end --> too\n"
    path.write_text(f"{before}{START}\nold table\nold notes\n{END}{after}")
    write_section(path, "int8", "new table\n")
    assert path.read_text() == f"{before}{START}\nnew table\n{END}{after}"
    # Writing again with the same content changes nothing.
    write_section(path, "int8", "new table")
    assert path.read_text() == f"{before}{START}\nnew table\n{END}{after}"


def test_write_section_appends_absent_section_without_touching_others(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    original = f"# Title\n\n{START}\nint8 body\n{END}\n"
    path.write_text(original)
    write_section(path, "pruning", "pruning body")
    text = path.read_text()
    assert text.startswith(original)
    assert text == original + "\n<!-- bench:pruning:start -->\npruning body\n<!-- bench:pruning:end -->\n"
    # Replacing the second section leaves the first byte for byte.
    write_section(path, "pruning", "v2")
    assert path.read_text() == original + "\n<!-- bench:pruning:start -->\nv2\n<!-- bench:pruning:end -->\n"


def test_write_section_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "int8", "body")
    write_section(path, "int8", "body 2")
    assert os.listdir(tmp_path) == ["BENCHMARKS.md"]


def test_section_name_is_not_confused_with_a_prefix():
    text = "<!-- bench:int8-x:start -->\nother\n<!-- bench:int8-x:end -->\n"
    out = replace_section(text, "int8", "mine")
    assert out.startswith(text)
    assert out.endswith(f"{START}\nmine\n{END}\n")


@pytest.mark.parametrize("broken", [
    f"{START}\nno end\n",
    f"{END}\n{START}\n",
    f"{START}\na\n{END}\n{START}\nb\n{END}\n",
])
def test_unbalanced_markers_are_refused_and_file_untouched(tmp_path, broken):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(broken)
    with pytest.raises(ValueError, match="unbalanced"):
        write_section(path, "int8", "body")
    assert path.read_text() == broken


@pytest.mark.parametrize("name", ["", "a b", "x:y", "-->"])
def test_bad_section_names_are_refused(name):
    with pytest.raises(ValueError, match="section name"):
        replace_section("", name, "body")


def test_markdown_holding_the_markers_is_refused():
    with pytest.raises(ValueError, match="markers"):
        replace_section("", "int8", f"oops {END}")


def test_table_markdown_has_header_alignment_and_rows():
    t = Table(["method", "size (B)", "ms"], align="lrc")
    t.add("fp32", "1,024", 3.5).add("int8", None, "x|y")
    assert t.to_markdown() == (
        "| method | size (B) | ms |\n"
        "|:---|---:|:---:|\n"
        "| fp32 | 1,024 | 3.5 |\n"
        "| int8 | — | x\\|y |"
    )
    assert str(t) == t.to_markdown()


def test_table_defaults_and_text_rendering():
    t = Table(["a", "b"], rows=[("1", "22"), ("333", "4\nline")])
    assert t.to_markdown().splitlines()[1] == "|:---|:---|"
    assert t.rows[1] == ["333", "4 line"]
    text = t.to_text().splitlines()
    assert len({len(line) for line in text}) == 1  # padded: every line equally wide
    assert text[0].startswith("| a   |")


def test_table_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Table([])
    with pytest.raises(ValueError):
        Table(["a", "b"], align="l")
    with pytest.raises(ValueError):
        Table(["a"]).add("1", "2")


def test_saved_size_counts_every_file(tmp_path):
    def save(folder):
        (folder / "a.bin").write_bytes(b"x" * 100)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(b"y" * 23)

    assert saved_size(save) == 123
    with pytest.raises(RuntimeError):
        saved_size(lambda folder: None)


def test_timed_interleaved_alternates_order_and_pools_runs():
    from benchmarks.harness import timed_interleaved

    calls = []
    result = timed_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               warmup=2, runs=4, rounds=2, batch_size=8, seq_len=16)
    # round 0: a (2 warm-up + 2 timed), b (same); round 1 reversed: b (1 + 2), a (1 + 2)
    assert "".join(calls) == "aaaabbbbbbbaaa"
    for name in "ab":
        stats = result.stats[name]
        assert stats.runs == 4 and stats.batch_size == 8 and stats.seq_len == 16
        assert stats.min_ms <= stats.median_ms <= stats.max_ms
        assert len(result.round_medians[name]) == 2
    with pytest.raises(ValueError):
        timed_interleaved({"a": lambda: None}, runs=5, rounds=2)


def test_other_load_is_a_fraction_of_the_machine():
    from benchmarks.harness import OtherLoad

    import time

    start = time.perf_counter()
    with OtherLoad() as load:
        while time.perf_counter() - start < 0.3:  # CPU of our own, which must not count as "other"
            sum(range(10_000))
    wall = time.perf_counter() - start
    # /proc/stat and os.times count whole clock ticks: each end of the window may be off by a tick.
    slack = 4 / (os.sysconf("SC_CLK_TCK") * wall * (os.cpu_count() or 1))
    assert load.fraction is None or 0.0 <= load.fraction <= 1.0 + slack


def test_publish_writes_only_full_runs_without_own_failures(tmp_path, capsys):
    from argparse import Namespace

    from benchmarks import harness

    out = tmp_path / "BENCHMARKS.md"
    full = Namespace(quick=False, no_write=False, output=out)
    assert harness.publish(full, "s", "## table", ["slimkit row: boom"]) == 1
    assert not out.exists()
    assert harness.publish(Namespace(quick=True, no_write=False, output=out), "s", "## table", []) == 0
    assert not out.exists()
    assert harness.publish(full, "s", "## table", []) == 0
    assert "## table" in out.read_text()
    assert "<!-- bench:s:start -->" in out.read_text()


def test_publish_rows_blocks_the_write_only_for_a_failed_own_row(tmp_path, capsys):
    from argparse import Namespace

    from benchmarks import harness

    out = tmp_path / "BENCHMARKS.md"
    args = Namespace(quick=False, no_write=False, output=out)
    peer_failed = [Namespace(label="ORT", error="could not run", family="peer"),
                   Namespace(label="slimkit", error=None, family="slimkit")]
    own_failed = [Namespace(label="slimkit GPTQ", error="boom", family="slimkit")]
    assert harness.publish_rows(args, "s", own_failed, "TABLE", "## md") == 1
    assert not out.exists()
    assert "slimkit GPTQ: boom" in capsys.readouterr().err
    assert harness.publish_rows(args, "s", peer_failed, "TABLE", "## md") == 0
    assert "## md" in out.read_text()
    assert "TABLE" in capsys.readouterr().out
