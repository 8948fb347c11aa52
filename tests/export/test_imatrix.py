"""``slimkit.export.imatrix``: llama.cpp importance matrices from slimkit's calibration data.

The sums are checked against a hand computation in float64, the file is read back with the
``gguf`` package's reader, and, where llama.cpp's tools are built (``llama-imatrix``,
``llama-quantize`` under ``$SLIMKIT_BENCH_TOOLS/llama-build/bin`` or on PATH; CI has neither),
the file equals what ``llama-imatrix`` writes for the same tokens and ``llama-quantize
--imatrix`` loads every entry of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")

from slimkit.core.calibration import CalibrationData  # noqa: E402
from slimkit.core.errors import ConfigError  # noqa: E402
from slimkit.export.imatrix import (  # noqa: E402
    collect_imatrix,
    gguf_names_for,
    imatrix_layers,
    read_imatrix,
    write_imatrix,
)
from tests.llm_archs import tiny_causal_lm  # noqa: E402

LAYER_SUFFIXES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tool(name: str) -> Path:
    """A llama.cpp binary, or skip (CI does not build llama.cpp)."""
    root = Path(os.environ.get("SLIMKIT_BENCH_TOOLS", "/work/bench-tools")) / "llama-build" / "bin" / name
    found = root if root.is_file() else (Path(p) if (p := shutil.which(name)) else None)
    if found is None:
        pytest.skip(f"llama.cpp's {name} is not built on this machine")
    return found


def spm_vocab_file() -> Path:
    from benchmarks.peers_generate import llama_cpp_dir

    folder = llama_cpp_dir()
    path = None if folder is None else folder / "models" / "ggml-vocab-llama-spm.gguf"
    if path is None or not path.is_file():
        pytest.skip("llama.cpp's models/ggml-vocab-llama-spm.gguf is not on this machine")
    return path


def ids_batches(rows: list[list[int]], batch_size: int = 2) -> CalibrationData:
    return CalibrationData.from_tensors(torch.tensor(rows), batch_size=batch_size, key="input_ids")


# -- the sums ------------------------------------------------------------------------------
def test_sums_and_counts_equal_a_hand_computation_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(7, 4, 3, dtype=torch.float64)  # 7 rows of 4 tokens
    stats = collect_imatrix(model, CalibrationData.from_tensors(x, batch_size=3))

    flat = x.reshape(-1, 3)
    with torch.no_grad():
        hidden = torch.relu(flat @ model[0].weight.T + model[0].bias)
    assert set(stats.sums) == {"0", "2"}
    assert stats.counts == {"0": 28, "2": 28}
    assert stats.sums["0"].dtype == np.float64
    np.testing.assert_allclose(stats.sums["0"], (flat ** 2).sum(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.sums["2"], (hidden ** 2).sum(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.mean("2"), (hidden ** 2).mean(0).numpy(), rtol=1e-12)
    assert stats.chunk_size == 4 and stats.chunk_count == 7
    assert model.training  # the mode is given back


def test_padding_is_left_out_and_quantized_layers_are_hooked():
    import slimkit as sk

    model = tiny_causal_lm("llama")
    long, short = list(range(3, 11)), list(range(20, 25))
    padded = {"input_ids": torch.tensor([long, short + [0] * 3]),
              "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
    stats = collect_imatrix(model, CalibrationData([padded]))
    one = collect_imatrix(model, ids_batches([long], 1))
    two = collect_imatrix(model, ids_batches([short], 1))
    assert stats.counts["model.layers.0.self_attn.q_proj"] == 13
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        np.testing.assert_allclose(stats.sums[name], one.sums[name] + two.sums[name], rtol=1e-5)

    quantized = tiny_causal_lm("llama")
    sk.quantize_(quantized, sk.RTN(bits=4, group_size=32))
    assert type(imatrix_layers(quantized)["model.layers.0.self_attn.q_proj"]).__name__ == "QuantLinear"
    q = collect_imatrix(quantized, ids_batches([long], 1))
    assert set(q.sums) == set(one.sums)
    # layer 0's q/k/v read the normed embedding, which quantizing the Linears does not change
    np.testing.assert_allclose(q.sums["model.layers.0.self_attn.q_proj"], one.sums["model.layers.0.self_attn.q_proj"],
                               rtol=1e-6)
    assert not np.allclose(q.sums["model.layers.1.mlp.down_proj"], one.sums["model.layers.1.mlp.down_proj"])


# -- the file ------------------------------------------------------------------------------
def test_file_holds_llama_cpp_names_sums_counts_and_keys(tmp_path):
    model = tiny_causal_lm("llama", layers=2)
    stats = collect_imatrix(model, ids_batches([list(range(1, 17)), list(range(30, 46)), list(range(60, 76))]))
    name_of = gguf_names_for(model)
    assert name_of("model.layers.1.self_attn.q_proj") == "blk.1.attn_q.weight"
    assert name_of("model.layers.0.mlp.down_proj") == "blk.0.ffn_down.weight"
    assert name_of("lm_head") is None and gguf_names_for(model, include_output=True)("lm_head") == "output.weight"

    path = write_imatrix(stats, tmp_path / "m.imatrix.gguf", name_of, dataset="calib.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.imatrix.gguf"]  # no temporary left
    reader = gguf.GGUFReader(path)
    kv = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(kv) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert kv["general.type"].contents() == "imatrix"
    assert kv["imatrix.datasets"].contents() == ["calib.txt"]
    assert [t.name for t in kv["imatrix.datasets"].types] == ["ARRAY", "STRING"]
    assert kv["imatrix.chunk_count"].contents() == 3 and kv["imatrix.chunk_size"].contents() == 16
    assert [t.name for t in kv["imatrix.chunk_count"].types] == ["UINT32"]

    expected = sorted(f"blk.{i}.{s}.weight" for i in range(2) for s in LAYER_SUFFIXES)
    names = [t.name for t in reader.tensors]
    assert names == [f"{n}.{part}" for n in expected for part in ("in_sum2", "counts")]
    by_name = {t.name: t for t in reader.tensors}
    for i in range(2):
        for suffix, module in (("attn_q", "self_attn.q_proj"), ("ffn_down", "mlp.down_proj")):
            sums, counts = by_name[f"blk.{i}.{suffix}.weight.in_sum2"], by_name[f"blk.{i}.{suffix}.weight.counts"]
            assert sums.tensor_type.name == counts.tensor_type.name == "F32"
            src = stats.sums[f"model.layers.{i}.{module}"]
            assert sums.shape.tolist() == [src.size] and counts.shape.tolist() == [1]
            np.testing.assert_allclose(np.asarray(sums.data), src.astype(np.float32), rtol=0)
            assert float(np.asarray(counts.data)[0]) == 48.0
    back = read_imatrix(path)
    assert back["counts"]["blk.0.attn_k.weight"] == 48 and set(back["sums"]) == set(expected)


def test_two_layers_on_one_name_or_none_mapped_is_refused(tmp_path):
    model = tiny_causal_lm("llama", layers=1)
    stats = collect_imatrix(model, ids_batches([list(range(1, 9))], 1))
    with pytest.raises(ConfigError, match="both map"):
        write_imatrix(stats, tmp_path / "x.gguf", lambda n: "blk.0.attn_q.weight")
    with pytest.raises(ConfigError, match="no layer"):
        write_imatrix(stats, tmp_path / "x.gguf", lambda n: None)
    assert list(tmp_path.iterdir()) == []


# -- llama.cpp reads it --------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny random Llama with llama.cpp's 32000-token Llama-2 vocabulary, as an f32 GGUF file."""
    export = pytest.importorskip("slimkit.export.gguf")
    vocab = spm_vocab_file()
    model = tiny_causal_lm("llama", layers=2, width=64, vocab=32000, positions=256)
    path = tmp_path_factory.mktemp("spm") / "f32.gguf"
    export.export_gguf(model, path, qtype="f32", vocab_from=vocab)
    return model, path


def test_llama_imatrix_writes_the_same_file_for_the_same_tokens(spm_model, tmp_path):
    """llama-imatrix on a text and collect_imatrix on the token ids llama.cpp makes of it (each chunk starting with
    BOS, as llama-imatrix does) give the same names, counts and sums (float32 accumulation on llama.cpp's side)."""
    binary = tool("llama-imatrix")
    lc = pytest.importorskip("llama_cpp")
    model, f32 = spm_model
    text = (Path(__file__).read_text() + "\n") * 3
    (tmp_path / "text.txt").write_text(text)
    ctx, chunks = 64, 3
    proc = subprocess.run([str(binary), "-m", str(f32), "-f", str(tmp_path / "text.txt"), "-o",
                           str(tmp_path / "llama.gguf"), "-c", str(ctx), "--chunks", str(chunks), "-t", "2",
                           "--no-ppl"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]

    llm = lc.Llama(model_path=str(f32), n_ctx=ctx, vocab_only=True, verbose=False)
    try:
        bos, add_bos = llm.token_bos(), llm._model.add_bos_token()
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=False)  # as llama-imatrix tokenizes the file
    finally:
        llm.close()
    rows = [ids[i * ctx:(i + 1) * ctx] for i in range(chunks)]
    if add_bos:
        rows = [[bos] + r[1:] for r in rows]
    ours = write_imatrix(collect_imatrix(model, ids_batches(rows, 2)), tmp_path / "ours.gguf", gguf_names_for(model),
                         dataset="text.txt")

    a, b = read_imatrix(ours), read_imatrix(tmp_path / "llama.gguf")
    assert a["kv"] == {**b["kv"], "imatrix.datasets": ["text.txt"]}
    assert a["counts"] == b["counts"] and len(a["counts"]) == 14
    for name, theirs in b["sums"].items():
        np.testing.assert_allclose(a["sums"][name], theirs, rtol=1e-3, atol=1e-4 * float(np.abs(theirs).max()),
                                   err_msg=name)


def test_llama_quantize_loads_every_entry(spm_model, tmp_path):
    binary = tool("llama-quantize")
    model, f32 = spm_model
    rows = [[(7 * i + 13 * j) % 32000 for j in range(32)] for i in range(4)]
    imatrix = write_imatrix(collect_imatrix(model, ids_batches(rows)), tmp_path / "m.imatrix.gguf",
                            gguf_names_for(model))
    out = tmp_path / "q4_k.gguf"
    proc = subprocess.run([str(binary), "--imatrix", str(imatrix), str(f32), str(out), "Q4_K_S", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-2000:]
    assert "loaded 14 importance matrix entries" in log and "computed on 4 chunks" in log
    assert "have 14 importance matrix entries" in log
    reader = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in reader.fields.items() if k.startswith("quantize.imatrix")}
    assert kv["quantize.imatrix.entries_count"] == 14 and kv["quantize.imatrix.dataset"] == "slimkit calibration"
