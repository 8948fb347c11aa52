"""Integer kernels of QuantLinear: each compared with the dequantize reference (and float64 maths)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.quantization import kernels as K
from slimkit.quantization.modules import QuantLinear
from slimkit.quantization.primitives import dequantize_weight


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts with no measured plan, under the 'auto' policy users get (conftest sets 'reference')."""
    K.clear_probe_cache()
    with K.kernel_policy("auto"):
        yield
    K.clear_probe_cache()


def _layer(out_f=64, in_f=128, bits=8, group_size=None, symmetric=True, bias=True, seed=0, **kw) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    return QuantLinear.from_linear(lin, bits=bits, group_size=group_size, symmetric=symmetric, **kw)


def _f64_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T + b in float64 from the stored codes: the slow, obvious answer."""
    w = dequantize_weight(layer.codes(), layer.scale, layer.zero, layer.group_size).double()
    y = x.double() @ w.t()
    return y if layer.bias is None else y + layer.bias.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, True), (4, 64, False), (4, 128, True)])
def test_every_fitting_kernel_matches_float64(bits, group_size, symmetric):
    layer = _layer(out_f=48, in_f=256, bits=bits, group_size=group_size, symmetric=symmetric)
    x = torch.randn(5, 256)
    ref = _f64_reference(layer, x)
    specs = K.candidates(layer)
    assert {s.name for s in specs} == {"int8pack" if bits == 8 else "int4pack", "blocked"}
    for spec in specs:
        y = K._Prepared(spec, layer)(x) + layer.bias
        # fp32 activations: summation order only; bf16 activations: 8 significant bits of each input
        assert _rel(y, ref) < (1e-5 if spec.act_dtype == torch.float32 else 1e-2), spec.label


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 4), symmetric=st.booleans(), seed=st.integers(0, 10_000))
def test_int4pack_scales_and_zeros_reproduce_slimkit_dequantization(groups, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    out_f, gs = 16, 32
    codes = torch.randint(-8, 8, (out_f, groups * gs), generator=g) if symmetric else \
        torch.randint(0, 16, (out_f, groups * gs), generator=g)
    scale = torch.rand(out_f, groups, generator=g) + 0.01
    zero = None if symmetric else torch.randint(0, 16, (out_f, groups), generator=g).to(torch.uint8)
    sz = K.int4pack_scales_and_zeros(scale, zero)
    assert sz.shape == (groups, out_f, 2)
    # aten's formula: (u - 8) * scale + offset, per group
    u = K.int4pack_codes(codes, symmetric).double()
    s = sz[..., 0].t().repeat_interleave(gs, 1).double()
    off = sz[..., 1].t().repeat_interleave(gs, 1).double()
    aten = (u - 8) * s + off
    expected = dequantize_weight(codes, scale, zero, gs).double()
    assert torch.allclose(aten, expected, atol=1e-5)


@pytest.mark.parametrize("mode,symmetric", [("dynamic_token", True), ("dynamic_token", False),
                                            ("dynamic", False), ("static", False), ("static", True)])
def test_int_mm_equals_fake_quant_reference(mode, symmetric):
    layer = _layer(out_f=32, in_f=64, bits=8, act_mode=mode, act_symmetric=symmetric)
    if mode == "static":
        layer.set_input_qparams(torch.tensor(0.02), torch.tensor(0 if symmetric else 131))
    x = torch.randn(24, 64) * 1.5
    assert K.integer_kernels(layer) == [K.KernelSpec("int_mm")]
    with torch.no_grad():
        ref = layer.reference_forward(x)
        y = K._Prepared(K.KernelSpec("int_mm"), layer)(x) + layer.bias
    # integer accumulation is exact; the reference sums fake-quantized floats
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5)


def test_int_mm_with_smoothing_multiplier():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 32)
    mult = torch.rand(64) + 0.5
    layer = QuantLinear.from_linear(lin, bits=8, act_mode="dynamic_token", input_multiplier=mult)
    x = torch.randn(20, 64)
    with torch.no_grad():
        y = K._Prepared(K.KernelSpec("int_mm"), layer)(x) + layer.bias
        assert torch.allclose(y, layer.reference_forward(x), atol=1e-4)


def test_int8_rows_shift_keeps_code_minus_zero():
    x = torch.randn(4, 16)
    scale, zero = torch.full((4, 1), 0.02), torch.full((4, 1), 140, dtype=torch.int32)
    codes, z = K.int8_rows(x, scale, zero, symmetric=False)
    from slimkit.quantization.primitives import quantize

    q = quantize(x, scale, zero, 8, False)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.long() - z.long(), q.long() - zero.long())


@pytest.mark.parametrize("kwargs,fits", [
    ({"bits": 4, "group_size": 16}, False),  # aten's int4 groups are 32..256
    ({"bits": 4, "group_size": 32, "out_f": 40}, False),  # rows must be a multiple of 16
    ({"bits": 3, "group_size": 32}, False),
    ({"bits": 8, "group_size": 32}, False),  # int8pack takes one scale per row only
    ({"bits": 8, "symmetric": False}, False),
    ({"bits": 8}, True),
    ({"bits": 4, "group_size": 32}, True),
])
def test_candidates_respect_each_kernels_layout(kwargs, fits):
    kwargs = {"out_f": 32, "in_f": 128, **kwargs}
    layer = _layer(**kwargs)
    assert bool(K.integer_kernels(layer)) == fits
    # the blocked path takes every layout whose codes fill whole bytes
    assert (K.KernelSpec("blocked") in K.candidates(layer)) == (kwargs["bits"] != 3)


def test_integer_kernels_offer_both_activation_dtypes_native_bf16_first(monkeypatch):
    layer = _layer(bits=8)
    for native, first in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(K, "has_native_bf16", lambda flags=None, n=native: n)
        acts = [s.act_dtype for s in K.integer_kernels(layer)]
        assert acts[0] == first and set(acts) == {torch.bfloat16, torch.float32}


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4]), symmetric=st.booleans(), seed=st.integers(0, 10_000))
def test_unpack_bytes_into_decodes_what_pack_wrote(bits, symmetric, seed):
    from slimkit.quantization.primitives import pack, qrange, unpack

    g = torch.Generator().manual_seed(seed)
    lo, hi = qrange(bits, symmetric)
    codes = torch.randint(lo, hi + 1, (3, 16), generator=g)
    packed = pack(codes, bits, symmetric=symmetric)
    shift = 2 ** (bits - 1) if symmetric else 0  # stored codes: signed ones shifted up
    out = torch.full((3, 16), -99.0)
    K.unpack_bytes_into(packed, out, bits, torch.empty_like(packed))
    assert torch.equal(out.long() - shift, codes)
    K.unpack_bytes_into(packed, out, bits, torch.empty_like(packed), shift=shift)  # shifted back in uint8
    assert torch.equal(out.long(), codes)
    assert torch.equal(out.long(), unpack(packed, bits, 16, symmetric=symmetric).long())


@pytest.mark.parametrize("kwargs", [
    {"bits": 8}, {"bits": 8, "symmetric": False, "group_size": 32}, {"bits": 4, "group_size": 32},
    {"bits": 4, "group_size": 64, "symmetric": False}, {"bits": 2, "group_size": 16, "symmetric": False},
    {"bits": 4, "group_size": None, "bias": False},
])
def test_blocked_path_equals_float64_across_several_blocks(monkeypatch, kwargs):
    monkeypatch.setattr(K, "BLOCK_BYTES", 16 * 4 * 128)  # 16 rows a block: 48 rows take three blocks
    layer = _layer(out_f=48, in_f=128, **kwargs)
    x = torch.randn(7, 128)
    y = K._Prepared(K.KernelSpec("blocked"), layer)(x)
    if layer.bias is not None:
        y = y + layer.bias
    assert _rel(y, _f64_reference(layer, x)) < 1e-6


@pytest.mark.parametrize("mode", ["static", "dynamic_token"])
def test_blocked_path_quantizes_the_input_as_the_reference_does(mode):
    torch.manual_seed(3)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=8, act_mode=mode,
                                    input_multiplier=torch.rand(64) + 0.5)
    if mode == "static":
        layer.set_input_qparams(torch.tensor(0.02), torch.tensor(131))
    x = torch.randn(9, 64)
    with torch.no_grad():
        y = K._Prepared(K.KernelSpec("blocked"), layer)(x) + layer.bias
        assert torch.allclose(y, layer.reference_forward(x), atol=1e-5)


def test_act_order_layers_take_no_kernel_and_say_why():
    layer = QuantLinear(128, 32, bits=4, group_size=32, g_idx=True)
    assert K.candidates(layer) == []
    assert "act-order" in K.plan_layer(layer).reason


def test_forced_kernel_runs_in_forward_and_equals_reference():
    layer = _layer(out_f=64, in_f=128, bits=4, group_size=32, symmetric=False)
    x = torch.randn(2, 3, 128)
    with torch.no_grad(), K.kernel_policy("force"):
        y = layer(x)
        plan = K.prepare_kernels(layer)[""]
        assert plan.decode is not None and plan.decode.name == "int4pack"
        ref = layer.reference_forward(x)
    assert y.shape == (2, 3, 64)
    assert torch.allclose(y, ref, atol=1e-4)


def test_reference_policy_never_runs_a_kernel(monkeypatch):
    layer = _layer()
    called = []
    monkeypatch.setattr(K._Prepared, "__call__", lambda self, x: called.append(1))
    with torch.no_grad(), K.kernel_policy("reference"):
        layer(torch.randn(2, 128))
        assert K.run_kernel(layer, torch.randn(2, 128)) is None
    assert called == []


def test_stale_kernel_is_rebuilt_after_load_state_dict():
    a, b = _layer(seed=0), _layer(seed=1)
    x = torch.randn(3, 128)
    with torch.no_grad(), K.kernel_policy("force"):
        a(x)  # binds a kernel to a's codes
        a.load_state_dict(b.state_dict())  # writes in place: the bound kernel must notice
        assert torch.allclose(a(x), b.reference_forward(x), atol=1e-4)


def test_gradients_flow_through_the_reference_path():
    layer = _layer()
    x = torch.randn(3, 128, requires_grad=True)
    with K.kernel_policy("force"):
        layer(x).sum().backward()
    expected = layer.dense_weight().sum(dim=0)
    assert torch.allclose(x.grad, expected.expand(3, -1), atol=1e-5)


def _fake_timings(monkeypatch, table):
    """Make the probe see fixed times: ``table`` maps a path label ('reference', 'fp32 F.linear', a kernel) to ms."""
    # paths the table does not name are slow: never the winner
    monkeypatch.setattr(K, "_time_path", lambda label, fn: table.get(label, 1e9))
    monkeypatch.setattr(K, "_run_once_ms", lambda label, fn: table.get(label, 1e9))


def test_auto_takes_a_kernel_only_where_it_was_measured_to_win(monkeypatch):
    monkeypatch.setattr(K, "has_native_bf16", lambda flags=None: False)
    layer = _layer(bits=8)
    label = K.KernelSpec("int8pack").label
    _fake_timings(monkeypatch, {"reference": 1.0, "fp32 F.linear": 0.5, label: 0.2})
    plan = K.plan_layer(layer)
    assert plan.decode == K.KernelSpec("int8pack") and plan.prefill == K.KernelSpec("int8pack")
    K.clear_probe_cache()
    layer = _layer(bits=8)  # a fresh layer: the first is bound to its plan
    _fake_timings(monkeypatch, {"reference": 1.0, "fp32 F.linear": 0.5, label: 0.95})  # within MIN_GAIN: not taken
    plan = K.plan_layer(layer)
    assert plan.decode is None and plan.prefill is None and "no kernel beat it" in plan.reason


def test_a_kernel_that_disagrees_with_the_reference_is_never_taken(monkeypatch):
    monkeypatch.setattr(K, "has_native_bf16", lambda flags=None: False)
    layer = _layer(bits=8)
    real_call = K._Prepared.__call__
    monkeypatch.setattr(K._Prepared, "__call__", lambda self, x: real_call(self, x) * 1.5)  # a wrong kernel
    plan = K.plan_layer(layer)
    assert plan.decode is None and plan.prefill is None
    assert K.KernelSpec("int8pack").label not in plan.timings_ms["1 row"]


def test_torch_without_the_kernels_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(K, "_has_op", lambda name: False)
    layer = _layer(bits=8)
    plan = K.plan_layer(layer)
    assert plan.decode in (None, K.KernelSpec("blocked")) and "no integer kernels" in plan.reason
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-5)


def test_prefill_screen_drops_paths_far_behind_and_never_times_them_at_full_size(monkeypatch):
    monkeypatch.setattr(K, "has_native_bf16", lambda flags=None: False)
    fp32_kernel, bf16_kernel = K.KernelSpec("int8pack").label, K.KernelSpec("int8pack", torch.bfloat16).label
    timed = []
    table = {"reference": 1.0, "fp32 F.linear": 0.5, fp32_kernel: 5.0, bf16_kernel: 0.3, "dequantize-blocked (fp32)": 0.55}
    monkeypatch.setattr(K, "_run_once_ms", lambda label, fn: table[label])
    monkeypatch.setattr(K, "_time_path", lambda label, fn: timed.append(label) or table[label])
    plan = K.plan_layer(_layer(bits=8))
    assert plan.decode == K.KernelSpec("int8pack", torch.bfloat16) == plan.prefill
    full = plan.timings_ms[f"{K.PREFILL_ROWS} rows"]
    assert fp32_kernel not in full and bf16_kernel in full and "dequantize-blocked (fp32)" in full
    assert timed.count(fp32_kernel) == 1  # decode only: screened out before the 256-row run
    assert plan.timings_ms[f"{K.SCREEN_ROWS} rows, one run"][fp32_kernel] == 5.0


def test_plans_are_cached_per_layout(monkeypatch):
    calls = []
    real = K._measure
    monkeypatch.setattr(K, "_measure", lambda layer, specs: calls.append(1) or real(layer, specs))
    a, b = _layer(seed=0), _layer(seed=1)
    K.plan_layer(a)
    K.plan_layer(b)  # same shape and layout: no second probe
    assert len(calls) == 1


def test_onnx_export_traces_the_reference_path(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import export_onnx
    from slimkit.tasks import GenericTask, set_task

    model = torch.nn.Sequential(_layer(out_f=32, in_f=64))
    set_task(model, GenericTask(example_inputs=torch.randn(2, 64)))
    with torch.no_grad(), K.kernel_policy("force"):
        model(torch.randn(2, 64))  # a kernel is bound before the export
        exported = export_onnx(model, tmp_path / "m.onnx")
    assert exported.path.exists()
    assert "_weight_int8pack_mm" not in (tmp_path / "m.onnx").read_bytes().decode("latin-1")


def test_isa_names_from_flags():
    from slimkit.core.machine import cpu_isa

    assert cpu_isa(frozenset({"avx2", "fma"})) == "AVX2"
    assert cpu_isa(frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})) == "AVX-512 VNNI + BF16"
    assert cpu_isa(frozenset({"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16"})) == "AMX + BF16"


def test_auto_policy_end_to_end_stays_within_activation_rounding(tiny_llama):
    """Whatever the probe picks on this machine, the model's logits stay those of the reference path."""
    import slimkit as sk

    sk.quantize_(tiny_llama, sk.RTN(bits=8))
    ids = torch.arange(1, 33).reshape(1, -1)
    with torch.no_grad():
        with K.kernel_policy("reference"):
            ref = tiny_llama(ids).logits
        with K.kernel_policy("auto"):
            plans = K.prepare_kernels(tiny_llama)
            out = tiny_llama(ids).logits
    assert len(plans) == 15 and all(p.timings_ms for p in plans.values())
    assert _rel(out, ref) < 2e-2
