"""GGUF block grids: llama.cpp's rules, checked against slow float64 references and GPTQ on a grid."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError
from slimkit.quantization.gptq import GPTQ, gptq_quantize
from slimkit.quantization.grids import GRIDS, fp16_value, grid_for_columns
from slimkit.quantization.weight_only import RTN


def _f16(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32).to(torch.float16).float())


def _ref_q4_0(block: list[float]) -> tuple[float, list[int]]:
    """llama.cpp's quantize_row_q4_0_ref for one block, codes rounded against the stored fp16 scale."""
    amax, mx = 0.0, 0.0
    for v in block:
        if abs(v) > amax:
            amax, mx = abs(v), v
    d = _f16(mx / -8.0) or 1.0
    return d, [max(-8, min(7, round(v / d))) for v in block]


def _ref_q8_0(block: list[float]) -> tuple[float, list[int]]:
    d = _f16(max(abs(v) for v in block) / 127.0) or 1.0
    return d, [max(-127, min(127, round(v / d))) for v in block]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e2))
def test_block_grids_match_llama_cpp_rules(seed, scale):
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale
    for name, ref in (("q4_0", _ref_q4_0), ("q8_0", _ref_q8_0)):
        qw = GRIDS[name].quantize(w)
        for r in range(3):
            for b in range(2):
                block = [float(v) for v in w[r, 32 * b:32 * b + 32]]
                d, codes = ref(block)
                assert float(qw.scale[r, b]) == d
                # round-half-even (torch) vs Python's round: both are half-to-even
                assert qw.q[r, 32 * b:32 * b + 32].tolist() == codes


def test_q4_0_extreme_is_exact_and_sign_kept():
    w = torch.zeros(2, 32)
    w[0, 5], w[0, 6] = 2.0, -1.0  # positive extreme: d < 0, the extreme is code -8
    w[1, 7] = -3.0
    qw = GRIDS["q4_0"].quantize(w)
    assert float(qw.scale[0, 0]) == -0.25 and int(qw.q[0, 5]) == -8
    deq = qw.dequantize()
    assert float(deq[0, 5]) == 2.0 and float(deq[1, 7]) == -3.0
    assert torch.equal(deq[0, :5], torch.zeros(5))  # zeros stay zeros


@pytest.mark.parametrize("name", list(GRIDS))
def test_every_grid_round_trips_within_half_a_step(name):
    grid = GRIDS[name]
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    w[0, :64] = 0.0  # an all-zero group (and a K-quant super-block partly zero)
    qw = grid.quantize(w)
    assert qw.bits == grid.bits and qw.group_size == grid.group_size
    assert int(qw.q.min()) >= grid.qmin and int(qw.q.max()) <= grid.qmax
    assert (qw.zero is None) == grid.symmetric
    assert torch.isfinite(qw.scale).all() and bool((qw.scale != 0).all())
    deq = qw.dequantize()
    step = qw.scale.abs().repeat_interleave(grid.group_size, dim=1)
    # within half a step, plus the clamp of q4_0/q5_0's +extreme (one step) and the K-quants' 6/8-bit sub-scales
    slack = {"q4_k": 1.2, "q6_k": 1.1}.get(name, 1.0 if name in ("q4_0", "q5_0") else 0.5)
    assert bool(((deq - w).abs() <= step * slack + 1e-6).all())
    assert torch.equal(deq[0, :32], torch.zeros(32)) or not grid.symmetric


def test_k_quant_parameters_factor_into_fp16_times_small_integers():
    w = torch.randn(2, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    for name, top, per in (("q4_k", 63, 8), ("q6_k", 127, 16)):
        qw = GRIDS[name].quantize(w)
        s = qw.scale.reshape(-1, per).double()
        # some fp16 D makes every sub-scale a whole number of at most `top`
        found = False
        for j in range(top, 0, -1):
            D = s.abs().amax(dim=1, keepdim=True) / j
            if torch.equal(fp16_value(D.float()).double(), D) and bool(((s / D).round() == s / D).all()):
                found = True
                break
        assert found, name


def test_fallback_follows_llama_cpp():
    assert grid_for_columns("q4_k", 512).name == "q4_k"
    assert grid_for_columns("q4_k", 640).name == "q5_0"
    assert grid_for_columns("q6_k", 640).name == "q8_0"
    assert grid_for_columns("q4_0", 640).name == "q4_0"
    with pytest.raises(ConfigError, match="multiple of 32"):
        grid_for_columns("q4_0", 48)


def _ref_gptq_on_grid(W: torch.Tensor, H: torch.Tensor, grid) -> torch.Tensor:
    """Column-by-column GPTQ in float64 with the grid's parameters chosen at each run's first column."""
    W = W.clone().double()
    H = H.clone().double()
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    cols = W.shape[1]
    Q = torch.empty_like(W)
    scale = zero = None
    for c in range(cols):
        if c % grid.span == 0:
            scale, zero = grid.params(W[:, c:c + grid.span])
        g = (c % grid.span) // grid.group_size
        s = scale[:, g].double()
        z = None if zero is None else zero[:, g].double()
        x = W[:, c] / s + (0 if z is None else z)
        q = torch.round(x).clamp(grid.qmin, grid.qmax)
        Q[:, c] = (q - (0 if z is None else z)) * s
        e = (W[:, c] - Q[:, c]) / U[c, c]
        W[:, c + 1:] -= e.unsqueeze(1) * U[c, c + 1:].unsqueeze(0)
    return Q


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k", "q6_k"])
def test_gptq_on_a_grid_matches_float64_reference(name):
    grid = GRIDS[name]
    g = torch.Generator().manual_seed(3)
    cols = 512
    X = torch.randn(600, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64)
                                                                     + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols))
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(6, cols, generator=g, dtype=torch.float64) * 0.1
    result = gptq_quantize(W, H, bits=4, group_size=128, symmetric=True, grid=grid, block_size=64)
    ref = _ref_gptq_on_grid(W, H, grid)
    got = result.weight.dequantize().double()
    assert got.shape == W.shape and result.weight.group_size == grid.group_size
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)
    # and GPTQ beats plain rounding onto the same grid on the output error
    rtn = grid.quantize(W.float()).dequantize().double()
    err = lambda Q: float(torch.einsum("ij,jk,ik->", W - Q, H, W - Q))
    assert err(got) < err(rtn)


def test_gptq_on_a_grid_keeps_pruned_zeros():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, 64, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 300
    W = torch.randn(8, 64, generator=g, dtype=torch.float64)
    W[torch.rand(8, 64, generator=g) < 0.5] = 0.0
    for name in ("q4_0", "q8_0"):
        qw = gptq_quantize(W, H, bits=4, group_size=32, symmetric=True, grid=GRIDS[name]).weight
        assert bool((qw.dequantize()[W == 0] == 0).all())


def test_configs_validate_grid():
    with pytest.raises(ConfigError, match="grid"):
        GPTQ(grid="q3_k")
    with pytest.raises(ConfigError, match="act_order"):
        GPTQ(grid="q4_0", act_order=True)
    with pytest.raises(ConfigError, match="range_opt"):
        RTN(grid="q4_k", range_opt="mse")
    with pytest.raises(ConfigError, match="range_opt"):
        RTN(grid="q4_0", range_opt="hqq")
    assert RTN(grid="q4_0", range_opt="mse").range_opt == "mse"
    assert GPTQ(grid="q4_k").to_dict()["grid"] == "q4_k"


# --- grid layers in the rest of slimkit: storage, kernels, ONNX --------------------------


def _grid_model(name: str):
    from slimkit.quantization.modules import QuantLinear

    torch.manual_seed(5)
    lin = torch.nn.Linear(256, 64)
    return lin, QuantLinear.from_linear(lin, weight=GRIDS[name].quantize(lin.weight))


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k", "q5_0"])
def test_grid_layer_reloads_exactly(name, tmp_path):
    import slimkit as sk
    from slimkit.quantization.modules import QuantLinear

    _, ql = _grid_model(name)
    model = torch.nn.Sequential(ql)
    sk.save(model, tmp_path / "m")
    back = sk.load(str(tmp_path / "m"), skeleton=torch.nn.Sequential(torch.nn.Linear(256, 64)))
    assert isinstance(back[0], QuantLinear) and back[0].bits == GRIDS[name].bits
    assert (back[0].zero is not None and back[0].zero.dtype == torch.float32) == GRIDS[name].float_zero
    x = torch.randn(3, 256)
    assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k"])
def test_integer_kernels_on_grid_layers_equal_the_reference(name):
    from slimkit.quantization import kernels as K

    _, ql = _grid_model(name)  # q4_0: negative scales; q4_1/q4_k: fractional zero points
    x = torch.randn(2, 256)
    with torch.no_grad(), K.kernel_policy("force"):
        y = ql(x)
        ref = ql.reference_forward(x)
    assert torch.allclose(y, ref, atol=2e-2 * float(ref.abs().max()))  # bf16 activations in the kernel


def test_onnx_export_of_float_zero_layers_uses_matmulnbits(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import check_onnx, export_onnx

    _, ql = _grid_model("q4_k")
    model = torch.nn.Sequential(ql).eval()
    result = export_onnx(model, tmp_path / "m.onnx", example=torch.randn(2, 256))
    assert any("MatMulNBits" in n and "float zero points" in n for n in result.notes)
    assert check_onnx(model, tmp_path / "m.onnx", torch.randn(2, 256)) < 1e-2


def test_compressed_tensors_refuses_fractional_zero_points():
    from slimkit.export.compressed_tensors import _problem

    _, ql = _grid_model("q4_k")
    assert "fractional zero points" in _problem("fc", ql)


def test_gptq_fp16_scales_are_float16_values_and_still_beat_rtn():
    from slimkit.quantization.primitives import quantize_weight

    g = torch.Generator().manual_seed(6)
    X = torch.randn(400, 128, generator=g) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=g) / 11.3)
    H = 2 * X.T @ X / 400  # correlated inputs: where GPTQ's error feedback pays
    W = torch.randn(16, 128, generator=g)
    plain = gptq_quantize(W, H, bits=4, group_size=32, symmetric=True).weight
    half = gptq_quantize(W, H, bits=4, group_size=32, symmetric=True, fp16_scales=True).weight
    assert torch.equal(fp16_value(half.scale), half.scale) and not torch.equal(fp16_value(plain.scale), plain.scale)
    err = lambda q: float(torch.einsum("ij,jk,ik->", W - q.dequantize(), H, W - q.dequantize()))  # noqa: E731
    rtn = quantize_weight(W, 4, group_size=32, symmetric=True)  # round-to-nearest on the same grid
    assert err(half) < err(rtn) and err(half) < 1.05 * err(plain)
    assert GPTQ(fp16_scales=True).fp16_scales and GPTQ().to_dict()["fp16_scales"] is False


# --- GPTQ pruning while it quantizes (SparseGPT's joint mode) ------------------------------


def _ref_joint(W, H, bits, gs, sparsity, block):
    """Column by column in float64: each block's lowest w²/U_jj² pruned (its exact share), kept weights rounded on
    slimkit's symmetric grid from the group's kept range, every error fed forward (SparseGPT §3.5)."""
    from slimkit.quantization.primitives import scale_zero_from_range

    W = W.clone().double()
    H = H.clone().double()
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    out = torch.zeros_like(W)
    qmax = 2 ** (bits - 1) - 1
    for c in range(cols):
        if c % block == 0:
            k = round(sparsity * rows * (c + block)) - round(sparsity * rows * c)
            sal = (W[:, c:c + block] / torch.diag(U)[c:c + block]).pow(2)
            flat = torch.sort(sal.T.reshape(-1), stable=True).indices[:k]  # column-major as (block, rows)
            p = torch.zeros(block * rows, dtype=torch.bool)
            p[flat] = True
            pruned[:, c:c + block] = p.reshape(block, rows).T
        if c % gs == 0:
            g = W[:, c:c + gs].masked_fill(pruned[:, c:c + gs], 0.0)
            s, _ = scale_zero_from_range(g.amin(1), g.amax(1), bits, True)
            s = s.double()
        q = torch.clamp(torch.round(W[:, c] / s), -qmax, qmax)
        q = torch.where(pruned[:, c], torch.zeros_like(q), q)
        out[:, c] = q * s
        e = (W[:, c] - out[:, c]) / U[c, c]
        W[:, c + 1:] -= e.unsqueeze(1) * U[c, c + 1:].unsqueeze(0)
    return out, pruned


def test_gptq_joint_pruning_matches_float64_reference_and_is_exact():
    g = torch.Generator().manual_seed(7)
    cols = 128
    X = torch.randn(500, cols, generator=g, dtype=torch.float64) @ (
        torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / 11.3)
    H = 2 * X.T @ X / 500
    W = torch.randn(12, cols, generator=g, dtype=torch.float64)
    result = gptq_quantize(W, H, bits=4, group_size=32, symmetric=True, block_size=64, sparsity=0.5)
    ref, pruned = _ref_joint(W, H, 4, 32, 0.5, 64)
    got = result.weight.dequantize().double()
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)
    assert bool((got[pruned] == 0).all()) and int(pruned.sum()) == 12 * cols // 2


def test_gptq_joint_two_of_four_and_config():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(300, 64, generator=g)
    H = 2 * X.T @ X / 300
    W = torch.randn(8, 64, generator=g)
    qw = gptq_quantize(W, H, bits=4, group_size=32, symmetric=True, nm=(2, 4), sparsity=0.5).weight
    zeros = (qw.dequantize() == 0).reshape(8, 16, 4).sum(-1)
    assert bool((zeros >= 2).all())
    cfg = GPTQ(pattern="2:4")
    assert cfg.sparsity == 0.5 and GPTQ.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="sparsity"):
        GPTQ(pattern="2:4", sparsity=0.3)
    with pytest.raises(ConfigError, match="act_order"):
        GPTQ(sparsity=0.5, act_order=True)


def test_gptq_joint_on_a_decoder_prunes_every_block_layer_exactly():
    import warnings

    import slimkit as sk
    from slimkit.core.registry import Context
    from slimkit.quantization.modules import QuantLinear
    from tests.llm_archs import tiny_causal_lm, token_batches

    model = tiny_causal_lm("llama")
    data = sk.CalibrationData.from_tensors(token_batches(8, 32), batch_size=4, key="input_ids")
    ctx = Context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.quantize_(model, sk.GPTQ(bits=4, group_size=32, sparsity=0.5), data=data, ctx=ctx)
    layers = [m for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert layers
    for layer in layers:
        w = layer.dense_weight()
        assert int((w == 0).sum()) >= w.numel() // 2
    assert any("pruned while quantizing (50% unstructured" in n for n in ctx.notes)


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
def test_scale_search_never_loses_to_llama_cpp_rule_and_stays_on_the_grid(name):
    grid = GRIDS[name]
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(9))
    plain, searched = grid.quantize(w), grid.quantize(w, search=True)
    e_plain = (plain.dequantize() - w).pow(2).reshape(-1, 32).sum(1)
    e_search = (searched.dequantize() - w).pow(2).reshape(-1, 32).sum(1)
    assert bool((e_search <= e_plain + 1e-9).all())
    if name != "q8_0":  # at 8 bits clipping never pays on 32 values; at 4 and 5 bits it does somewhere
        assert float(e_search.sum()) < float(e_plain.sum())
    assert torch.equal(fp16_value(searched.scale), searched.scale)
    assert int(searched.q.min()) >= grid.qmin and int(searched.q.max()) <= grid.qmax
    with pytest.raises(ConfigError, match="one-scale grids"):
        GRIDS["q4_k"].quantize(w, search=True)


def test_gptq_lm_head_option_quantizes_the_output_layer_on_the_grid():
    import warnings

    import slimkit as sk
    from slimkit.core.registry import Context
    from slimkit.quantization.modules import QuantLinear
    from tests.llm_archs import tiny_causal_lm, token_batches

    model = tiny_causal_lm("llama")
    data = sk.CalibrationData.from_tensors(token_batches(8, 32), batch_size=4, key="input_ids")
    ctx = Context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.quantize_(model, sk.GPTQ(grid="q4_0", lm_head=True), data=data, ctx=ctx)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.group_size == 32
    assert any("and the output layer are quantized" in n for n in ctx.notes)
    tied = tiny_causal_lm("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    ctx = Context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.quantize_(tied, sk.GPTQ(grid="q4_0", lm_head=True), data=data, ctx=ctx)
    assert not isinstance(tied.lm_head, QuantLinear) and any("tied to the input embedding" in n for n in ctx.notes)
