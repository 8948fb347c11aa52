"""GPTQ: the blocked algorithm against a slow OBS reference, act-order storage, and the handler on tiny LMs."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.registry import Context, handler_for
from slimkit.quantization.gptq import (
    GPTQ,
    HessianError,
    accumulate_hessian,
    factor_hessian,
    gptq_quantize,
)
from slimkit.quantization.modules import QuantLinear
from slimkit.quantization.primitives import (
    dequantize_weight,
    qrange,
    quantize_weight,
    scale_zero_from_range,
)
from tests.llm_archs import ToyLM, indefinite_hessian, tiny_causal_lm, token_batches

torch.set_num_threads(1)


# --- a slow, obvious reference -------------------------------------------------------------


def reference_gptq(W, H, *, bits, group_size, symmetric, damp=0.01, act_order=False):
    """Column-by-column OBS in float64 with an explicit inverse Hessian, downdated after each column.

    Returns (codes, scales, zeros, g_idx, objective) in original column order. The grid
    (min/max scale and zero of a group from the current weights) is the primitives' one.
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    qmin, qmax = qrange(bits, symmetric)
    gs = group_size or cols
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    scales, zeros = [], []
    objective = 0.0
    for i in range(cols):
        if i % gs == 0:
            s, z = scale_zero_from_range(W[:, i:i + gs].min(1).values, W[:, i:i + gs].max(1).values, bits, symmetric)
            scales.append(s)
            zeros.append(z)
            s, z = s.double(), z.double()
        w = W[:, i].clone()
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        codes[:, i] = q
        err = w - (q - z) * s
        d = Hinv[i, i]
        objective += float((err**2).sum() / d)
        # Optimal update of the not-yet-quantized columns (Frantar et al. eq. 3) ...
        W[:, i + 1:] -= torch.outer(err / d, Hinv[i, i + 1:])
        # ... and remove column i from the inverse Hessian (Gaussian elimination, eq. 4).
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / d
    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols) // gs)[inv]
    return codes[:, inv], torch.stack(scales, 1), torch.stack(zeros, 1), g_idx, objective


def correlated_inputs(tokens, cols, seed=0, dead=()):
    """Inputs with strongly correlated features (a random mixing of a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, max(2, cols // 4), generator=g, dtype=torch.float64)
    mix = torch.randn(latent.shape[1], cols, generator=g, dtype=torch.float64)
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 3 + 0.2  # uneven channel magnitudes
    x = (latent @ mix + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)) * scale
    x[:, list(dead)] = 0.0
    return x


def hessian_of(x):
    return 2.0 * x.T @ x / x.shape[0]


CASES = [
    # (rows, cols, bits, group_size, symmetric, act_order, block_size)
    (8, 6, 4, None, True, False, 128),
    (8, 6, 4, None, False, True, 2),
    (8, 6, 2, None, True, True, 4),
    (16, 64, 4, 16, True, False, 128),
    (16, 64, 4, 16, False, False, 8),  # blocks narrower than a group: widened to whole groups
    (16, 64, 4, 16, True, True, 32),
    (16, 64, 4, 16, False, True, 128),
    (16, 64, 8, 32, False, True, 16),
    (16, 64, 2, 16, True, True, 64),
    (16, 64, 3, 16, False, True, 32),  # the algorithm itself takes any width qrange knows
]


@pytest.mark.parametrize("rows,cols,bits,gs,sym,act,bs", CASES)
def test_blocked_gptq_equals_slow_obs_reference_float64(rows, cols, bits, gs, sym, act, bs):
    g = torch.Generator().manual_seed(rows * cols + bits)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(4 * cols, cols, seed=cols + bits, dead=(1,)))
    res = gptq_quantize(W, H, bits=bits, group_size=gs, symmetric=sym, block_size=bs, act_order=act)
    codes, scales, zeros, g_idx, objective = reference_gptq(W, H, bits=bits, group_size=gs, symmetric=sym,
                                                            act_order=act)
    qw = res.weight
    assert torch.equal(qw.q.double(), codes)
    torch.testing.assert_close(qw.scale, scales, rtol=1e-6, atol=0)
    if sym:
        assert qw.zero is None
    else:
        assert torch.equal(qw.zero.long(), zeros.long())
    if act and gs is not None:
        assert torch.equal(qw.g_idx.long(), g_idx)
    else:
        assert qw.g_idx is None
    assert res.error == pytest.approx(objective, rel=1e-9)
    assert res.damp == 0.01


def test_float32_path_matches_reference_closely():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 64, generator=g)
    H = hessian_of(correlated_inputs(256, 64, seed=4)).float()
    res = gptq_quantize(W, H, bits=4, group_size=16, symmetric=False, act_order=True)
    codes, *_, objective = reference_gptq(W, H, bits=4, group_size=16, symmetric=False, act_order=True)
    assert res.weight.q.dtype == torch.uint8
    assert (res.weight.q.double() == codes).float().mean() > 0.97  # float32 rounding flips a few ties
    assert res.error == pytest.approx(objective, rel=2e-2)


@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_objective_equals_output_error_trace(act, sym):
    """Σ (w−q)²/U_ii² over the greedy path equals tr((W−Q)·H_d·(W−Q)ᵀ) of the final Q."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 32, generator=g, dtype=torch.float64)
    x = correlated_inputs(128, 32, seed=6, dead=(3, 7))
    H = hessian_of(x)
    res = gptq_quantize(W, H, bits=4, group_size=8, symmetric=sym, act_order=act)
    Wz = W.clone()
    Wz[:, [3, 7]] = 0
    Hd = H.clone()
    Hd[3, 3] = Hd[7, 7] = 1.0
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(32, dtype=torch.float64)
    D = Wz - res.weight.dequantize().double()
    assert res.error == pytest.approx(float(torch.trace(D @ Hd @ D.T)), rel=1e-5)


def test_hessian_accumulation_over_batches_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 10, generator=g, dtype=torch.float64) for n in (3, 17, 4, 8)]
    H, n = torch.zeros(10, 10, dtype=torch.float64), 0
    for b in batches:
        H, n = accumulate_hessian(H, n, b)
    x = torch.cat(batches)
    assert n == 32
    torch.testing.assert_close(H, 2 * x.T @ x / 32, rtol=1e-12, atol=1e-12)
    # float32 default, 3-D input (batch, seq, features) flattened; an empty batch changes nothing.
    H32, n32 = accumulate_hessian(None, 0, x.float().reshape(4, 8, 10))
    H32, n32 = accumulate_hessian(H32, n32, torch.zeros(0, 10))
    assert H32.dtype == torch.float32 and n32 == 32
    torch.testing.assert_close(H32.double(), 2 * x.T @ x / 32, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        accumulate_hessian(H32, n32, torch.zeros(2, 11))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(splits=st.lists(st.integers(1, 20), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_hessian_independent_of_batching(splits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(splits), 6, generator=g, dtype=torch.float64)
    H, n = torch.zeros(6, 6, dtype=torch.float64), 0
    for part in torch.split(x, splits):
        H, n = accumulate_hessian(H, n, part)
    torch.testing.assert_close(H, 2 * x.T @ x / x.shape[0], rtol=1e-10, atol=1e-12)


def output_error(W, qw, x):
    return float(((W.double() - qw.dequantize().double()) @ x.T).norm())


@pytest.mark.parametrize("gs,act", [(None, False), (16, False), (16, True)])
def test_gptq_beats_rtn_on_correlated_inputs(gs, act):
    g = torch.Generator().manual_seed(11)
    W = torch.randn(48, 64, generator=g)
    x = correlated_inputs(512, 64, seed=12)
    res = gptq_quantize(W, hessian_of(x).float(), bits=4, group_size=gs, symmetric=True, act_order=act)
    rtn = quantize_weight(W, 4, group_size=gs, symmetric=True)
    assert output_error(W, res.weight, x) < 0.7 * output_error(W, rtn, x)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(rows=st.integers(16, 32), groups=st.integers(2, 4), bits=st.sampled_from([2, 4, 8]),
       sym=st.booleans(), act=st.booleans(), seed=st.integers(0, 100_000))
def test_gptq_not_worse_than_rtn_on_its_calibration_data(rows, groups, bits, sym, act, seed):
    """On its own calibration inputs GPTQ's output error is below RTN's.

    GPTQ is greedy, so this is not a theorem: on tiny matrices (one group, under ~8 rows) a
    sweep of 1200 random cases found it up to 16% worse in a few percent of cases; from 16
    rows and 2 groups on, the worst ratio seen was 0.92 (mean 0.3-0.5), which is what is asserted.
    """
    cols = 8 * groups
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = correlated_inputs(8 * cols, cols, seed=seed + 1)
    res = gptq_quantize(W, hessian_of(x), bits=bits, group_size=8, symmetric=sym, act_order=act)
    rtn = quantize_weight(W.float(), bits, group_size=8, symmetric=sym)
    assert output_error(W, res.weight, x) < output_error(W, rtn, x)


def test_act_order_g_idx_dequantizes_what_the_algorithm_used():
    g = torch.Generator().manual_seed(21)
    W = torch.randn(16, 64, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(256, 64, seed=22))
    res = gptq_quantize(W, H, bits=4, group_size=16, symmetric=False, act_order=True)
    qw = res.weight
    codes, scales, zeros, g_idx, _ = reference_gptq(W, H, bits=4, group_size=16, symmetric=False, act_order=True)
    # The values the algorithm rounded to: (code − zero)·scale of the group it was in when processed.
    used = (codes - zeros.double()[:, g_idx]) * scales.double()[:, g_idx]
    torch.testing.assert_close(qw.dequantize().double(), used, rtol=1e-6, atol=1e-7)
    assert qw.g_idx.dtype == torch.int32
    assert torch.bincount(qw.g_idx.long()).tolist() == [16] * 4  # every group has group_size columns
    assert not torch.equal(qw.g_idx.long(), torch.arange(64) // 16)  # the permutation really scatters groups
    # Ignoring g_idx (consecutive groups) gives different, wrong values.
    wrong = dequantize_weight(qw.q, qw.scale, qw.zero, 16)
    assert not torch.allclose(wrong.double(), used)


def test_quantlinear_with_g_idx_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 8))
    x = correlated_inputs(256, 64, seed=2).float()
    res = gptq_quantize(model[0].weight, hessian_of(x.double()).float(), bits=4, group_size=16, symmetric=True,
                        act_order=True)
    model[0] = QuantLinear.from_linear(model[0], weight=res.weight)
    assert model[0].g_idx is not None and model[0].slimkit_spec()["g_idx"] is True
    torch.testing.assert_close(model[0].dense_weight(), res.weight.dequantize())
    out = model(x)
    slimkit.save(model, tmp_path / "m")
    skeleton = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 8))
    loaded = slimkit.load(tmp_path / "m", skeleton=skeleton)
    assert torch.equal(loaded[0].g_idx, model[0].g_idx)
    assert torch.equal(loaded(x), out)
    # g_idx storage (uint8: 4 groups fit) is counted in the measured bits per weight.
    assert model[0].g_idx.dtype == torch.uint8
    plain = QuantLinear.from_linear(nn.Linear(64, 24), 4, 16, True)
    assert model[0].weight_bits_per_element() == pytest.approx(plain.weight_bits_per_element() + 8 / 24)


def test_dead_input_columns():
    g = torch.Generator().manual_seed(31)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    x = correlated_inputs(64, 16, seed=32, dead=(0, 5))
    H = hessian_of(x)
    assert H[0, 0] == 0 and H[5, 5] == 0
    for act in (False, True):
        res = gptq_quantize(W, H, bits=4, group_size=8, symmetric=False, act_order=act)
        deq = res.weight.dequantize()
        assert torch.isfinite(deq).all()
        assert (deq[:, [0, 5]] == 0).all()  # a dead input's weight is zeroed: it never contributes
        assert res.error == pytest.approx(reference_gptq(W, H, bits=4, group_size=8, symmetric=False,
                                                         act_order=act)[-1], rel=1e-9)
        if act:  # the order is by descending diagonal, dead inputs counted with H_ii = 1
            f = factor_hessian(H, act_order=True)
            d = torch.diag(H).clone()
            d[[0, 5]] = 1.0
            assert (d[f.perm].diff() <= 0).all() and f.dead.nonzero().flatten().tolist() == [0, 5]


def test_non_positive_definite_hessian_escalates_then_fails():
    # Eigenvalues 1 ± 2.5: indefinite; mean diag 1, so damp 10 (the third escalation) makes it PD.
    H = torch.tensor([[1.0, 2.5], [2.5, 1.0]])
    W = torch.randn(4, 2)
    res = gptq_quantize(W, H, bits=4, group_size=None, symmetric=True)
    assert res.damp == pytest.approx(10.0)
    # Eigenvalues 1 ± 100: still indefinite at damp 0.01·10³ = 10.
    bad = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    with pytest.raises(HessianError, match=r"not positive definite even with damp=10 \(tried 0.01, 0.1, 1, 10\)"):
        gptq_quantize(W, bad, bits=4, group_size=None, symmetric=True)
    with pytest.raises(DataError, match="NaN"):
        factor_hessian(torch.full((2, 2), float("nan")))


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 5}, "bits"), ({"bits": True}, "bits"), ({"bits": 16}, "bits"),
    ({"group_size": 12}, "group_size"), ({"group_size": 0}, "group_size"),
    ({"symmetric": 1}, "symmetric"), ({"act_order": "yes"}, "act_order"), ({"true_sequential": None}, "true_sequential"),
    ({"damp": 0}, "damp"), ({"damp": 2.0}, "damp"), ({"damp": "0.01"}, "damp"),
    ({"block_size": 0}, "block_size"), ({"block_size": 1.5}, "block_size"),
    ({"include": "q_proj"}, "include"), ({"ignore": ["re:("]}, "ignore"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GPTQ(**kwargs)


def test_config_round_trips_through_dict():
    cfg = GPTQ(bits=2, group_size=None, act_order=True, ignore=["re:.*down_proj"])
    again = GPTQ.from_dict(cfg.to_dict())
    assert again == cfg and GPTQ.needs_data
    assert slimkit.GPTQ is GPTQ


# --- the handler on tiny models --------------------------------------------------------------


def run(model, cfg, data):
    ctx = Context(data=data)
    handler_for(cfg)(model, cfg, ctx)
    return ctx


def calib(n=8, seq=32):
    return CalibrationData.from_tensors(token_batches(n, seq), batch_size=4, key="input_ids")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_handler_on_tiny_lms_beats_rtn(arch):
    data = calib()
    ids = token_batches(8, 32)
    model = tiny_causal_lm(arch)
    ref = logits(model, ids)
    block_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    rtn = tiny_causal_lm(arch)
    handler_for(slimkit.RTN(bits=4, group_size=16))(rtn, slimkit.RTN(bits=4, group_size=16, include=["re:.*layers.*"]),
                                                    Context())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 samples: the few-samples warning is tested elsewhere
        ctx = run(model, GPTQ(bits=4, group_size=16), data)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == block_linears and len(block_linears) >= 12
    assert all(m.bits == 4 and m.group_size == 16 and m.g_idx is None for m in quantized.values())
    head = model.lm_head
    assert type(head) is nn.Linear  # outside the blocks: stays float
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() < 0.9 * (logits(rtn, ids) - ref).norm()
    assert any("quantized" in n and f"{len(block_linears)} Linear" in n and "per million" in n for n in ctx.notes)
    assert any("lm_head and embeddings stay float" in n for n in ctx.notes)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_handler_true_sequential_on_off_and_act_order(true_sequential, tmp_path):
    data = calib()
    ids = token_batches(8, 32)
    model = tiny_causal_lm("mistral")
    ref = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(model, GPTQ(bits=4, group_size=32, act_order=True, symmetric=False,
                        true_sequential=true_sequential, ignore=["re:.*k_proj"]), data)
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 * 6  # 7 Linear per block minus the ignored k_proj
    assert all(m.g_idx is not None and m.zero is not None for m in q)
    assert all(type(layer.self_attn.k_proj) is nn.Linear for layer in model.model.layers)
    out = logits(model, ids)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.2
    if true_sequential:  # the act-order checkpoint of a transformers model reloads exactly
        slimkit.save(model, tmp_path / "m")
        assert torch.equal(logits(slimkit.load(tmp_path / "m"), ids), out)


def test_true_sequential_changes_later_groups_only():
    """With true_sequential the first group sees identical inputs, later ones see the quantized layers' outputs."""
    data = calib()
    a, b = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(a, GPTQ(bits=4, group_size=16, true_sequential=True), data)
        run(b, GPTQ(bits=4, group_size=16, true_sequential=False), data)
    la, lb = a.model.layers[0], b.model.layers[0]
    assert torch.equal(la.self_attn.q_proj.qweight, lb.self_attn.q_proj.qweight)
    assert not torch.equal(la.mlp.down_proj.qweight, lb.mlp.down_proj.qweight)


def test_unused_linear_falls_back_to_rtn_with_a_note():
    model = ToyLM()
    data = CalibrationData.from_tensors(torch.randint(0, 50, (32, 16)), batch_size=8, key="input_ids")
    ctx = run(model, GPTQ(bits=4, group_size=32), data)
    for i in range(2):
        spare = model.layers[i].spare
        assert isinstance(spare, QuantLinear)
        ref = quantize_weight(ToyLM().layers[i].spare.weight, 4, group_size=32)
        assert torch.equal(spare.dense_weight(), ref.dequantize())  # exactly RTN
        assert f"GPTQ: layers.{i}.spare received no calibration tokens; RTN used" in ctx.notes
    assert isinstance(model.layers[0].up, QuantLinear) and type(model.head) is nn.Linear
    assert any("quantized 4 Linear layer(s)" in n and "2 by RTN fallback" in n for n in ctx.notes)
    assert not any("only" in n and "sample" in n for n in ctx.notes)  # 32 samples: no warning


def test_group_size_not_dividing_names_the_layer():
    model = ToyLM()
    model.layers[1].down = nn.Linear(48, 32)  # in_features 48 is not a multiple of 32
    data = CalibrationData.from_tensors(torch.randint(0, 50, (4, 8)), key="input_ids")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"layers\.1\.down.*group_size 16.*ignore=\['layers\.1\.down'\]"):
        run(model, GPTQ(bits=4, group_size=32), data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched


def test_nan_weight_raises_before_any_change_and_few_samples_warn():
    model = ToyLM()
    with torch.no_grad():
        model.layers[1].up.weight[0, 0] = float("nan")
    data = CalibrationData.from_tensors(torch.randint(0, 50, (4, 8)), key="input_ids")
    with pytest.raises(DataError, match=r"layers\.1\.up.*NaN"):
        run(model, GPTQ(bits=4, group_size=32), data)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    model = ToyLM()
    with pytest.warns(UserWarning, match="only 4 sample"):
        ctx = run(model, GPTQ(bits=8, group_size=None, ignore=["spare"]), data)
    assert any("only 4 sample" in n for n in ctx.notes)


def test_handler_names_layer_whose_hessian_is_not_positive_definite(monkeypatch):
    from slimkit.quantization import gptq

    monkeypatch.setattr(gptq, "accumulate_hessian", indefinite_hessian)
    data = CalibrationData.from_tensors(torch.randint(0, 50, (4, 8)), key="input_ids")
    with pytest.raises(DataError, match=r"Hessian of layers\.0\.up is not positive definite even with damp="):
        run(ToyLM(), GPTQ(bits=4, group_size=32, ignore=["spare"]), data)


def test_streamed_checkpoint_equals_in_memory(tmp_path):
    """Through run_blockwise GPTQ also runs block by block from disk, with the same result."""
    from slimkit.api import compress_checkpoint

    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "src")
    data = calib()
    cfg = GPTQ(bits=4, group_size=16, act_order=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_checkpoint(tmp_path / "src", tmp_path / "out", cfg, data, Context())
        run(model, cfg, data)
    ids = token_batches(2, 16, seed=5)
    assert torch.equal(logits(slimkit.load(tmp_path / "out"), ids), logits(model, ids))


# --- sparsity-aware GPTQ (issue: compression that composes) -------------------------------------------


def reference_masked_gptq(W, H, pruned, *, bits, group_size, symmetric, act_order=False, damp=0.01):
    """``reference_gptq`` where pruned positions are forced to code 0's value when their column is reached
    (so all of what the OBS updates left there is error) and group ranges ignore them."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H, P = W[:, perm], H[perm][:, perm], pruned[:, perm]
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    qmin, qmax = qrange(bits, symmetric)
    gs = group_size or cols
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(cols):
        if i % gs == 0:
            kept = W[:, i:i + gs].masked_fill(P[:, i:i + gs], 0.0)
            s, z = scale_zero_from_range(kept.min(1).values, kept.max(1).values, bits, symmetric)
            s, z = s.double(), z.double()
        w = W[:, i].clone()
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        q = torch.where(P[:, i], z, q)
        codes[:, i] = q
        err = w - (q - z) * s
        d = Hinv[i, i]
        W[:, i + 1:] -= torch.outer(err / d, Hinv[i, i + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / d
    return codes[:, torch.argsort(perm)]


def _half_pruned(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    pruned = torch.rand(rows, cols, generator=g) < 0.5
    return W.masked_fill(pruned, 0.0), pruned


@pytest.mark.parametrize("bits,gs,sym,act,bs", [(4, 16, True, False, 128), (4, 16, False, False, 8),
                                                (4, None, True, True, 4), (8, 32, False, True, 16)])
def test_keep_zeros_gptq_equals_masked_obs_reference(bits, gs, sym, act, bs):
    W, pruned = _half_pruned(16, 64, seed=bits + bs)
    H = hessian_of(correlated_inputs(256, 64, seed=5))
    res = gptq_quantize(W, H, bits=bits, group_size=gs, symmetric=sym, block_size=bs, act_order=act)
    codes = reference_masked_gptq(W, H, pruned, bits=bits, group_size=gs, symmetric=sym, act_order=act)
    assert torch.equal(res.weight.q.double(), codes)
    deq = dequantize_weight(res.weight.q, res.weight.scale, res.weight.zero, gs, res.weight.g_idx)
    assert torch.equal(deq == 0, pruned | (deq == 0))  # every pruned weight dequantizes to exactly 0
    assert bool((deq[pruned] == 0).all())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), sym=st.booleans())
def test_keep_zeros_keeps_every_zero_and_keep_zeros_false_fills_them_in(seed, sym):
    W, pruned = _half_pruned(12, 32, seed)
    H = hessian_of(correlated_inputs(128, 32, seed=seed))
    res = gptq_quantize(W, H, bits=4, group_size=16, symmetric=sym)
    deq = dequantize_weight(res.weight.q, res.weight.scale, res.weight.zero, 16)
    assert bool((deq[pruned] == 0).all())
    rtn = quantize_weight(W, 4, group_size=16, symmetric=sym)  # 0 is on RTN's grid: its zeros stay too
    assert bool((dequantize_weight(rtn.q, rtn.scale, rtn.zero, 16)[pruned] == 0).all())
    dense = gptq_quantize(W, H, bits=4, group_size=16, symmetric=sym, keep_zeros=False)
    dense_deq = dequantize_weight(dense.weight.q, dense.weight.scale, dense.weight.zero, 16)
    assert int((dense_deq[pruned] != 0).sum()) > 0  # the OBS updates fill pruned positions back in


def test_keep_zeros_gptq_has_less_output_error_than_rtn_over_many_layers():
    """Greedy, so not a theorem per layer: summed over 20 seeded layers, masked GPTQ's output error is
    well below RTN's on the same sparse weights (measured: about 0.5×)."""
    ours = rtn_total = 0.0
    for seed in range(20):
        W, _ = _half_pruned(24, 64, seed)
        x = correlated_inputs(256, 64, seed=seed)
        res = gptq_quantize(W, hessian_of(x), bits=4, group_size=16, symmetric=bool(seed % 2))
        rtn = quantize_weight(W, 4, group_size=16, symmetric=bool(seed % 2))
        ours += output_error(W, res.weight, x)
        rtn_total += output_error(W, rtn, x)
    assert ours < 0.8 * rtn_total


def test_dense_weight_is_bit_identical_with_and_without_keep_zeros():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(256, 64))
    a = gptq_quantize(W, H, bits=4, group_size=16, symmetric=True)
    b = gptq_quantize(W, H, bits=4, group_size=16, symmetric=True, keep_zeros=False)
    assert torch.equal(a.weight.q, b.weight.q) and torch.equal(a.weight.scale, b.weight.scale)


def test_wanda_then_gptq_keeps_exactly_half_zeros_in_every_layer():
    model = tiny_causal_lm("llama")
    data = calib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimkit.prune_(model, slimkit.Wanda(sparsity=0.5), data=data)
        slimkit.strip(model)
        ctx = run(model, GPTQ(bits=4, group_size=16), data)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    for name, m in layers.items():
        w = m.dense_weight()
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-9), name
    assert any("stay exact zeros" in n for n in ctx.notes)
