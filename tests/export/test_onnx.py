"""ONNX export: float models match PyTorch, quantized layers become real int8 graphs that ORT fuses."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from slimkit.core.errors import SlimkitError, UnsupportedError
from slimkit.export import onnx as sk_onnx
from slimkit.export import ort as sk_ort
from slimkit.export.onnx import (
    check_onnx,
    export_onnx,
    op_counts,
    ort_op_counts,
    ort_session,
    quantized_tolerance,
    run_onnx,
)
from slimkit.quantization.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quantization.primitives import tensor_qparams

INT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16}
VOCAB, DIM, HIDDEN = 512, 64, 256


def initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def float_inits_of_shape(path, shape) -> list[str]:
    """Float initializers whose shape is ``shape`` or its transpose (a float copy of a weight)."""
    shapes = {tuple(shape), tuple(reversed(shape))}
    return [n for n, t in initializers(path).items() if t.data_type == TensorProto.FLOAT and tuple(t.dims) in shapes]


def int_init(path, shape) -> onnx.TensorProto:
    """The one integer initializer of exactly ``shape``."""
    found = [t for t in initializers(path).values() if t.data_type in INT_TYPES and tuple(t.dims) == tuple(shape)]
    assert len(found) == 1, [(t.name, t.dims) for t in initializers(path).values()]
    return found[0]


def calibrate(layer, x, symmetric=False):
    """Static input qparams from the data's min/max (what a MinMax observer gives)."""
    scale, zero = tensor_qparams(x, 8, symmetric=symmetric)
    layer.set_input_qparams(scale, zero)


def assert_matches(model, path, x):
    """ORT == the eager fake-quant forward: within check_onnx's default tolerance everywhere, and
    to float precision almost everywhere. (ORT's and PyTorch's floats differ in the last bits, so
    a value on a rounding boundary may land on the neighbouring input code of a layer, moving
    that row's outputs by about one code step: allowed by the tolerance, rare by the median.)"""
    diff = check_onnx(model, path, x)  # raises above the default tolerance
    got = run_onnx(ort_session(path), {"input": x})[0]
    ref = model(x).detach().numpy()
    assert np.median(np.abs(got - ref)) < 1e-5 * np.abs(ref).max()
    return diff


class TokenMLP(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear, on token ids (B, T)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def quantized_mlp(act_mode="static", symmetric=False, bits=8, group_size=None, embedding=True, weight_symmetric=True):
    m = TokenMLP().eval()
    with torch.no_grad():
        x1 = m.emb(torch.randint(0, VOCAB, (8, 16)))
        x2 = torch.relu(m.fc1(x1))
    fc1 = QuantLinear.from_linear(m.fc1, bits, group_size, weight_symmetric, act_mode=act_mode, act_symmetric=symmetric)
    fc2 = QuantLinear.from_linear(m.fc2, bits, group_size, weight_symmetric, act_mode=act_mode, act_symmetric=symmetric)
    if act_mode == "static":
        calibrate(fc1, x1, symmetric)
        calibrate(fc2, x2, symmetric)
    m.fc1, m.fc2 = fc1, fc2
    if embedding:
        m.emb = QuantEmbedding.from_embedding(m.emb, 8)
    return m.eval()


# -- float exports --------------------------------------------------------------------------
def test_fp32_llama_matches_torch_at_other_shapes(tiny_llama, tmp_path):
    result = export_onnx(tiny_llama, tmp_path / "lm.onnx", check=True)
    assert result.max_abs_diff < 1e-4
    session = ort_session(result.path)
    # A causal LM is written as the decoder-with-past graph (slimkit.export.onnx_decoder); run_onnx
    # feeds it an empty cache when given only the ids and the mask.
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in session.get_outputs()] == ["logits", *(n.replace("past_key_values", "present")
                                                                   for n in past)]
    ids = torch.randint(0, 128, (1, 5))
    got = run_onnx(session, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
    ref = tiny_llama(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert got.shape == (1, 5, 128)
    assert np.abs(got - ref.detach().numpy()).max() < 1e-4
    assert not tiny_llama.training and not any(m.training for m in tiny_llama.modules())


def test_fp32_bert_encoder_with_padding(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()
    path = export_onnx(bert, tmp_path / "bert.onnx").path
    assert [o.name for o in ort_session(path).get_outputs()] == ["last_hidden_state"]
    ids = torch.randint(0, 100, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # a padded row
    assert check_onnx(bert, path, {"input_ids": ids, "attention_mask": mask}) < 1e-4


def test_fp32_digits_cnn_needs_no_example(tmp_path):
    import slimkit

    cnn = slimkit.load("digits-cnn")
    path = export_onnx(cnn, tmp_path / "cnn.onnx").path
    x = torch.rand(5, 1, 8, 8)
    assert check_onnx(cnn, path, x) < 1e-4
    assert op_counts(path)["Conv"] == 3
    proto = onnx.load(str(path))
    assert all(len(n.metadata_props) == 0 for n in proto.graph.node)  # no exporter stack traces in the file
    assert {p.key for p in proto.metadata_props} == {"slimkit.notes", "slimkit.ort_session_config"}


# -- quantized: static uint8 activations (the speed path) ---------------------------------
def test_static_int8_linear_and_embedding_are_int8_in_file_and_fused(tmp_path):
    float_path = export_onnx(TokenMLP().eval(), tmp_path / "fp32.onnx", example=IDS).path
    model = quantized_mlp("static")
    with torch.no_grad():
        # Full-range codes: the u8s8 GEMM of x86 CPUs without VNNI saturates on them unless
        # ort_session asks for the exact kernel (session.x64quantprecision).
        gen = torch.Generator().manual_seed(0)
        model.fc2.qweight.copy_(torch.randint(-127, 128, model.fc2.qweight.shape, generator=gen).to(torch.int8))
    result = export_onnx(model, tmp_path / "int8.onnx", example=IDS)
    path = result.path
    # (a) int8 codes in the file, exactly slimkit's, and no float copy of any weight
    w1 = int_init(path, (DIM, HIDDEN))  # fc1's codes, transposed to (in, out)
    assert w1.data_type == TensorProto.INT8
    assert np.array_equal(onnx.numpy_helper.to_array(w1), model.fc1.codes().t().numpy())
    assert int_init(path, (HIDDEN, DIM)).data_type == TensorProto.INT8
    table = int_init(path, (VOCAB, DIM))
    assert np.array_equal(onnx.numpy_helper.to_array(table), model.emb.codes().numpy())
    for shape in [(DIM, HIDDEN), (HIDDEN, DIM), (VOCAB, DIM)]:
        assert float_inits_of_shape(path, shape) == []
    counts = op_counts(path)
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 4
    # (b) ORT matches the eager fake-quant forward
    assert_matches(model, path, IDS)
    # (c) ORT runs both Linears as int8 GEMMs
    kernels = ort_op_counts(path)
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 2, kernels
    assert "MatMul" not in kernels
    # (f) the int8 file is much smaller than the float one
    assert os.path.getsize(path) < 0.35 * os.path.getsize(float_path)
    assert any(n.startswith("fc1: QuantLinear W8: static uint8") for n in result.notes)
    assert any(n.startswith("emb: QuantEmbedding 8-bit: int8 table") for n in result.notes)


def test_static_symmetric_int8_activations(tmp_path):
    model = quantized_mlp("static", symmetric=True)
    # A scale 4x too small: most inputs saturate. Symmetric codes stop at -127 (QuantizeLinear alone: -128).
    model.fc1.set_input_qparams(model.fc1.act_scale / 4, torch.tensor(0))
    path = export_onnx(model, tmp_path / "s8.onnx", example=IDS).path
    assert_matches(model, path, IDS)
    assert op_counts(path)["Clip"] == 2
    assert ort_op_counts(path).get("MatMulIntegerToFloat") == 2
    # the check has teeth: a model that no longer matches the file is reported
    with torch.no_grad():
        model.fc2.scale.mul_(1.5)
    with pytest.raises(SlimkitError, match="'logits' differs from PyTorch by"):
        check_onnx(model, path, IDS)


def test_dynamic_activations_use_integer_matmul(tmp_path):
    model = quantized_mlp("dynamic")
    model.fc2.act_symmetric = True  # fc1: uint8 DynamicQuantizeLinear; fc2: symmetric int8 per batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    result = export_onnx(model, tmp_path / "dyn.onnx", example=IDS)
    # the layers were swapped on a copy: the user's model is untouched
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    counts = op_counts(result.path)
    assert counts["DynamicQuantizeLinear"] == 1 and counts["MatMulInteger"] == 2
    assert "DequantizeLinear" not in counts
    assert int_init(result.path, (DIM, HIDDEN)).data_type == TensorProto.INT8
    kernels = ort_op_counts(result.path)
    assert kernels.get("DynamicQuantizeMatMul", 0) + kernels.get("MatMulIntegerToFloat", 0) == 2, kernels
    assert "MatMulInteger" not in kernels
    assert_matches(model, result.path, IDS)
    assert_matches(model, result.path, torch.randint(0, VOCAB, (5, 9)))


def test_low_bit_weights_export_exactly(tmp_path):
    """fc1: 4-bit asymmetric codes -> one MatMulNBits node carrying slimkit's own bytes;
    fc2: binary (1-bit) codes unpacked into an int8 DequantizeLinear; weight-only, so at
    ORT's exact accuracy level there is no input rounding at all."""
    from slimkit.export.nbits import set_accuracy_level

    model = quantized_mlp(None, bits=4, embedding=False, weight_symmetric=False)
    model.fc2 = QuantLinear.from_linear(TokenMLP().fc2, 1)
    path = export_onnx(model, tmp_path / "low.onnx", example=IDS).path
    assert op_counts(path)["MatMulNBits"] == 1
    codes1 = onnx.numpy_helper.to_array(int_init(path, (HIDDEN, DIM)))
    assert codes1.dtype == np.int8  # 1-bit codes unpacked into an 8-bit container
    assert np.array_equal(codes1, model.fc2.codes().t().numpy()) and sorted(np.unique(codes1)) == [-1, 1]
    set_accuracy_level(path, 0)  # float compute in MatMulNBits: exact up to float rounding
    assert check_onnx(model, path, IDS, atol=1e-5) < 1e-5


def test_group_wise_weights_export_as_float_with_note(tmp_path):
    model = quantized_mlp("static", bits=4, group_size=16, embedding=False)
    result = export_onnx(model, tmp_path / "g.onnx", example=IDS)
    assert float_inits_of_shape(result.path, (DIM, HIDDEN))  # dequantized float weight
    assert not [t for t in initializers(result.path).values() if t.data_type in INT_TYPES and t.dims == [DIM, HIDDEN]]
    assert any("group-wise weights (group_size=16) exported as float" in n for n in result.notes)
    assert op_counts(result.path)["QuantizeLinear"] == 2  # the input quantization is kept
    assert_matches(model, result.path, IDS)


def test_16bit_weights_int16_at_opset_21_else_float(tmp_path):
    model = quantized_mlp("static", bits=16, embedding=False)
    path = export_onnx(model, tmp_path / "w16.onnx", example=IDS).path
    assert onnx.load(str(path)).opset_import[0].version == 21
    assert int_init(path, (DIM, HIDDEN)).data_type == TensorProto.INT16
    assert_matches(model, path, IDS)
    result = export_onnx(model, tmp_path / "w16f.onnx", example=IDS, opset=20)
    assert any("int16 DequantizeLinear needs opset >= 21" in n for n in result.notes)
    assert float_inits_of_shape(result.path, (DIM, HIDDEN))


def test_static_conv_is_int8_per_out_channel(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=2)).eval()
    x = torch.rand(4, 3, 12, 12)
    with torch.no_grad():
        h = model[1](model[0](x))
    for i, inp in ((0, x), (2, h)):
        q = QuantConv2d.from_conv(model[i], 8, act_mode="static")
        calibrate(q, inp)
        model[i] = q
    result = export_onnx(model, tmp_path / "conv.onnx", example=x)
    kernel = int_init(result.path, (8, 8, 3, 3))
    assert np.array_equal(onnx.numpy_helper.to_array(kernel), model[2].codes().reshape(8, 8, 3, 3).numpy())
    assert float_inits_of_shape(result.path, (16, 3, 3, 3)) == []
    inits = initializers(result.path)
    dq_axes = [a.i for n in onnx.load(str(result.path)).graph.node if n.op_type == "DequantizeLinear"
               for a in n.attribute if a.name == "axis" and n.input[0] in inits]
    assert dq_axes == [0, 0]
    # ORT runs the first Conv as QLinearConv (its ReLU output requantized for the second's input)
    assert_matches(model, result.path, torch.rand(2, 3, 12, 12))


def test_default_tolerance_covers_one_code_step_per_layer():
    model = quantized_mlp("static", embedding=False)
    tol = quantized_tolerance(model, IDS)
    ref = model(IDS).abs().max().item()
    steps = sum(float(m.act_scale) * m.dense_weight().abs().max().item() for m in (model.fc1, model.fc2))
    assert tol == pytest.approx(1e-4 * ref + 1e-6 + sk_onnx.FLIPS_PER_LAYER * steps, rel=1e-5)
    assert tol < 0.1 * ref  # still tight enough to catch a wrong scale or zero point


# -- robustness ---------------------------------------------------------------------------
class Odd(nn.Module):
    """A module slimkit knows nothing about: it is exported as its float graph."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return torch.cumsum(x, dim=-1) * self.alpha + torch.tanh(x)


def test_unknown_module_beside_quantized_layer_exports_as_float(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Odd()).eval()
    model[0] = QuantLinear.from_linear(model[0], 8)
    x = torch.randn(3, 8)
    result = export_onnx(model, tmp_path / "odd.onnx", example=x, check=True)
    assert result.max_abs_diff < 1e-4
    assert op_counts(result.path)["CumSum"] == 1


def test_failed_export_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old model")

    def boom(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(UnsupportedError, match="RuntimeError: exporter crashed"):
        export_onnx(TokenMLP().eval(), path, example=IDS)
    assert path.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_interrupted_save_leaves_existing_file_intact(tmp_path, monkeypatch):
    from torch.onnx import ONNXProgram

    path = tmp_path / "model.onnx"
    path.write_bytes(b"old model")

    def half_save(self, destination, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ONNXProgram, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(TokenMLP().eval(), path, example=IDS)
    assert path.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_large_models_go_to_external_data(tmp_path, monkeypatch):
    model = quantized_mlp("static", embedding=False)
    path = tmp_path / "big.onnx"
    monkeypatch.setattr(sk_onnx, "EXTERNAL_DATA_BYTES", 0)  # every model counts as > 1.8 GB
    result = export_onnx(model, path, example=IDS)
    data = tmp_path / "big.onnx.data"
    assert result.files == (data, path) and data.stat().st_size > DIM * HIDDEN
    assert result.size_bytes == data.stat().st_size + path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temporary left
    assert_matches(model, path, IDS)  # ORT finds the weights beside the file


def test_plain_module_without_example_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedError, match="pass example="):
        export_onnx(nn.Linear(4, 2), tmp_path / "x.onnx")


def test_exporter_failure_names_the_op(tmp_path):
    class Svd(nn.Module):
        def forward(self, x):
            return torch.linalg.svdvals(x)

    with pytest.raises(UnsupportedError, match=r"ONNX export of Svd failed \(DispatchError: .*svd"):
        export_onnx(Svd(), tmp_path / "svd.onnx", example=torch.rand(2, 4, 4))
    assert not (tmp_path / "svd.onnx").exists()


def test_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(SlimkitError, match=r"pip install 'slimkit\[onnx\]'"):
        export_onnx(nn.Linear(4, 2), tmp_path / "x.onnx", example=torch.rand(2, 4))


def test_smoothed_reduced_range_static_quant_is_exact_in_a_default_session(tmp_path):
    """StaticQuant with smoothing + reduce_range: a Mul before Q, weights within ±63, so ORT's
    fast u8s8 kernel is exact without any session option (none is recorded in the file)."""
    from slimkit.core.calibration import CalibrationData
    from slimkit.core.registry import Context, handler_for
    from slimkit.quantization.ptq import StaticQuant

    model = TokenMLP().eval()
    with torch.no_grad():
        model.fc1.weight[:, 0] *= 20  # an outlier input channel for smoothing to move
    data = CalibrationData([torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(i))
                            for i in range(3)])
    cfg = StaticQuant(reduce_range=True, smooth_alpha=0.5)
    handler_for(cfg)(model, cfg, Context(data=data))
    assert model.fc1.input_multiplier is not None
    assert int(model.fc1.codes().abs().max()) <= 63
    result = export_onnx(model, tmp_path / "smooth.onnx", example=IDS)
    assert op_counts(result.path).get("Mul", 0) >= 2  # the smoothing multipliers
    assert not any("x64quantprecision" in n for n in result.notes)
    assert sk_onnx._recorded_session_config(result.path) == {}
    assert_matches(model, result.path, IDS)
    kernels = ort_op_counts(result.path)
    assert kernels.get("MatMulIntegerToFloat", 0) == 2, kernels


def test_exact_kernel_option_applies_only_where_the_cpu_saturates(tmp_path, monkeypatch):
    """A full-range int8 file records session.x64quantprecision; ort_session applies it only on
    CPUs whose u8s8 kernel saturates (no VNNI/AMX), and the output matches PyTorch either way
    on this machine's real kernel."""
    model = quantized_mlp("static")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        model.fc2.qweight.copy_(torch.randint(-127, 128, model.fc2.qweight.shape, generator=gen).to(torch.int8))
    path = export_onnx(model, tmp_path / "full.onnx", example=IDS).path
    assert sk_onnx._recorded_session_config(path) == {"session.x64quantprecision": "1"}
    monkeypatch.setattr(sk_ort, "cpu_saturates_u8s8", lambda: True)
    assert ort_session(path).get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    monkeypatch.setattr(sk_ort, "cpu_saturates_u8s8", lambda: False)
    assert _entry_absent(ort_session(path).get_session_options())
    monkeypatch.undo()
    assert_matches(model, path, IDS)  # with whatever this CPU needs


def _entry_absent(options) -> bool:
    try:
        return options.get_session_config_entry("session.x64quantprecision") in ("", None)
    except Exception:  # ORT raises for a key that was never set
        return True


def test_cpu_flags_decide_saturation(monkeypatch, tmp_path):
    """x86-64 with VNNI or AMX flags: exact u8s8; without: saturating; other machines: never."""
    import platform
    from pathlib import Path as RealPath

    def fake(machine, flags):
        sk_ort.cpu_saturates_u8s8.cache_clear()
        monkeypatch.setattr(platform, "machine", lambda: machine)
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(sk_ort, "Path", lambda p: info if str(p) == "/proc/cpuinfo" else RealPath(p))
        return sk_ort.cpu_saturates_u8s8()

    try:
        assert fake("x86_64", "sse4_2 avx2 fma") is True
        assert fake("x86_64", "avx2 avx512f avx512_vnni") is False
        assert fake("x86_64", "avx2 avx_vnni") is False
        assert fake("x86_64", "avx2 amx_tile amx_int8") is False
        assert fake("aarch64", "fp asimd") is False
    finally:
        sk_ort.cpu_saturates_u8s8.cache_clear()
