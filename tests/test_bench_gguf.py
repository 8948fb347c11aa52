"""benchmarks.bench_gguf: the verdicts and the grid check, on made-up rows and small GGUF files (no llama.cpp run)."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from benchmarks import bench_gguf  # noqa: E402


def _rows(ppl: dict[str, float]) -> list:
    rows = bench_gguf.build_rows()
    for r in rows:
        r.ppl = {t: ppl.get(r.id, 30.0) + (5 if t == bench_gguf.TEXTS[1] else 0) for t in bench_gguf.TEXTS}
        r.file_bytes = 1000
    return rows


def test_gap_closed_and_verdicts():
    rows = _rows({"f32": 10.0, "lc-q4_0-pure": 11.0, "sk-gptq-q4_0": 10.4, "lc-q4_0": 10.8, "sk-gptq-q4_0-mix": 10.6,
                  "sk-rtn-q4_0-blocks": 10.5, "sk-gptq-q4_0-blocks": 10.2,
                  "sk-gptq-q4_k": 10.3, "lc-q4_k-pure-imx": 10.35})
    text = bench_gguf.TEXTS[0]
    assert bench_gguf.gap_closed(rows, "sk-gptq-q4_0", "lc-q4_0-pure", text) == pytest.approx(0.6)
    lines = bench_gguf.target_lines(rows, {})
    q4_0 = [line for line in lines if line.startswith(f"- Q1 q4_0, {text}, against llama.cpp Q4_0 --pure")]
    assert "closes 60%" in q4_0[0] and "met" in q4_0[0]
    mix = [line for line in lines if line.startswith(f"- Q1 q4_0, {text}, against llama.cpp's default")]
    assert "closes 25%" in mix[0] and "MISSED" in mix[0]
    where = [line for line in lines if line.startswith(f"- Where the q4_0 gap lies, {text}")][0]
    assert "accounts for 20%" in where and "for 50%" in where and "closes 60% of the blocks' own gap" in where
    q4_k = [line for line in lines if line.startswith(f"- Q1 q4_k, {text}")][0]
    assert "target: lower: met" in q4_k


def _q4_0_file(path, data: np.ndarray) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_identical_blocks_counts_blocks_and_code_differences(tmp_path):
    from gguf.quants import quantize

    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    a = quantize(w, gguf.GGMLQuantizationType.Q4_0)  # (4, 2 blocks * 18 bytes)
    b = a.copy()
    b[1, 2] ^= 0x01  # one code of block 2 off by one (low nibble's lowest bit)
    _q4_0_file(tmp_path / "a.gguf", a)
    _q4_0_file(tmp_path / "b.gguf", b)
    check = bench_gguf.identical_blocks(tmp_path / "a.gguf", tmp_path / "b.gguf")
    assert (check["same"], check["total"], check["differ"]) == (7, 8, [])
    assert check["same_scale"] == 1.0 and check["max_code_diff"] == 1
