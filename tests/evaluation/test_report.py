import base64
import json
import re

import pytest
from rich.console import Console

from slimkit.core.errors import DataError
from slimkit.core.measure import LatencyStats
from slimkit.evaluation.report import (
    QUALITY_DIRECTIONS,
    CompressionReport,
    ModelMeasurement,
    environment_info,
)

ENV = {"slimkit": "0.0-test", "torch": "2.x", "python": "3.x", "cpu_count": 2, "torch_threads": 2, "date": "2026-01-01"}


def _latency(median, throughput):
    return LatencyStats(
        median_ms=median, mean_ms=median + 1, min_ms=median - 1, max_ms=median + 2,
        runs=10, warmup=3, threads=2, batch_size=32, seq_len=128, throughput=throughput,
    )


def _report(per_layer=True, missing=False):
    baseline = ModelMeasurement(
        name="minilm-fp32", kind="encoder", size_bytes=100_000_000, params_total=1000, params_nonzero=1000,
        flops=8_000_000_000, latency=_latency(20.0, 1600.0),
        quality={"perplexity": 12.0, "accuracy": 0.9, "mean_cosine": 1.0},
        layer_sparsity={"layer.0": 0.0, "layer.1": 0.0} if per_layer else {},
        details={"quality data": "stdlib eval split, 40k tokens, context 256 stride 128"},
    )
    compressed = ModelMeasurement(
        name="minilm-int8", kind="encoder", size_bytes=None if missing else 25_000_000,
        params_total=500, params_nonzero=250, flops=None if missing else 2_000_000_000,
        latency=None if missing else _latency(5.0, 6400.0),
        quality={"perplexity": 12.5, "mean_cosine": 0.995, "top1_agreement": 0.97},
        layer_sparsity={"layer.0": 0.5, "layer.1": 0.25} if per_layer else {},
        layer_bits={"layer.0": 8.0, "layer.1": 4.25} if per_layer else {},
        details={"calibration": "64 samples", "seed": 0},
    )
    return CompressionReport(
        baseline=baseline,
        compressed=compressed,
        steps=[{"type": "Wanda", "sparsity": 0.5}, {"type": "GPTQ", "bits": 4, "group_size": 128, "ignore": ["lm_head"]}],
        notes=["skipped lm_head: tied to the embedding"],
        environment=dict(ENV),
    )


def test_directions_table():
    assert QUALITY_DIRECTIONS["perplexity"] == "lower" and QUALITY_DIRECTIONS["top1_agreement"] == "higher"


def test_json_round_trip_is_exact(tmp_path):
    for report in (_report(), _report(per_layer=False, missing=True)):
        again = CompressionReport.from_json(report.to_json())
        assert again == report
        assert CompressionReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
        assert ModelMeasurement.from_dict(report.compressed.to_dict()) == report.compressed


def test_from_dict_rejects_unknown_keys_by_name():
    data = _report().to_dict()
    data["baseline"]["size_byte"] = 1
    with pytest.raises(DataError, match="size_byte.*size_bytes"):
        CompressionReport.from_dict(data)
    with pytest.raises(DataError):
        CompressionReport.from_json("{not json")


def test_derived_figures_by_hand():
    r = _report()
    assert r.compression_ratio == pytest.approx(4.0)
    assert r.param_ratio == pytest.approx(2.0)
    assert r.speedup == pytest.approx(4.0)
    # accuracy only in the baseline, top1_agreement only in the compressed: no delta for either
    assert r.quality_deltas == pytest.approx({"perplexity": 0.5, "mean_cosine": -0.005})


def test_missing_figures_are_none_and_render_as_na():
    r = _report(per_layer=False, missing=True)
    assert r.compression_ratio is None and r.speedup is None
    md = r.to_markdown()
    assert "| Size on disk (MB) | 100 | n/a | n/a |" in md
    assert "| GFLOPs | 8 | n/a | n/a |" in md
    assert re.search(r"\| Latency median \(ms\)[^|]*\| 20 \| n/a \| n/a \|", md)
    assert "| Throughput (items/s) | 1600 | n/a | n/a |" in md
    assert "| accuracy | 0.9 | n/a | n/a |" in md
    assert "| top1_agreement | n/a | 0.97 | n/a |" in md
    assert not re.search(r"\| 0(\.0+)?x? \|", md)  # nothing missing shows up as a zero


def test_markdown_contains_numbers_steps_notes_environment():
    md = _report().to_markdown()
    assert "| Size on disk (MB) | 100 | 25 | 0.25x |" in md
    assert "| Parameters | 1,000 | 500 | 0.50x |" in md
    assert "| Nonzero parameters | 1,000 | 250 | 0.25x |" in md
    assert "| GFLOPs | 8 | 2 | 0.25x |" in md
    assert "| Latency median (ms) [threads=2, batch=32, seq=128] | 20 | 5 | 0.25x |" in md
    assert "| Throughput (items/s) | 1600 | 6400 | 4.00x |" in md
    assert "| perplexity | 12 | 12.5 | +0.5 (worse) |" in md
    assert "| mean_cosine | 1 | 0.995 | -0.005 (worse) |" in md
    assert "| layer.1 | 0 | 0.25 | n/a | 4.25 |" in md
    assert '`{"type": "GPTQ", "bits": 4, "group_size": 128, "ignore": ["lm_head"]}`' in md
    assert "- skipped lm_head: tied to the embedding" in md
    assert "- quality data: stdlib eval split, 40k tokens, context 256 stride 128" in md
    assert "- slimkit: 0.0-test" in md


def test_better_and_worse_follow_directions():
    r = _report()
    r.compressed.quality.update({"accuracy": 0.95, "perplexity": 11.0})
    md = r.to_markdown()
    assert "| accuracy | 0.9 | 0.95 | +0.05 (better) |" in md
    assert "| perplexity | 12 | 11 | -1 (better) |" in md


def test_latency_label_shows_both_settings_when_they_differ():
    r = _report()
    r.compressed.latency = LatencyStats(5.0, 5.0, 5.0, 5.0, 10, 3, 1, 32, 128, 6400.0)
    assert "[baseline threads=2, batch=32, seq=128; compressed threads=1, batch=32, seq=128]" in r.to_markdown()


def _images(page):
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


@pytest.fixture(scope="module")
def pages():
    """Rendered once: plotting is the slow part of these tests."""
    return {"full": _report().to_html(), "no_layers": _report(per_layer=False).to_html()}


def test_html_is_self_contained_with_plots(pages):
    page = pages["full"]
    images = _images(page)
    assert len(images) == 2 and 'id="per-layer-plot"' in page and 'id="size-quality-plot"' in page
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    for text in ("0.25x", "+0.5 (worse)", "Wanda", "skipped lm_head", "0.0-test"):
        assert text in page


def test_html_skips_per_layer_plot_without_per_layer_data(pages):
    page = pages["no_layers"]
    assert len(_images(page)) == 1 and "per-layer-plot" not in page
    # Only bits for one model is still per-layer data.
    r = _report(per_layer=False)
    r.compressed.layer_bits = {"fc": 4.0}
    assert "per-layer-plot" in r.to_html()


def test_html_without_any_plottable_point_says_so():
    r = _report(per_layer=False, missing=True)
    r.baseline.size_bytes = None
    page = r.to_html()
    assert _images(page) == [] and "n/a: size on disk or quality was not measured" in page


def test_rich_table_renders_values_and_colours():
    console = Console(record=True, width=120)
    console.print(_report().to_rich_table())
    text = console.export_text(clear=False)
    for value in ("Size on disk (MB)", "0.25x", "1,000", "6400", "4.00x", "+0.5 (worse)", "0.995", "threads=2"):
        assert value in text
    styled = console.export_text(styles=True)
    assert re.search(r"\x1b\[31m\s*\+0\.5 \(worse\)", styled)  # red
    assert re.search(r"\x1b\[32m\s*0\.25x", styled)  # smaller size is green
    missing = Console(record=True, width=120)
    missing.print(_report(missing=True).to_rich_table())
    assert "n/a" in missing.export_text()


def test_write_outputs_three_files(tmp_path):
    r = _report()
    paths = r.write(tmp_path / "out")
    assert {p.name for p in paths.values()} == {"report.md", "report.json", "report.html"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json", "report.md"]
    assert CompressionReport.from_json(paths["json"].read_text()) == r
    assert paths["markdown"].read_text() == r.to_markdown()


def test_environment_info_fields():
    env = environment_info()
    assert set(env) >= {"slimkit", "torch", "python", "platform", "machine", "cpu_count", "torch_threads", "date"}
    assert isinstance(env["torch_threads"], int) and env["torch_threads"] >= 1


def test_evaluation_modules_import_no_heavy_dependencies_at_top_level():
    # Importing slimkit.evaluation or slimkit.tasks must stay lean: transformers/onnx/matplotlib only inside functions.
    import ast
    import pathlib

    import slimkit.evaluation
    import slimkit.tasks

    paths = [p for pkg in (slimkit.evaluation, slimkit.tasks) for p in pathlib.Path(pkg.__file__).parent.glob("*.py")]
    assert len(paths) >= 10
    for path in sorted(paths):
        name = path.name
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        modules += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        heavy = {"transformers", "onnx", "onnxruntime", "matplotlib", "datasets", "pyarrow", "PIL"}
        assert not [m for m in modules if m.split(".")[0] in heavy], name
