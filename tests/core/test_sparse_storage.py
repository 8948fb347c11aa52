"""Compact sparse storage in safetensors: bit order, exact round trips, smaller files, tied tensors."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn

import slimkit as sk
from slimkit.core.errors import ModelLoadError
from slimkit.core.sparse_storage import (
    ALIASES_KEY,
    SPARSE_KEY,
    decode_tensors,
    dedupe_shared,
    encode_state_dict,
    load_state_dict,
    pack_bits,
    pack_sparse,
    save_state_dict,
    should_compact,
    unpack_bits,
    unpack_sparse,
)


def _sparse(shape, sparsity, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    n = math.prod(shape)
    zero = torch.randperm(n, generator=g)[: round(sparsity * n)]
    t.view(-1)[zero] = 0
    return t


def test_bit_order_is_little_endian_within_a_byte():
    flags = torch.zeros(10, dtype=torch.bool)
    flags[0] = flags[3] = flags[9] = True
    assert pack_bits(flags).tolist() == [0b00001001, 0b00000010]
    random = torch.rand(77, generator=torch.Generator().manual_seed(0)) > 0.5
    assert pack_bits(random).tolist() == np.packbits(random.numpy(), bitorder="little").tolist()
    assert torch.equal(unpack_bits(pack_bits(random), 77), random)


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       sparsity=st.floats(0.0, 1.0),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(shape, sparsity, dtype, seed):
    t = _sparse(tuple(shape), sparsity, dtype, seed)
    bitmask, values = pack_sparse(t)
    assert bitmask.dtype == torch.uint8 and bitmask.numel() == math.ceil(t.numel() / 8)
    assert values.dtype == dtype and values.numel() == int(torch.count_nonzero(t))
    assert torch.equal(values, t.reshape(-1)[t.reshape(-1) != 0])  # row-major order
    out = unpack_sparse(bitmask, values, t.shape)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, t)


def test_negative_zero_and_nan():
    t = torch.tensor([[0.0, -0.0, float("nan"), 1.5], [float("-inf"), 0.0, -2.0, 0.0]])
    out = unpack_sparse(*pack_sparse(t), t.shape)
    assert torch.equal(out.isnan(), t.isnan())
    assert torch.equal(out.nan_to_num(7.0), t.nan_to_num(7.0))
    assert not torch.signbit(out[0, 1])  # -0.0 comes back as +0.0: zeros are zeros


def test_unpack_rejects_inconsistent_parts():
    bitmask, values = pack_sparse(_sparse((4, 4), 0.5))
    with pytest.raises(ValueError, match="needs 2 bytes, got 3"):
        unpack_sparse(torch.cat([bitmask, bitmask[:1]]), values, (4, 4))
    with pytest.raises(ValueError, match="marks 8 non-zeros but 7 values"):
        unpack_sparse(bitmask, values[:7], (4, 4))
    with pytest.raises(ValueError, match="padding bits"):
        unpack_bits(torch.tensor([0xFF], dtype=torch.uint8), 5)


def test_which_tensors_are_compacted():
    assert should_compact(_sparse((64, 64), 0.5))
    assert should_compact(_sparse((4096,), 0.5))  # 1-D but >= 1024 elements
    assert not should_compact(_sparse((512,), 0.9))  # a small vector (bias, norm) stays dense
    assert not should_compact(_sparse((64, 64), 0.0))  # dense: compact would be larger
    assert not should_compact(_sparse((2, 2), 0.5))  # tiny: the header entries outweigh the gain
    assert not should_compact(torch.zeros(64, 64, dtype=torch.int8))  # quantized codes stay as they are
    assert not should_compact(torch.zeros(64, 64, dtype=torch.int32))


def test_file_is_smaller_at_half_sparsity(tmp_path):
    t = _sparse((512, 512), 0.5)
    save_file({"w": t}, str(tmp_path / "dense.safetensors"))
    save_state_dict({"w": t}, tmp_path / "sparse.safetensors")
    dense = (tmp_path / "dense.safetensors").stat().st_size
    sparse = (tmp_path / "sparse.safetensors").stat().st_size
    assert sparse / dense == pytest.approx(0.5 + 1 / 32, abs=2e-3)
    state, aliases = load_state_dict(tmp_path / "sparse.safetensors")
    assert aliases == {} and torch.equal(state["w"], t)
    with safe_open(str(tmp_path / "sparse.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["w.__bitmask", "w.__values"]
        assert json.loads(f.metadata()[SPARSE_KEY]) == {"w": {"shape": [512, 512], "dtype": "float32"}}


def test_dedupe_shared():
    a = torch.randn(4, 4)
    big = torch.randn(8)
    state = {"emb": a, "head": a, "first": big[:4], "second": big[4:], "other": torch.randn(3)}
    unique, aliases = dedupe_shared(state)
    assert aliases == {"head": "emb"}
    assert set(unique) == {"emb", "first", "second", "other"}
    assert unique["first"].untyped_storage().data_ptr() != unique["second"].untyped_storage().data_ptr()
    tensors, meta = encode_state_dict(state)
    decoded, aliases = decode_tensors(tensors, meta)
    assert aliases == {"head": "emb"} and json.loads(meta[ALIASES_KEY]) == {"head": "emb"}
    assert torch.equal(decoded["second"], big[4:])


def test_pruned_digits_checkpoint_is_smaller_and_reloads_exactly(tmp_path):
    dense = sk.load("digits-cnn")
    sk.save(dense, tmp_path / "dense")
    model = sk.load("digits-cnn")
    sk.prune_(model, sk.Magnitude(sparsity=0.5))
    sk.save(model, tmp_path / "pruned")
    d = (tmp_path / "dense" / "model.safetensors").stat().st_size
    p = (tmp_path / "pruned" / "model.safetensors").stat().st_size
    assert p < 0.6 * d  # ~0.53 of the conv/linear bytes; BN and biases stay dense
    reloaded = sk.load(tmp_path / "pruned")
    expected = sk.strip(model).state_dict()
    got = reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(reloaded(x), model.eval()(x))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("prune_head", [False, True])
def test_tied_embeddings_survive(tmp_path, prune_head):
    from tests.llm_archs import tiny_causal_lm

    model = tiny_causal_lm("opt")
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    ignore = [] if prune_head else ["lm_head"]
    sk.prune_(model, sk.Magnitude(sparsity=0.5, ignore=ignore))
    ids = torch.randint(0, 128, (2, 10))
    before = _logits(model, ids)
    sk.save(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # The shared table is stored once (compactly when pruned); the other name is an alias.
    stored = {k.split(".__")[0] for k in keys if "embed_tokens.weight" in k or "lm_head.weight" in k}
    assert len(stored) == 1
    compact = {k for k in keys if k.startswith(next(iter(stored)) + ".__")}
    assert len(compact) == (2 if prune_head else 0)
    assert set(json.loads(meta[ALIASES_KEY]).items()) & {("lm_head.weight", "model.decoder.embed_tokens.weight"),
                                                         ("model.decoder.embed_tokens.weight", "lm_head.weight")}
    reloaded = sk.load(tmp_path / "ck")
    assert reloaded.lm_head.weight is reloaded.model.decoder.embed_tokens.weight
    assert torch.equal(_logits(reloaded, ids), before)


def test_mostly_zero_int8_codes_are_stored_by_code_and_dense_ones_as_they_are(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[:, :48] = 0  # 75% of layer 0's int8 codes are 0
    sk.quantize_(model, sk.RTN(bits=8))
    state = model.state_dict()
    sk.save(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        codes = f.get_tensor("0.qweight" + CODES_SUFFIX)
    assert keys == (set(state) - {"0.qweight"}) | {"0.qweight.__bitmask", "0.qweight" + CODES_SUFFIX}
    assert codes.numel() == int((state["0.qweight"] != 0).sum())  # one byte per kept int8 code
    reloaded = sk.load(tmp_path / "ck", skeleton=nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    x = torch.randn(3, 64)
    assert torch.equal(reloaded(x), model(x))


def test_checkpoint_written_by_save_model_still_loads(tmp_path):
    # Before sparse storage, slimkit wrote weights with safetensors.torch.save_model.
    from tests.llm_archs import tiny_causal_lm

    model = tiny_causal_lm("opt")
    sk.save(model, tmp_path / "ck")
    save_model(model, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(_logits(sk.load(tmp_path / "ck"), ids), _logits(model, ids))


def test_corrupt_compact_pair_is_named(tmp_path):
    model = sk.load("digits-cnn")
    sk.prune_(model, sk.Magnitude(sparsity=0.5))
    sk.save(model, tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    name = "features.0.weight"
    tensors[name + ".__values"] = tensors[name + ".__values"][:-1]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelLoadError, match=r"model.safetensors is corrupt .*'features.0.weight'.*values"):
        sk.load(tmp_path / "ck")


# --- sparse integer codes (pruned, then quantized layers) ----------------------------------------

from slimkit.core.sparse_storage import (  # noqa: E402
    CODES_SUFFIX,
    SPARSE_CODES_KEY,
    CodeLayout,
    code_stream,
    pack_code_stream,
    pack_sparse_codes,
    stored_layout,
    unpack_sparse_codes,
)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 6), cols=st.integers(1, 9), density=st.floats(0, 1),
       seed=st.integers(0, 10_000))
def test_sparse_codes_round_trip_exactly(bits, rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    fill = 2 ** (bits - 1) if bits < 8 else 0
    codes = torch.randint(0, 2**bits, (rows, cols * (8 // bits)), generator=g)
    codes[torch.rand(codes.shape, generator=g) > density] = fill
    packed = pack_code_stream(codes.reshape(-1), bits).view(rows, cols)  # the layer's bytes
    dtype = torch.int8 if bits == 8 else torch.uint8
    t = packed.view(dtype)
    layout = CodeLayout(bits, fill)
    assert torch.equal(code_stream(t, bits), codes.reshape(-1).to(torch.uint8))
    bitmask, kept = pack_sparse_codes(t, layout)
    assert bitmask.numel() == math.ceil(codes.numel() / 8)
    assert kept.numel() == math.ceil(int((codes != fill).sum()) * bits / 8)
    back = unpack_sparse_codes(bitmask, kept, t.shape, dtype, layout)
    assert back.dtype == dtype and torch.equal(back, t)


def test_pruned_gptq_layer_is_stored_as_bitmask_plus_codes_and_reloads_exactly(tmp_path):
    from slimkit.quantization.modules import QuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        lin.weight[torch.rand(lin.weight.shape) < 0.5] = 0.0
    model = nn.Sequential(QuantLinear.from_linear(lin, bits=4, group_size=128, symmetric=True))
    path = tmp_path / "m.safetensors"
    from slimkit.core.io import code_layouts

    layouts = code_layouts(model)
    assert layouts == {"0.qweight": CodeLayout(4, 8)}
    save_state_dict(model.state_dict(), path, code_layouts=layouts)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        record = json.loads(f.metadata()[SPARSE_CODES_KEY])
    assert {"0.qweight" + CODES_SUFFIX, "0.qweight.__bitmask"} <= keys and "0.qweight" not in keys
    assert record["0.qweight"] == {"shape": [64, 128], "dtype": "uint8", "bits": 4, "fill": 8}
    stored, _, nbytes = stored_layout(path)
    assert stored["0.qweight"].shape == (64, 128) and stored["0.qweight"].dtype == torch.uint8
    zeros = int((model[0].dense_weight() == 0).sum())
    # 1 bit per weight + 4 bits per kept weight + fp32 scales (2 groups a row)
    expected = math.ceil(64 * 256 / 8) + math.ceil((64 * 256 - zeros) * 4 / 8) + 64 * 2 * 4
    assert nbytes == expected
    assert nbytes * 8 / (64 * 256) < 3.3  # vs 4.25 dense
    state, _ = load_state_dict(path)
    assert torch.equal(state["0.qweight"], model[0].qweight)


def test_asymmetric_codes_stay_dense():
    from slimkit.quantization.modules import QuantLinear

    layer = QuantLinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32, symmetric=False)
    assert layer.sparse_code_layouts() == {}


def test_corrupt_sparse_code_records_are_named(tmp_path):
    t = torch.full((64, 64), 0x88, dtype=torch.uint8)
    t[0, 0] = 0x12
    tensors, meta = encode_state_dict({"w": t}, {"w": CodeLayout(4, 8)})
    assert SPARSE_CODES_KEY in meta and "w" not in tensors
    bad = dict(tensors)
    bad["w" + CODES_SUFFIX] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="sparse codes 'w'"):
        decode_tensors(bad, meta)
    with pytest.raises(ValueError, match="sparse codes 'w'"):
        decode_tensors(tensors, {SPARSE_CODES_KEY: json.dumps({"w": {"shape": [64, 64], "dtype": "int8", "bits": 3,
                                                                     "fill": 8}})})
    assert torch.equal(decode_tensors(tensors, meta)[0]["w"], t)


# --- 2:4 codes, float16-exact floats, deterministic bytes ------------------------------------

from slimkit.core.sparse_storage import (  # noqa: E402
    FP16_KEY,
    NM_INDEX_SUFFIX,
    PAIRS_2_4,
    pack_2of4_codes,
    pack_uint_stream,
    unpack_2of4_codes,
    unpack_uint_stream,
)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 40), seed=st.integers(0, 10_000))
def test_uint_stream_round_trip(bits, n, seed):
    values = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_uint_stream(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_uint_stream(packed, bits, n), values)
    # little-endian bit stream: value 0 in the lowest bits of byte 0
    if n:
        assert int(packed[0]) & (2 ** min(bits, 8) - 1) == int(values[0]) & 0xFF


def _two_of_four_codes(rows, groups, bits, seed, fewer=0.2):
    """Codes (rows, 4·groups) of a 2:4-pruned layer: in each group of 4, 2 random positions kept (some kept
    codes equal to the zero code, as a kept weight that rounds to 0)."""
    g = torch.Generator().manual_seed(seed)
    fill = 2 ** (bits - 1)
    codes = torch.full((rows * groups, 4), fill, dtype=torch.int64)
    pick = torch.randint(0, 6, (rows * groups,), generator=g)
    pos = torch.tensor(PAIRS_2_4)[pick]
    vals = torch.randint(0, 2**bits, (rows * groups, 2), generator=g)
    vals[torch.rand(vals.shape, generator=g) < fewer] = fill
    codes.scatter_(1, pos, vals)
    return codes.reshape(rows, groups * 4), fill


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), groups=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_two_of_four_codes_round_trip(bits, rows, groups, seed):
    codes, fill = _two_of_four_codes(rows, groups * (8 // bits), bits, seed)
    dtype = torch.int8 if bits == 8 else torch.uint8
    t = pack_code_stream(codes.reshape(-1), bits).view(dtype).reshape(rows, -1)
    layout = CodeLayout(bits, fill)
    index, kept = pack_2of4_codes(t, layout)
    n_groups = codes.numel() // 4
    assert index.numel() == math.ceil(n_groups * 3 / 8) and kept.numel() == math.ceil(n_groups * 2 * bits / 8)
    assert torch.equal(unpack_2of4_codes(index, kept, t.shape, dtype, layout), t)


def test_codes_not_in_2of4_are_refused_by_the_pattern():
    t = torch.full((1, 8), 0x88, dtype=torch.uint8)  # 16 zero codes (4-bit, fill 8)
    t[0, 0] = 0x12  # codes 2, 1: 2 kept in the first group of 4
    assert pack_2of4_codes(t, CodeLayout(4, 8)) is not None
    t[0, 1] = 0x13  # a third kept code in the first group
    assert pack_2of4_codes(t, CodeLayout(4, 8)) is None


def test_two_of_four_gptq_layer_is_stored_in_2_75_bits_plus_fp16_scales(tmp_path):
    from slimkit.core.io import code_layouts
    from slimkit.quantization.grids import fp16_value
    from slimkit.quantization.modules import QuantLinear
    from slimkit.quantization.primitives import quantize

    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    with torch.no_grad():  # 2:4: keep the 2 largest of every 4
        w = lin.weight.view(64, 64, 4)
        small = w.abs().argsort(dim=-1)[..., :2]
        w.scatter_(-1, small, 0.0)
    model = nn.Sequential(QuantLinear.from_linear(lin, bits=4, group_size=128, symmetric=True))
    with torch.no_grad():  # scales chosen in fp16 (as a fp16_scales quantizer does): codes against them
        layer = model[0]
        layer.scale.copy_(fp16_value(layer.scale))
        s = layer.scale.repeat_interleave(128, dim=1)
        from slimkit.quantization.primitives import pack

        layer.qweight.copy_(pack(quantize(lin.weight, s, None, 4, True), 4))
    path = tmp_path / "m.safetensors"
    save_state_dict(model.state_dict(), path, code_layouts=code_layouts(model))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert f.get_slice("0.scale").get_dtype() == "F16"
    assert json.loads(meta[SPARSE_CODES_KEY])["0.qweight"]["pattern"] == "2:4"
    assert "0.qweight" + NM_INDEX_SUFFIX in keys and json.loads(meta[FP16_KEY]) == ["0.scale"]
    stored, _, nbytes = stored_layout(path)
    assert stored["0.scale"].dtype == torch.float32 and stored["0.qweight"].shape == (64, 128)
    n = 64 * 256
    assert nbytes == math.ceil(n / 4 * 3 / 8) + n // 2 * 4 // 8 + 64 * 2 * 2  # 0.75 + 2 + 16/128 bits a weight
    assert nbytes * 8 / n == pytest.approx(2.875)
    state, _ = load_state_dict(path)
    assert state["0.scale"].dtype == torch.float32
    assert torch.equal(state["0.scale"], layer.scale) and torch.equal(state["0.qweight"], layer.qweight)


def test_fp16_exact_floats_are_halved_and_others_are_not():
    exact = torch.randn(8, 16).half().float()
    inexact = exact.clone()
    inexact[0, 0] += 1e-6
    tiny = torch.ones(4)
    tensors, meta = encode_state_dict({"a": exact, "b": inexact, "c": tiny, "d": exact.double()})
    assert tensors["a"].dtype == torch.float16 and tensors["b"].dtype == torch.float32
    assert tensors["c"].dtype == torch.float32 and tensors["d"].dtype == torch.float64
    assert json.loads(meta[FP16_KEY]) == ["a"]
    back, _ = decode_tensors(tensors, meta)
    assert back["a"].dtype == torch.float32 and torch.equal(back["a"], exact)
    with pytest.raises(ValueError, match="float16-stored"):
        decode_tensors({**tensors, "a": exact}, meta)


def test_saved_bytes_are_deterministic_whatever_the_metadata(tmp_path):
    state = {"w": torch.randn(8, 16).half().float(), "v": torch.zeros(64, 64)}
    state["v"][0, 0] = 1.0  # sparse: a compact pair, a second metadata record
    save_state_dict(state, tmp_path / "a.safetensors", metadata={"z": "1", "a": "2"})
    save_state_dict(dict(reversed(state.items())), tmp_path / "b.safetensors", metadata={"a": "2", "z": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "a.safetensors"))) == {"w", "v.__bitmask", "v.__values"}
