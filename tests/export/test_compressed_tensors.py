"""compressed-tensors "pack-quantized" folders from slimkit QuantLinear layers: packing, tensors, loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.core.errors import UnsupportedError
from slimkit.export.compressed_tensors import (
    export_compressed_tensors,
    layer_tensors,
    pack_int32,
    unpack_int32,
)
from slimkit.quantization.modules import QuantLinear
from tests.llm_archs import tiny_causal_lm, token_batches
from tests.test_cli import slimkit_cli

try:
    import compressed_tensors  # noqa: F401

    HAVE_CT = True
except ImportError:
    HAVE_CT = False
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="compressed-tensors is not installed (pip install compressed-tensors)")


def obvious_pack(codes: torch.Tensor, bits: int) -> list[list[int]]:
    """Word w of a row holds codes 32/bits·w ... as bits [i·b, (i+1)·b): a Python-int reference."""
    per = 32 // bits
    rows = []
    for row in codes.tolist():
        words = []
        for start in range(0, len(row), per):
            v = sum(c << (bits * i) for i, c in enumerate(row[start:start + per]))
            words.append(v - (1 << 32) if v >= 1 << 31 else v)  # as a signed int32
        rows.append(words)
    return rows


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 4), cols=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_int32_is_the_dense_little_endian_stream(bits, rows, cols, seed):
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-cols * bits // 32))
    assert words.tolist() == obvious_pack(codes, bits)
    assert torch.equal(unpack_int32(words, bits, cols), codes.to(torch.int32))
    if HAVE_CT:
        from compressed_tensors.compressors.pack_quantized import pack_to_int32

        signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors adds the offset itself
        assert torch.equal(pack_to_int32(signed, bits), words)


@needs_ct
@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, False), (4, None, False), (2, 32, True), (8, None, False),
                                                   (8, 32, True), (4, 32, True)])
def test_compressed_tensors_decompresses_layer_tensors_to_the_dense_weight(bits, group, symmetric):
    from compressed_tensors.compressors.pack_quantized import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from slimkit.export.compressed_tensors import weight_scheme

    torch.manual_seed(bits)
    q = QuantLinear.from_linear(nn.Linear(64, 40), bits, group, symmetric)
    tensors = layer_tensors(q)
    if not symmetric:
        assert tensors["weight_zero_point"].shape == (-(-40 * bits // 32), q.scale.shape[1])  # packed along out
    args = {k: v for k, v in weight_scheme(q).items() if k != "observer_kwargs"}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    out = PackedQuantizationCompressor.decompress(tensors, scheme)
    assert torch.equal(out["weight"], q.dense_weight())


@needs_ct
@pytest.mark.parametrize("arch,cfg", [("llama", slimkit.RTN(bits=4, group_size=32, ignore=("lm_head",))),
                                      ("qwen2", slimkit.RTN(bits={"re:.*mlp.*": 8, "default": 4}, group_size=32)),
                                      ("mistral", slimkit.RTN(bits=4))])
def test_transformers_loads_the_folder_with_slimkit_logits(arch, cfg, tmp_path):
    import transformers
    from compressed_tensors.quantization import QuantizationConfig

    model = tiny_causal_lm(arch)
    slimkit.quantize_(model, cfg)
    result = export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])  # the package's own schema accepts it
    assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
    if arch == "llama":
        assert result.dense == ("lm_head",) and config["quantization_config"]["ignore"] == ["lm_head"]
    if arch == "qwen2":
        assert len(qc.config_groups) == 2  # 8-bit MLP, 4-bit attention and lm_head: exact names per group
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = token_batches(2, 16)
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # the same weights, decompressed exactly
    size = sum(os.path.getsize(p) for p in (tmp_path / "ct").iterdir())
    assert result.size_bytes == size


def test_folder_tensors_are_slimkit_bytes_and_the_export_is_atomic(tmp_path):
    from safetensors.torch import load_file

    model = tiny_causal_lm("llama", layers=1)
    slimkit.quantize_(model, slimkit.RTN(bits=4, group_size=32))
    out = tmp_path / "ct"
    export_compressed_tensors(model, out)
    t = load_file(out / "model.safetensors")
    q = model.model.layers[0].mlp.down_proj
    packed = t["model.layers.0.mlp.down_proj.weight_packed"]
    assert torch.equal(packed.view(torch.uint8).reshape(q.qweight.shape), q.qweight)  # same bits, little-endian
    assert torch.equal(t["model.layers.0.mlp.down_proj.weight_scale"], q.scale)
    assert t["model.layers.0.mlp.down_proj.weight_shape"].tolist() == [64, 128]
    assert "model.layers.0.mlp.down_proj.weight" not in t and "model.norm.weight" in t
    q.register_buffer("g_idx", torch.zeros(128, dtype=torch.int32))  # act-order: refused, old folder intact
    with pytest.raises(UnsupportedError, match="model.layers.0.mlp.down_proj.*act-order"):
        export_compressed_tensors(model, out)
    assert load_file(out / "model.safetensors").keys() == t.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]  # no temporary folder left behind


def test_refusals_name_the_fix(tmp_path):
    with pytest.raises(UnsupportedError, match="quantize it first"):
        export_compressed_tensors(tiny_causal_lm("llama", layers=1), tmp_path / "a")
    model = tiny_causal_lm("llama", layers=1)
    slimkit.quantize_(model, slimkit.RTN(bits=1))
    with pytest.raises(UnsupportedError, match="1-bit"):
        export_compressed_tensors(model, tmp_path / "b")
    r = slimkit_cli("export", "compressed-tensors", tmp_path / "missing", tmp_path / "c")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_cli_writes_the_folder(tmp_path):
    model = tiny_causal_lm("llama", layers=1)
    slimkit.quantize_(model, slimkit.RTN(bits=4, group_size=32))
    slimkit.save(model, tmp_path / "ckpt")
    r = slimkit_cli("export", "compressed-tensors", tmp_path / "ckpt", tmp_path / "ct", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["quantized"]) == 8 and got["dense"] == []  # 7 Linears + lm_head
    assert got["size_bytes"] == sum(p.stat().st_size for p in (tmp_path / "ct").iterdir())
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"
