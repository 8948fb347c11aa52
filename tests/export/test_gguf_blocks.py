"""GGUF block encodings: the ``gguf`` package's own dequantization of every encoded tensor equals slimkit's weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError
from slimkit.export.gguf_blocks import (
    encode_dense,
    encode_module,
    fitting_types,
    pack_k_scales,
    pack_q4_k,
    pack_q6_k,
    row_type,
)
from slimkit.quantization.grids import GRIDS
from slimkit.quantization.modules import QuantEmbedding, QuantLinear
from slimkit.quantization.primitives import quantize_weight

gguf = pytest.importorskip("gguf")
from gguf import quants


def _dequant(enc) -> np.ndarray:
    """The gguf package's reading of an encoded tensor, as (rows, cols) float32."""
    return quants.dequantize(enc.data, enc.ggml_type).reshape(enc.shape)


def _linear(rows: int, cols: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(cols, rows, bias=False)
    lin.weight.data[0, :40] = 0.0  # pruned run: zeros must survive
    return lin


@pytest.mark.parametrize("name", list(GRIDS))
def test_grid_layers_are_copied_bit_for_bit(name):
    lin = _linear(6, 512)
    ql = QuantLinear.from_linear(lin, weight=GRIDS[name].quantize(lin.weight))
    enc = encode_module(ql, name)
    assert enc.qtype == name and enc.copied_codes and enc.note is None
    ref = ql.dense_weight().numpy()
    got = _dequant(enc)
    if GRIDS[name].symmetric:
        assert np.array_equal(got, ref)  # d·q in float32 on both sides
    else:  # x = d·q + b in the file, (q − z)·s in slimkit: equal up to float32 rounding
        assert np.allclose(got, ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(ref).max())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), scale=st.floats(1e-4, 10.0),
       name=st.sampled_from(list(GRIDS)))
def test_encoded_dense_weights_read_back_as_the_grid_quantization(seed, rows, scale, name):
    w = torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed)) * scale
    enc = encode_dense(w, name)
    ref = GRIDS[name].quantize(w).dequantize().numpy()
    assert np.allclose(_dequant(enc), ref, rtol=0, atol=4 * np.finfo(np.float32).eps * max(np.abs(ref).max(), 1e-30))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_k_scale_packing_matches_ggufs_reader(seed):
    g = np.random.default_rng(seed)
    sc, m = g.integers(0, 64, (5, 8)), g.integers(0, 64, (5, 8))
    got_sc, got_m = quants.Q4_K.get_scale_min(pack_k_scales(sc, m))
    assert np.array_equal(got_sc, sc) and np.array_equal(got_m, m)


def test_k_quant_layouts_against_formula():
    g = np.random.default_rng(0)
    u = g.integers(0, 16, (3, 256))
    D, M = np.array([0.5, 0.25, 2.0]), np.array([0.125, 1.0, 0.0])
    sc, m = g.integers(0, 64, (3, 8)), g.integers(0, 64, (3, 8))
    got = quants.dequantize(pack_q4_k(u, D, sc, M, m), gguf.GGMLQuantizationType.Q4_K).reshape(3, 256)
    want = (D[:, None] * np.repeat(sc, 32, axis=1)) * u - M[:, None] * np.repeat(m, 32, axis=1)
    assert np.array_equal(got, want.astype(np.float32))
    q = g.integers(-32, 32, (3, 256))
    sc6 = g.integers(-127, 128, (3, 16))
    got6 = quants.dequantize(pack_q6_k(q, D, sc6), gguf.GGMLQuantizationType.Q6_K).reshape(3, 256)
    assert np.array_equal(got6, ((D[:, None] * np.repeat(sc6, 16, axis=1)) * q).astype(np.float32))


def test_plain_int4_layer_copies_codes_into_q4_0_with_fp16_scales():
    lin = _linear(4, 256)
    for gs in (32, 128, None):
        ql = QuantLinear.from_linear(lin, 4, gs, True)  # slimkit's own grid: codes -7..7, fp32 scales
        enc = encode_module(ql, "q4_0")
        assert enc.copied_codes and "fp16" in enc.note
        ref = ql.dense_weight()
        # each value is its code times the scale rounded to fp16: at most 2^-11 relative to the scale
        step = ql.scale.abs().repeat_interleave(256 // ql.scale.shape[1], dim=1)
        assert np.all(np.abs(_dequant(enc) - ref.numpy()) <= (7 * step * 2.0**-11).numpy() + 1e-12)
        assert np.array_equal(_dequant(enc)[0, :40], np.zeros(40, dtype=np.float32))


def test_asymmetric_int4_layer_copies_into_q4_1():
    lin = _linear(4, 256)
    ql = QuantLinear.from_linear(lin, 4, 64, False)
    enc = encode_module(ql, "q4_1")
    assert enc.copied_codes
    # d and b = −z·s rounded to fp16 (|b| ≤ 15·s): at most 2^-11·(15 + 15)·s apart
    assert np.allclose(_dequant(enc), ql.dense_weight().numpy(), rtol=0, atol=30 * 2.0**-11 * float(ql.scale.max()))


def test_group_smaller_than_block_is_refused_naming_types_that_fit():
    ql = QuantLinear.from_linear(_linear(4, 256), 4, 16, True)
    with pytest.raises(ConfigError, match=r"group size 16 is not a multiple of q4_0's 32.*hold them as they are: none") as info:
        encode_module(ql, "q4_0")
    assert "--requantize" in str(info.value)
    assert fitting_types(ql) == []  # q6_k has groups of 16, but slimkit's fp32 scales are not its fp16 × int8
    q6 = QuantLinear.from_linear(_linear(4, 256), weight=GRIDS["q6_k"].quantize(_linear(4, 256).weight))
    assert fitting_types(q6) == ["q6_k"]
    enc = encode_module(ql, "q4_0", requantize=True)
    assert not enc.copied_codes and "re-quantized onto q4_0" in enc.note
    ref = GRIDS["q4_0"].quantize(ql.dense_weight()).dequantize().numpy()
    assert np.array_equal(_dequant(enc), ref)


def test_other_grids_are_requantized_with_a_note():
    lin = _linear(4, 512)
    q8 = QuantLinear.from_linear(lin, 8, 32, True)
    enc = encode_module(q8, "q4_0")
    assert not enc.copied_codes and "codes lie outside" in enc.note
    g4 = QuantLinear.from_linear(lin, 4, 32, True)
    enc = encode_module(g4, "q4_k")  # slimkit's fp32 scales are not fp16 × 6-bit sub-scales
    assert not enc.copied_codes and "q4_k" in enc.note
    act = QuantLinear.from_linear(lin, weight=_with_g_idx(quantize_weight(lin.weight, 4, group_size=32)))
    enc = encode_module(act, "q4_0")
    assert not enc.copied_codes and "act-order" in enc.note


def _with_g_idx(qw):
    from dataclasses import replace

    return replace(qw, g_idx=(torch.arange(qw.q.shape[1]) // 32).flip(0).to(torch.int32))


def test_rows_that_do_not_fit_fall_back_like_llama_cpp():
    assert row_type("q4_k", 640) == ("q5_0", row_type("q4_k", 640)[1])
    assert row_type("q6_k", 640)[0] == "q8_0"
    assert row_type("q4_0", 48)[0] == "f16"
    ql = QuantLinear.from_linear(_linear(4, 640), weight=GRIDS["q5_0"].quantize(_linear(4, 640).weight))
    enc = encode_module(ql, "q4_k")  # a GPTQ(grid="q4_k") layer of 640 inputs is on the q5_0 grid
    assert enc.qtype == "q5_0" and enc.copied_codes and "llama.cpp" in enc.note
    assert np.array_equal(_dequant(enc), ql.dense_weight().numpy())
    enc = encode_dense(torch.randn(3, 48), "q4_0")
    assert enc.qtype == "f16" and enc.data.dtype == np.float16


def test_embedding_and_unknown_type():
    emb = torch.nn.Embedding(64, 256)
    qe = QuantEmbedding.from_embedding(emb, weight=GRIDS["q4_k"].quantize(emb.weight))
    enc = encode_module(qe, "q4_k")
    assert enc.copied_codes and enc.shape == (64, 256)
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        encode_dense(torch.randn(2, 32), "q3_k")
