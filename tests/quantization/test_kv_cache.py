"""KV-cache quantization: the maths against a float64 reference and properties, the transformers Cache on a
tiny random GQA Llama (plumbing only, never a quality claim), bytes from shapes, perplexity through the cache."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.quantization import kv_cache as kc
from slimkit.quantization.primitives import pack, unpack

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# A slow, obvious float64 reference
# ---------------------------------------------------------------------------------------


def _fp16_outward(v: float, up: bool) -> float:
    """``v`` rounded to float16 towards +inf (``up``) or -inf."""
    h = np.float16(v)
    if (float(h) < v) if up else (float(h) > v):
        h = np.nextafter(h, np.float16(np.inf if up else -np.inf))
    return float(h)


def reference_quantize_kv(x: torch.Tensor, bits: int, group_size: int | None):
    """Python loops in float64 over every (batch, head, token, group): (codes, scales, offsets, x̂)."""
    b, h, t, d = x.shape
    gs = d if group_size is None else group_size
    codes = np.zeros((b, h, t, d), dtype=np.int64)
    xhat = np.zeros((b, h, t, d))
    scales = np.zeros((b, h, t, d // gs))
    zeros = np.zeros((b, h, t, d // gs))
    for i in range(b):
        for j in range(h):
            for k in range(t):
                for g in range(d // gs):
                    vals = [float(v) for v in x[i, j, k, g * gs:(g + 1) * gs]]
                    if bits == 8:
                        s = _fp16_outward(max(abs(v) for v in vals) / 127, up=True) or 1.0
                        m, lo, hi = 0.0, -127, 127
                    else:
                        m = _fp16_outward(min(vals), up=False)
                        s = _fp16_outward((max(vals) - m) / 15, up=True) or 1.0
                        lo, hi = 0, 15
                    scales[i, j, k, g], zeros[i, j, k, g] = s, m
                    for c, v in enumerate(vals):
                        q = min(max(round((v - m) / s), lo), hi)  # round half to even, like torch.round
                        codes[i, j, k, g * gs + c] = q
                        xhat[i, j, k, g * gs + c] = q * s + m
    return codes, scales, zeros, xhat


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 8), (4, None), (4, 4)])
def test_quantize_kv_matches_float64_reference(bits, group_size):
    torch.manual_seed(bits + (group_size or 0))
    x = torch.randn(2, 3, 5, 16) * torch.tensor([0.01, 1.0, 30.0]).view(1, 3, 1, 1)  # three magnitudes
    x[0, 0, 0] = 0.0  # an all-zero token: scale 1, exact zeros
    x[1, 2, 1] = 2.5  # a constant token
    q = kc.quantize_kv(x, bits, group_size=group_size)
    codes, scales, zeros, xhat = reference_quantize_kv(x, bits, group_size)
    got_codes = q.codes.long() if bits == 8 else kc._unpack4(q.codes, 16).long()
    assert torch.equal(got_codes, torch.from_numpy(codes))
    assert q.scale.dtype == torch.float16 and torch.equal(q.scale.double(), torch.from_numpy(scales))
    if bits == 8:
        assert q.zero is None and q.codes.dtype == torch.int8
    else:
        assert q.zero.dtype == torch.float16 and torch.equal(q.zero.double(), torch.from_numpy(zeros))
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, 5, 8)  # two codes per byte
    assert torch.allclose(q.dequantize().double(), torch.from_numpy(xhat), rtol=1e-6, atol=1e-7)
    assert torch.equal(q.dequantize()[0, 0, 0], torch.zeros(16))


def test_int4_packing_is_primitives_layout():
    codes = torch.randint(0, 16, (2, 3, 7, 32), dtype=torch.uint8)
    packed = kc._pack4(codes)
    assert torch.equal(packed, pack(codes, 4, symmetric=False))
    assert torch.equal(kc._unpack4(packed, 32), unpack(packed, 4, 32, symmetric=False))
    assert int(packed[0, 0, 0, 0]) == int(codes[0, 0, 0, 0]) | int(codes[0, 0, 0, 1]) << 4  # first in the low nibble


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

_values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def _kv_case(draw):
    bits = draw(st.sampled_from([8, 4]))
    n_groups = draw(st.sampled_from([1, 2, 4]))
    gs = draw(st.sampled_from([2, 4, 8]))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), n_groups * gs)
    flat = draw(st.lists(_values, min_size=math.prod(shape), max_size=math.prod(shape)))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e-6]))  # tiny values too (float16 subnormal scales)
    x = torch.tensor(flat, dtype=torch.float32).reshape(shape) * scale
    return x, bits, (None if n_groups == 1 else gs)


@settings(max_examples=80, deadline=None)
@given(_kv_case())
def test_error_at_most_half_the_stored_scale(case):
    x, bits, group_size = case
    q = kc.quantize_kv(x, bits, group_size=group_size)
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    def per_elem(t):  # (..., n_groups) -> (..., d)
        return t.float().repeat_interleave(gs, dim=-1)

    s = per_elem(q.scale)
    m = torch.zeros_like(s) if q.zero is None else per_elem(q.zero)
    err = (q.dequantize() - x).abs()
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + m.abs())  # float32 arithmetic in q·s + m
    assert bool((err <= s / 2 + slack).all()), float((err - s / 2).max())
    codes = q.codes if bits == 8 else kc._unpack4(q.codes, d)
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi


@settings(max_examples=40, deadline=None)
@given(_kv_case(), st.integers(1, 3))
def test_tokens_quantize_independently(case, split):
    """Quantizing tokens together or one block at a time gives the same bytes: why no re-quantization is needed."""
    x, bits, group_size = case
    split = min(split, x.shape[-2])
    whole = kc.quantize_kv(x, bits, group_size=group_size)
    parts = kc.quantize_kv(x[..., :split, :], bits, group_size=group_size).append(
        kc.quantize_kv(x[..., split:, :], bits, group_size=group_size))
    for a, b in zip(whole.tensors(), parts.tensors()):
        assert torch.equal(a, b)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([8, 4]), st.sampled_from([None, 8, 16]), st.integers(1, 3), st.integers(1, 4),
       st.integers(0, 9))
def test_nbytes_from_shapes(bits, group_size, batch, heads, tokens):
    q = kc.quantize_kv(torch.randn(batch, heads, tokens, 32), bits, group_size=group_size)
    per_token = kc.kv_nbytes_per_token(bits, 32, group_size)
    assert q.nbytes == batch * heads * tokens * per_token
    assert per_token * 8 == kc.kv_bits_per_element(bits, 32, group_size) * 32


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_a_slice(bits, dtype):
    torch.manual_seed(2)
    q = kc.quantize_kv(torch.randn(2, 3, 7, 32), bits, group_size=16)
    out = torch.full((2, 3, 10, 32), 5.0, dtype=dtype)
    kc.dequantize_kv(q, dtype, out=out[..., 2:9, :])
    assert torch.equal(out[..., 2:9, :], q.dequantize(dtype))
    assert bool((out[..., :2, :] == 5).all()) and bool((out[..., 9:, :] == 5).all())


def test_half_precision_states_come_back_in_their_dtype():
    layer = kc.QuantizedKVLayer(bits=8)
    k = torch.randn(1, 2, 4, 32, dtype=torch.bfloat16)
    layer.update(k, k)
    keys, _ = layer.update(k[..., :1, :], k[..., :1, :])
    assert keys.dtype == torch.bfloat16 and keys.shape == (1, 2, 5, 32)
    assert torch.allclose(keys[..., :4, :].float(), k.float(), atol=0.05)


def test_bits_per_element():
    assert kc.kv_bits_per_element(8, 32) == 8.5  # 8 + 16/32
    assert kc.kv_bits_per_element(4, 32) == 5.0  # 4 + 2·16/32
    assert kc.kv_bits_per_element(4, 32, 16) == 6.0
    assert kc.kv_nbytes_per_token(8, 32) == 34 and kc.kv_nbytes_per_token(4, 32) == 20


def test_bad_inputs_are_refused():
    with pytest.raises(DataError, match="NaN"):
        kc.quantize_kv(torch.tensor([[1.0, float("nan")]]), 8)
    big = torch.tensor([[-1e5, 1e5, 0.0, 1.0]])
    with pytest.raises(DataError, match="bfloat16"):
        kc.quantize_kv(big, 4)  # the offset -1e5 does not fit float16
    q = kc.quantize_kv(big, 4, scale_dtype=torch.bfloat16)
    assert float((q.dequantize() - big).abs().max()) <= float(q.scale.float().max()) / 2
    shifted = torch.full((1, 4), 1e5)  # beyond float16 too, but the offset rounds down to 65504: still covered
    q = kc.quantize_kv(shifted, 4)
    assert float((q.dequantize() - shifted).abs().max()) <= float(q.scale.float().max()) / 2
    with pytest.raises(ConfigError, match="does not split"):
        kc.quantize_kv(torch.randn(1, 32), 8, group_size=5)
    with pytest.raises(ConfigError, match="even"):
        kc.quantize_kv(torch.randn(1, 6), 4, group_size=3)
    with pytest.raises(ConfigError, match="bits"):
        kc.quantize_kv(torch.randn(1, 32), 2)


def test_importing_does_not_import_transformers():
    code = "import sys, slimkit.quantization.kv_cache; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# The cache on a tiny random GQA Llama
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_llama():
    """2 layers, hidden 64, 2 query heads sharing 1 kv head, head_dim 32 (stdlib-coder's), 1024 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_make_kv_cache_specs(gqa_llama):
    for spec in (None, "none", "fp32", "FP32"):
        assert kc.make_kv_cache(spec, gqa_llama) is None
    c8, c4 = kc.make_kv_cache("int8", gqa_llama), kc.make_kv_cache("int4", gqa_llama.config)
    assert isinstance(c8, kc.QuantizedKVCache) and (c8.bits, c4.bits) == (8, 4)
    assert len(c8.layers) == 2 and all(isinstance(layer, kc.QuantizedKVLayer) for layer in c8.layers)
    from transformers.cache_utils import BaseQuantizedLayer, Cache

    assert isinstance(c8, Cache) and isinstance(c8.layers[0], BaseQuantizedLayer)
    for bad in ("int3", "q8", "", 8):
        with pytest.raises(ConfigError, match="none, fp32, int8, int4"):
            kc.make_kv_cache(bad, gqa_llama)
    with pytest.raises(ConfigError, match="int8"):
        kc.make_kv_cache("int16", gqa_llama)
    with pytest.raises(ConfigError, match="residual"):
        kc.make_kv_cache("int8", gqa_llama, residual=-1)
    with pytest.raises(ConfigError, match="does not split"):
        kc.make_kv_cache("int4", gqa_llama, group_size=5)


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    with pytest.raises(UnsupportedError, match="sliding_attention"):
        kc.make_kv_cache("int8", cfg)


@pytest.mark.parametrize("residual", [0, 3])
def test_layer_returns_dequantized_past_and_exact_new_tokens(residual):
    layer = kc.QuantizedKVLayer(bits=8, residual=residual)
    torch.manual_seed(0)
    k1, v1, k2, v2 = (torch.randn(2, 4, n, 32) for n in (10, 10, 5, 5))
    keys, values = layer.update(k1, v1)
    assert torch.equal(keys, k1) and torch.equal(values, v1)  # nothing stored before: all exact
    keys, values = layer.update(k2, v2)
    stored = 10 - residual
    assert torch.equal(keys[..., :stored, :], kc.quantize_kv(k1[..., :stored, :], 8).dequantize())
    assert torch.equal(values[..., :stored, :], kc.quantize_kv(v1[..., :stored, :], 8).dequantize())
    assert torch.equal(keys[..., stored:, :], torch.cat([k1[..., stored:, :], k2], dim=-2))  # window + new: exact
    assert layer.get_seq_length() == 15 and layer.keys.shape[-2] == residual
    assert layer._quantized_keys.tokens == 15 - residual


def test_keys_and_values_own_their_storage_and_may_differ_in_width():
    layer = kc.QuantizedKVLayer(bits=4)
    k, v = torch.randn(1, 2, 3, 32), torch.randn(1, 2, 3, 16)  # values narrower than keys (MLA-like models)
    layer.update(k, v)
    keys, values = layer.update(k[..., :1, :], v[..., :1, :])
    assert keys.shape == (1, 2, 4, 32) and values.shape == (1, 2, 4, 16)
    same = kc.QuantizedKVLayer(bits=8)
    same.update(k, k.clone())
    ptrs = [t.untyped_storage().data_ptr() for q in (same._quantized_keys, same._quantized_values) for t in q.tensors()]
    assert len(set(ptrs)) == 4  # stacked for one quantize call, then stored apart (no shared, larger storage)


def test_crop_and_batch_edits_are_exact():
    torch.manual_seed(1)
    k, v = torch.randn(3, 2, 12, 32), torch.randn(3, 2, 12, 32)
    layer = kc.QuantizedKVLayer(bits=4, residual=2)
    layer.update(k, v)
    layer.crop(-4)  # 2 from the window, 2 quantized
    fresh = kc.QuantizedKVLayer(bits=4, residual=0)
    fresh.update(k[..., :8, :], v[..., :8, :])
    assert layer.get_seq_length() == 8 and layer.keys.shape[-2] == 0
    probe = torch.zeros(3, 2, 1, 32)
    assert torch.equal(layer.update(probe, probe)[0], fresh.update(probe, probe)[0])

    layer = kc.QuantizedKVLayer(bits=8, residual=1)
    layer.update(k, v)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    ref = kc.QuantizedKVLayer(bits=8, residual=1)
    ref.update(k[[2, 0, 1]], v[[2, 0, 1]])
    probe = torch.zeros(3, 2, 1, 32)
    assert torch.equal(layer.update(probe, probe)[1], ref.update(probe, probe)[1])
    layer.batch_select_indices(torch.tensor([1]))
    assert layer._quantized_keys.codes.shape[0] == 1 and layer.keys.shape[0] == 1


def test_bytes_at_1024_tokens_from_shapes(gqa_llama):
    from transformers import DynamicCache

    ids = _ids(1024)
    layers, kv_heads, d, t = 2, 1, 32, 1024
    fp32 = DynamicCache()
    with torch.no_grad():
        gqa_llama(ids, cache=fp32, use_cache=True)
    assert kc.kv_cache_nbytes(fp32) == layers * 2 * kv_heads * t * d * 4
    expected = {("int8", None): 34, ("int4", None): 20, ("int4", 16): 24}  # bytes per (token, head) of K or V
    for (spec, group), per_token in expected.items():
        cache = kc.make_kv_cache(spec, gqa_llama, group_size=group)
        with torch.no_grad():
            for start in range(0, t, 256):  # chunked, as kv_cache_perplexity feeds
                gqa_llama(ids[:, start:start + 256], cache=cache, use_cache=True)
        assert kc.kv_cache_nbytes(cache) == layers * 2 * kv_heads * t * per_token
    int8 = kc.make_kv_cache("int8", gqa_llama)
    int4 = kc.make_kv_cache("int4", gqa_llama)
    with torch.no_grad():
        gqa_llama(ids, cache=int8, use_cache=True)
        gqa_llama(ids, cache=int4, use_cache=True)
    assert kc.kv_cache_nbytes(int8) / kc.kv_cache_nbytes(fp32) == 34 / 128 <= 0.27  # target G4
    assert kc.kv_cache_nbytes(int4) / kc.kv_cache_nbytes(fp32) == 20 / 128 <= 0.16
    # A residual window is counted too: 8 fp32 tokens of 128 bytes instead of 34.
    res = kc.make_kv_cache("int8", gqa_llama, residual=8)
    with torch.no_grad():
        gqa_llama(ids, cache=res, use_cache=True)
    assert kc.kv_cache_nbytes(res) == layers * 2 * kv_heads * ((t - 8) * 34 + 8 * 128)
    assert kc.kv_cache_nbytes(None) == 0


def test_nbytes_counts_transformers_quantized_cache(gqa_llama):
    pytest.importorskip("optimum.quanto")
    from transformers import DynamicCache
    from transformers.cache_utils import QuantizedCache

    ids = _ids(512)
    peer, fp32 = QuantizedCache("quanto", gqa_llama.config, nbits=4), DynamicCache()
    with torch.no_grad():
        for start in range(0, 512, 128):
            gqa_llama(ids[:, start:start + 128], cache=peer, use_cache=True)
        gqa_llama(ids, cache=fp32, use_cache=True)
    n = kc.kv_cache_nbytes(peer)
    assert 0 < n < kc.kv_cache_nbytes(fp32) / 2  # packed 4-bit data + float scales/shifts, found inside quanto's tensors


def test_perplexity_without_quantization_equals_full_forward(gqa_llama):
    ids = _ids(300, batch=2, seed=3)
    with torch.no_grad():
        logits = gqa_llama(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    full = math.exp(float(nll))
    for chunk in (128, 77, 300):
        ppl = kc.kv_cache_perplexity(gqa_llama, ids, None, chunk=chunk)
        assert abs(ppl / full - 1) < 1e-4, (chunk, ppl, full)
    one = kc.kv_cache_perplexity(gqa_llama, ids[:1], None, chunk=128)
    with torch.no_grad():
        ref = math.exp(float(torch.nn.functional.cross_entropy(gqa_llama(ids[:1]).logits[0, :-1], ids[0, 1:])))
    assert abs(one / ref - 1) < 1e-4
    with pytest.raises(DataError):
        kc.kv_cache_perplexity(gqa_llama, ids[0], None)
    with pytest.raises(ConfigError):
        kc.kv_cache_perplexity(gqa_llama, ids, None, chunk=0)


def test_perplexity_reads_the_quantized_past(gqa_llama):
    ids = _ids(512, seed=4)
    fp32 = kc.kv_cache_perplexity(gqa_llama, ids, None)
    int8 = kc.kv_cache_perplexity(gqa_llama, ids, "int8")
    int4 = kc.kv_cache_perplexity(gqa_llama, ids, "int4")
    assert int8 != fp32 and int4 != fp32  # the later chunks did read a changed past
    assert abs(int8 / fp32 - 1) < 1e-3 and abs(int4 / fp32 - 1) < 1e-2
    assert kc.kv_cache_perplexity(gqa_llama, ids, "int8", chunk=512) == pytest.approx(fp32, rel=1e-6)  # one chunk: nothing read back
    # A peer's cache through a factory.
    from transformers import DynamicCache

    assert kc.kv_cache_perplexity(gqa_llama, ids, DynamicCache) == pytest.approx(fp32, rel=1e-9)


def _greedy(model, prompt, n, **kw):
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)[0, prompt.shape[1]:]


def test_greedy_generate_with_int8_cache_matches_fp32(gqa_llama):
    prompt = _ids(64, seed=5)
    fp32 = _greedy(gqa_llama, prompt, 30)
    cache = kc.make_kv_cache("int8", gqa_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated for cache= in transformers 5.2x
        int8 = _greedy(gqa_llama, prompt, 30, past_key_values=cache)
    assert len(int8) == 30 and (int8 == fp32).sum() >= 27
    assert cache.get_seq_length() == 64 + 29 and cache.layers[0]._quantized_keys.tokens == 93
    int4 = _greedy(gqa_llama, prompt, 30, cache=kc.make_kv_cache("int4", gqa_llama))
    assert len(int4) == 30
    beams = gqa_llama.generate(prompt, max_new_tokens=5, num_beams=2, do_sample=False,
                               cache=kc.make_kv_cache("int8", gqa_llama))
    assert beams.shape == (1, 69)


def test_model_is_left_untouched_and_cache_reusable(gqa_llama):
    """Nothing to reload: the cache changes no weight or setting, and a reset cache gives the same results again."""
    before = {k: v.clone() for k, v in gqa_llama.state_dict().items()}
    impl = gqa_llama.config._attn_implementation
    ids = _ids(200, seed=6)
    with torch.no_grad():
        ref = gqa_llama(ids).logits
        cache = kc.make_kv_cache("int4", gqa_llama)
        first = [gqa_llama(ids[:, s:s + 50], cache=cache, use_cache=True).logits for s in range(0, 200, 50)]
        cache.reset()
        again = [gqa_llama(ids[:, s:s + 50], cache=cache, use_cache=True).logits for s in range(0, 200, 50)]
        after = gqa_llama(ids).logits
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(ref, after) and gqa_llama.config._attn_implementation == impl
    assert all(torch.equal(v, gqa_llama.state_dict()[k]) for k, v in before.items())
