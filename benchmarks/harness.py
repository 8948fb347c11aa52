"""The shared benchmark protocol (see BENCHMARKS.md in the shared notes).

- ``set_threads(2)``: the thread count every timing runs at (torch intra-op threads, plus
  ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for libraries that read them at start-up).
- ``timed(fn)``: ``warmup`` untimed calls, then the median (and spread) of ``runs`` timed
  calls, through slimkit's own ``measure_latency`` so benchmarks and reports time alike;
  ``timed_interleaved(fns)``: the same for several functions in alternating rounds, so
  that a machine slowing down mid-run does not favour whichever was timed last.
- ``saved_size(...)``: bytes on disk of a saved artifact, every file counted.
- ``environment()``: where and how a run happened (date, CPU, versions, threads, command).
- ``Table``: a GitHub-markdown table; ``write_section``: replace one marked section of a
  markdown file (``<!-- bench:NAME:start -->`` ... ``<!-- bench:NAME:end -->``) atomically.

Benchmarks are not tests: these helpers measure, they never assert a target.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from slimkit.core.measure import load_average  # the one definition, shared with slimkit's reports

BENCHMARKS_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"

# Written only when the markdown file does not exist yet.
DEFAULT_HEADER = (
    "# slimkit benchmarks\n\n"
    "Every table below is written by a script in `benchmarks/` (run as `python -m benchmarks.<script>`); "
    "each section opens with the date, the machine and the exact command of the run that produced it.\n"
)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ---------------------------------------------------------------------------------------
# Threads and timing
# ---------------------------------------------------------------------------------------


def set_threads(n: int = 2) -> int:
    """Run torch (and OpenMP/MKL, where read after this call) on ``n`` threads; returns torch's count.

    The environment variables only reach libraries that have not started their thread
    pools yet, so call this first thing in a benchmark's ``main``.
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    for key in _THREAD_ENV:
        os.environ[key] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # may be set only once per process, before any inter-op work; intra-op is what matters
    return torch.get_num_threads()


def timed(fn: Callable[[], Any], warmup: int = 3, runs: int = 10, **kw: Any):
    """``slimkit.core.measure.measure_latency(fn, ...)`` at the current torch thread count.

    Keyword arguments (``batch_size``, ``seq_len``) describe one call. Returns LatencyStats
    (median_ms, min/max/mean, runs, warmup, threads, ...).
    """
    import torch

    from slimkit.core.measure import measure_latency

    kw.setdefault("threads", torch.get_num_threads())
    return measure_latency(fn, warmup=warmup, runs=runs, **kw)


class OtherLoad:
    """Context manager: the share of the machine's CPU time that went to anything but this process.

    From ``/proc/stat`` (busy jiffies of all CPUs, steal included: a hypervisor taking the
    CPU away distorts timings as much as a neighbour process) minus this process's own CPU
    time (``os.times``), over the wall time of the block times the CPU count. ``fraction``
    is None where /proc/stat cannot be read (not Linux).
    """

    fraction: float | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> OtherLoad:
        self._busy, self._own, self._wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = self._busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (self._own_seconds() - self._own)
        self.fraction = max(0.0, others) / (wall * (os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """Result of ``timed_interleaved``: pooled stats per name, each round's median per name
    (drift), and the share of CPU time other processes took meanwhile (None if unknown)."""

    stats: dict[str, Any]
    round_medians: dict[str, list[float]]
    other_load: float | None = None


def timed_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 3, runs: int = 20, rounds: int = 4,
                      **kw: Any) -> Interleaved:
    """Time several functions in alternating rounds, so drift on a shared machine falls on all alike.

    Round r calls every function in turn (order reversed on odd rounds): ``warmup`` untimed
    calls in the first round and one in later rounds (caches re-warm after the others ran),
    then ``runs / rounds`` calls, each timed by ``measure_latency``. A function's stats pool
    its ``runs`` timed calls (median, mean, min, max); ``round_medians`` shows how the
    machine drifted. Keyword arguments (``batch_size``, ``seq_len``) describe one call.
    """
    import statistics

    import torch

    from slimkit.core.measure import LatencyStats, measure_latency

    if rounds < 1 or runs < rounds or runs % rounds:
        raise ValueError(f"runs ({runs}) must be a positive multiple of rounds ({rounds})")
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    round_medians: dict[str, list[float]] = {n: [] for n in names}
    threads = torch.get_num_threads()
    with OtherLoad() as load:
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                for _ in range(warmup if r == 0 else 1):
                    fns[name]()
                block = [measure_latency(fns[name], warmup=0, runs=1, threads=threads).median_ms
                         for _ in range(runs // rounds)]
                samples[name] += block
                round_medians[name].append(statistics.median(block))
    stats = {name: LatencyStats.from_samples(times, warmup=warmup, threads=threads, batch_size=kw.get("batch_size"),
                                             seq_len=kw.get("seq_len"))
             for name, times in samples.items()}
    return Interleaved(stats, round_medians, load.fraction)


# ---------------------------------------------------------------------------------------
# Size on disk
# ---------------------------------------------------------------------------------------


def saved_size(model_or_save_fn: Any) -> int:
    """Bytes on disk of a saved artifact, all files counted.

    Given an ``nn.Module``: the folder ``slimkit.save`` writes. Given a callable: it is
    called with a fresh, empty directory (a ``Path``) and must write its files there.
    The temporary directory is removed afterwards.
    """
    from torch import nn

    from slimkit.core.measure import size_on_disk

    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        if isinstance(model_or_save_fn, nn.Module):
            from slimkit.core.io import save

            target = Path(tmp) / "model"
            save(model_or_save_fn, target)
            return size_on_disk(target)
        if not callable(model_or_save_fn):
            raise TypeError(f"saved_size takes an nn.Module or a callable(dir), got {type(model_or_save_fn).__name__}")
        folder = Path(tmp) / "artifact"
        folder.mkdir()
        model_or_save_fn(folder)
        size = size_on_disk(folder)
        if size == 0:
            raise RuntimeError("the save function wrote nothing into the directory it was given")
        return size


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _slimkit_version() -> str:
    """slimkit's version, with the git commit of the checkout when there is one (read-only git call)."""
    import subprocess

    import slimkit

    version = slimkit.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(slimkit.__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version} (git {commit})" if commit else version


def command_line() -> str:
    """The command that started this process, as one would type it (``python -m pkg.mod args``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        args = ["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    else:
        args = ["python", *sys.argv]
    return shlex.join(args)


def environment() -> dict[str, Any]:
    """Date, machine, CPU, cores, package versions, thread count and command of this run."""
    import torch

    flags = _cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()} ({platform.node()})",
        "cpu": _cpu_model() + (f" [{', '.join(simd)}]" if simd else ""),
        "cores": f"{usable} usable of {os.cpu_count()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "torchao": _version("torchao"),
        "slimkit": _slimkit_version(),
        "threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "command": command_line(),
    }


def environment_line(env: dict[str, Any]) -> str:
    """One markdown line stating an ``environment()`` dict."""
    return (
        f"Run {env['date']} on {env['cpu']}, {env['cores']} cores, {env['threads']} torch threads; "
        f"slimkit {env['slimkit']}, Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"torchao {env['torchao']}, onnxruntime {env['onnxruntime']}; 1-min load average at start "
        f"{env['load_average_1min']}. Command: `{env['command']}`"
    )


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A value as table-cell text: None -> an em dash, pipes escaped, newlines flattened."""
    if value is None:
        return "—"
    text = str(value).replace("\r\n", " ").replace("\n", " ").replace("|", "\\|")
    return text.strip()


class Table:
    """A GitHub-markdown table: a header row, an alignment row, then the rows.

    ``align`` is one letter per column: ``l`` (default), ``r`` or ``c``.

    >>> t = Table(["name", "ms"], align="lr").add("fp32", "1.5")
    >>> print(t.to_markdown())
    | name | ms |
    |:---|---:|
    | fp32 | 1.5 |
    """

    def __init__(self, headers: Sequence[Any], rows: Iterable[Sequence[Any]] = (), align: str | None = None):
        if not headers:
            raise ValueError("a table needs at least one column")
        self.headers = [_cell(h) for h in headers]
        align = align or "l" * len(self.headers)
        if len(align) != len(self.headers) or set(align) - set("lrc"):
            raise ValueError(f"align must be one of l/r/c per column ({len(self.headers)}), got {align!r}")
        self.align = align
        self.rows: list[list[str]] = []
        for row in rows:
            self.add(*row)

    def add(self, *cells: Any) -> Table:
        """Append a row; it must have one cell per column."""
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells, the table has {len(self.headers)} columns")
        self.rows.append([_cell(c) for c in cells])
        return self

    def to_markdown(self) -> str:
        """The table as GitHub markdown (no trailing newline)."""
        rule = {"l": ":---", "r": "---:", "c": ":---:"}
        lines = ["| " + " | ".join(self.headers) + " |",
                 "|" + "|".join(rule[a] for a in self.align) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_text(self) -> str:
        """The same table with padded columns, for a terminal (still valid markdown)."""
        widths = [max(len(h), 3, *(len(r[i]) for r in self.rows)) for i, h in enumerate(self.headers)]

        def fmt(cells: list[str]) -> str:
            out = []
            for c, w, a in zip(cells, widths, self.align):
                out.append(c.rjust(w) if a == "r" else c.center(w) if a == "c" else c.ljust(w))
            return "| " + " | ".join(out) + " |"

        rule = {"l": lambda w: ":" + "-" * (w + 1), "r": lambda w: "-" * (w + 1) + ":",
                "c": lambda w: ":" + "-" * w + ":"}
        lines = [fmt(self.headers), "|" + "|".join(rule[a](w) for a, w in zip(self.align, widths)) + "|"]
        lines += [fmt(r) for r in self.rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _markers(name: str) -> tuple[str, str]:
    if not _NAME.match(name):
        raise ValueError(f"section name must be letters, digits, '.', '_' or '-', got {name!r}")
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_section(text: str, section_name: str, markdown: str) -> str:
    """``text`` with the body of section ``section_name`` replaced by ``markdown`` (appended if absent).

    Everything outside the two markers is kept byte for byte. A file holding a start
    marker without its end marker (or either twice) is refused with ValueError rather
    than guessed at.
    """
    start, end = _markers(section_name)
    body = markdown.strip("\n")
    if start in body or end in body:
        raise ValueError(f"the markdown of section {section_name!r} must not contain its own markers")
    block = f"{start}\n{body}\n{end}"
    n_start, n_end = text.count(start), text.count(end)
    if n_start == n_end == 0:
        if not text.strip():
            return block + "\n"
        return text.rstrip("\n") + "\n\n" + block + "\n"
    if n_start != 1 or n_end != 1 or text.index(start) > text.index(end):
        raise ValueError(f"section {section_name!r} markers are unbalanced ({n_start} start, {n_end} end); "
                         "fix the file by hand")
    i, j = text.index(start), text.index(end) + len(end)
    return text[:i] + block + text[j:]


def write_section(path: str | os.PathLike, section_name: str, markdown: str,
                  header: str = DEFAULT_HEADER) -> Path:
    """Replace (or append) section ``section_name`` of the markdown file ``path``, atomically.

    A file that does not exist yet starts with ``header``. Returns the path.
    """
    from slimkit.core.atomic import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else header
    atomic_write_text(path, replace_section(text, section_name, markdown))
    return path


# ---------------------------------------------------------------------------------------
# Failures as results
# ---------------------------------------------------------------------------------------


def why(stage: str, exc: BaseException) -> str:
    """One line saying which stage failed and how (the exception's first line)."""
    first = (str(exc).strip().splitlines() or [""])[0][:240]
    return f"{stage} failed: {type(exc).__name__}: {first}"


def guard(row: Any, stage: str, fn: Callable[[], Any]) -> Any:
    """Run one stage of a benchmark row (an object with ``label`` and ``error``).

    A row that already failed is skipped; an exception becomes the row's recorded reason
    (printed with a short traceback on stderr) instead of ending the run: a peer that
    cannot run here is a result to report.
    """
    if row.error:
        return None
    try:
        return fn()
    except Exception as exc:
        row.error = why(stage, exc)
        print(f"  ! {row.label}: {row.error}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
        return None


def timed_row(row: Any, fn: Callable[[], Any]) -> Any:
    """``fn()``, putting its wall seconds on ``row.seconds`` and other processes' CPU share on ``row.other_load``."""
    with OtherLoad() as load:
        t = time.perf_counter()
        out = fn()
        row.seconds = time.perf_counter() - t
    row.other_load = load.fraction
    print(f"    {row.seconds:.2f} s", flush=True)
    return out


def perplexity_rows(rows: Sequence[Any], token_ids: Any) -> None:
    """Sliding-window perplexity (slimkit's context and stride) of every row with a model ``row.lm``, into ``row.ppl``.

    A failure becomes the row's recorded reason (``guard``), so one broken row does not end the run.
    """
    from slimkit.tasks.metrics import perplexity
    from slimkit.evaluation.suite import PPL_CONTEXT, PPL_STRIDE

    for row in rows:
        if row.lm is None:
            continue
        print(f"  perplexity: {row.label}", flush=True)
        result = guard(row, "perplexity",
                       lambda row=row: perplexity(row.lm, token_ids, context=PPL_CONTEXT, stride=PPL_STRIDE))
        row.ppl = None if result is None else result.perplexity


def bench_parser(name: str, description: str, quick: str, no_write: str = "print the table only; leave BENCHMARKS.md alone"):
    """The argument parser every benchmark starts from: ``--quick`` (help ``quick``), ``--no-write`` and the hidden ``--output``.

    ``name`` is the module under ``benchmarks`` (the program is ``python -m benchmarks.<name>``);
    a benchmark adds its own options to the returned parser.
    """
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--no-write", action="store_true", help=no_write)
    parser.add_argument("--output", type=Path, default=BENCHMARKS_FILE, help=argparse.SUPPRESS)
    return parser


def parts_type(known: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type`` for ``--parts a,b``: the named parts, in ``known``'s order; unknown names refused."""
    import argparse

    def parse(text: str) -> tuple[str, ...]:
        parts = tuple(p.strip() for p in text.split(",") if p.strip())
        bad = [p for p in parts if p not in known]
        if bad or not parts:
            raise argparse.ArgumentTypeError(f"unknown part {bad[0] if bad else text!r}; choose from {', '.join(known)}")
        return tuple(p for p in known if p in parts)

    return parse


def publish(args: Any, section: str, markdown: str, own_failures: list[str]) -> int:
    """End a benchmark run: the exit code, and the section written into ``args.output`` when it should be.

    Nothing is written when one of slimkit's own (or the fp32) rows failed, or with
    ``--quick`` / ``--no-write``; ``own_failures`` lists "label: reason" of the rows that failed.
    """
    if own_failures:
        print("fp32/slimkit rows failed, BENCHMARKS.md not written:\n  " + "\n  ".join(own_failures), file=sys.stderr)
        return 1
    if args.quick or args.no_write:
        print("(not written: " + ("--quick" if args.quick else "--no-write") + ")")
    else:
        path = write_section(args.output, section, markdown)
        print(f"written: section {section!r} of {path}")
    return 0


def publish_rows(args: Any, section: str, rows: Sequence[Any], table_text: str, markdown: str) -> int:
    """Print a run's table and markdown, then ``publish`` it; rows whose ``family`` is not "peer" count as own.

    ``rows`` have ``label``, ``error`` and ``family``: a failed fp32/slimkit row keeps the
    section from being written (a peer that cannot run is a result to report).
    """
    print()
    print(table_text)
    print()
    print(markdown)
    own_failures = [f"{r.label}: {r.error}" for r in rows if r.error and r.family != "peer"]
    return publish(args, section, markdown, own_failures)
