"""Tucker-2 and CP of Conv2d: the maths against slow references, the layers, the rules, the handler, reload, ONNX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

tl = pytest.importorskip("tensorly")

import slimkit as sk  # noqa: E402
from slimkit.core.config import Config  # noqa: E402
from slimkit.core.errors import ConfigError  # noqa: E402
from slimkit.core.registry import Context  # noqa: E402
from slimkit.factorization.conv import (  # noqa: E402
    CP,
    CPConv2d,
    Tucker,
    TuckerConv2d,
    cp_factors,
    cp_kernel,
    cp_params,
    cp_rank_for_params,
    evbmf,
    evbmf_rank,
    tucker2_factors,
    tucker2_kernel,
    tucker2_params,
    tucker_ranks_for_params,
    unfold,
)

torch.set_num_threads(1)


def kernel(c_out=12, c_in=8, k=3, seed=0):
    return torch.randn(c_out, c_in, k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hosvd(w, r_out, r_in):
    """Slow reference: truncated HOSVD (leading singular vectors of each channel unfolding, core by projection)."""
    u_out = torch.linalg.svd(unfold(w, 0), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(unfold(w, 1), full_matrices=False)[0][:, :r_in]
    core = torch.einsum("oiyx,or,is->rsyx", w, u_out, u_in)
    return tucker2_kernel(u_out, core, u_in)


def test_tucker2_at_full_rank_is_exact_and_hooi_beats_truncated_hosvd():
    w = kernel()
    assert torch.allclose(tucker2_kernel(*tucker2_factors(w, 12, 8)), w, atol=1e-8)
    u_out, core, u_in = tucker2_factors(w, 5, 4)
    assert u_out.shape == (12, 5) and core.shape == (5, 4, 3, 3) and u_in.shape == (8, 4)
    assert torch.allclose(u_out.T @ u_out, torch.eye(5, dtype=torch.float64), atol=1e-8)  # orthonormal factors
    err = torch.linalg.norm(tucker2_kernel(u_out, core, u_in) - w)
    assert err <= torch.linalg.norm(hosvd(w, 5, 4) - w) + 1e-9
    # the same numbers as tensorly's own reconstruction, and the caller's tensorly backend is left as it was
    with tl.backend_context("numpy"):
        (core_np, factors_np), _ = tl.decomposition.partial_tucker(w.numpy(), rank=[5, 4], modes=[0, 1], init="svd",
                                                                   n_iter_max=100, tol=1e-10)
        theirs = tl.tenalg.multi_mode_dot(core_np, factors_np, modes=[0, 1])
        tucker2_factors(w, 5, 4)
        assert tl.get_backend() == "numpy"
    assert np.allclose(tucker2_kernel(u_out, core, u_in).numpy(), theirs, atol=1e-8)


def test_cp_of_a_true_low_rank_kernel_is_recovered():
    g = torch.Generator().manual_seed(1)
    factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (10, 6, 3, 3)]
    w = cp_kernel(*factors)
    assert torch.linalg.norm(cp_kernel(*cp_factors(w, 3, n_iter_max=500)) - w) / torch.linalg.norm(w) < 1e-4
    assert cp_params(10, 6, 3, 3, 3) == 3 * (10 + 6 + 3 + 3)


@pytest.mark.parametrize("stride, padding, bias", [(1, 1, True), (2, 0, False), (2, 1, True)])
def test_factorized_convs_equal_the_conv_of_their_dense_weight(stride, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, 8, 9, 9)
    for layer in (TuckerConv2d.from_conv(conv, 6, 4), CPConv2d.from_conv(conv, 10, n_iter_max=50)):
        ref = F.conv2d(x, layer.dense_weight(), conv.bias, stride=stride, padding=padding)
        assert layer(x).shape == conv(x).shape
        assert torch.allclose(layer(x), ref, atol=1e-4)
        again = type(layer).from_slimkit_spec(layer.slimkit_spec())
        again.load_state_dict(layer.state_dict())
        assert torch.equal(again(x), layer(x))
    full = TuckerConv2d.from_conv(conv, 12, 8)
    assert torch.allclose(full(x), conv(x), atol=1e-4)  # full ranks reproduce the conv


def test_factorized_convs_keep_a_non_square_dilated_strided_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    x = torch.randn(2, 6, 11, 13)
    for layer in (TuckerConv2d.from_conv(conv, 5, 3), CPConv2d.from_conv(conv, 8, n_iter_max=50)):
        ref = F.conv2d(x, layer.dense_weight(), conv.bias, stride=(2, 1), padding=(1, 2), dilation=(2, 1))
        assert layer(x).shape == conv(x).shape == ref.shape
        assert torch.allclose(layer(x), ref, atol=1e-4)
    assert torch.allclose(TuckerConv2d.from_conv(conv, 10, 6)(x), conv(x), atol=1e-4)


def test_layers_that_cannot_be_factorized_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(16, 16, 3, padding=1,
                          padding_mode="reflect"), nn.Conv2d(16, 16, 3))
    ctx = Context()
    sk.factorize_(model, Tucker(param_ratio=0.5), ctx=ctx)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d, nn.Conv2d, TuckerConv2d]
    notes = "\n".join(ctx.notes)
    assert "skipped 0: too small to gain" in notes and "skipped 1: only plain Conv2d layers with groups=1" in notes
    assert "skipped 2: only plain" in notes


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 5), st.integers(1, 5), st.floats(0.05, 0.95))
def test_param_ratio_ranks_are_the_largest_that_fit(c_out, c_in, kh, kw, ratio):
    budget = ratio * c_out * c_in * kh * kw
    r_out, r_in = tucker_ranks_for_params(c_out, c_in, kh, kw, ratio)
    assert 1 <= r_out <= c_out and 1 <= r_in <= c_in
    if (r_out, r_in) != (1, 1):
        assert tucker2_params(c_out, c_in, kh, kw, r_out, r_in) <= budget
    if r_out < c_out:  # one more output rank (in the channels' proportion) no longer fits
        bigger = max(1, round((r_out + 1) * c_in / c_out))
        assert tucker2_params(c_out, c_in, kh, kw, r_out + 1, bigger) > budget
    r = cp_rank_for_params(c_out, c_in, kh, kw, ratio)
    assert r == 1 or cp_params(c_out, c_in, kh, kw, r) <= budget
    assert cp_params(c_out, c_in, kh, kw, r + 1) > budget


def test_rank_rules_by_hand():
    # dense 64*32*9 = 18432; (34, 17): 32*17 + 34*17*9 + 34*64 = 544 + 5202 + 2176 = 7922 <= 0.45 * 18432 = 8294.4
    assert tucker_ranks_for_params(64, 32, 3, 3, 0.45) == (34, 17)
    assert tucker2_params(64, 32, 3, 3, 35, 18) > 0.45 * 18432
    assert cp_rank_for_params(64, 32, 3, 3, 0.45) == 81  # floor(8294.4 / 102)


def test_evbmf_finds_the_rank_of_a_noisy_low_rank_matrix_and_none_in_noise():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 48, generator=g, dtype=torch.float64)
    noisy = low + 0.1 * torch.randn(64, 48, generator=g, dtype=torch.float64)
    assert evbmf_rank(noisy) == 5 and evbmf_rank(noisy.T) == 5
    assert evbmf_rank(torch.randn(64, 48, generator=g, dtype=torch.float64)) <= 1
    assert evbmf_rank(torch.zeros(4, 6)) == 0


def evbmf_rank_by_grid(y):
    """Slow reference: EVBMF's free energy (Nakajima et al. 2013) on a dense grid of sigma^2 over its bounds."""
    y = y.T if y.shape[0] > y.shape[1] else y
    rows, cols = y.shape
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    s2 = np.linalg.svd(y.numpy(), compute_uv=False) ** 2
    h_bar = math.ceil(rows / (1 + alpha)) - 1  # the EVB rank is at most h_bar; the noise floor is from s2[h_bar] on
    lower, upper = max(s2[h_bar] / (cols * x_bar), s2[h_bar:].mean() / cols), s2.sum() / (rows * cols)
    best = None
    for sigma2 in np.geomspace(lower, upper, 4000):
        x = s2 / (cols * sigma2)
        energy = x - np.log(x)
        z = x[x > x_bar]
        tau = 0.5 * (z - 1 - alpha + np.sqrt((z - 1 - alpha) ** 2 - 4 * alpha))
        total = energy.sum() + (np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau).sum()
        if best is None or total < best[0]:
            best = (total, sigma2)
    return int((s2 > cols * best[1] * x_bar).sum()), best[1]


def test_evbmf_agrees_with_the_slow_free_energy_search_and_estimates_the_noise():
    g = torch.Generator().manual_seed(3)
    for m, n, r, noise in [(40, 30, 3, 0.05), (30, 70, 8, 0.3), (16, 144, 2, 0.02), (50, 50, 0, 1.0)]:
        y = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64) \
            + noise * torch.randn(m, n, generator=g, dtype=torch.float64)
        rank, sigma2 = evbmf(y)
        ref_rank, ref_sigma2 = evbmf_rank_by_grid(y)
        assert rank == ref_rank == r, (m, n, r, noise)
        assert abs(sigma2 / ref_sigma2 - 1) < 3e-3  # the grid's spacing
        assert abs(sigma2 / noise**2 - 1) < 0.15  # the noise variance that was added


@pytest.mark.parametrize("cls, bad, match", [
    (Tucker, dict(), "set exactly one of .*vbmf"),
    (Tucker, dict(vbmf=True, param_ratio=0.5), "vbmf, param_ratio|param_ratio, .*vbmf"),
    (Tucker, dict(rank=0, rank_ratio=1.5), r"in \(0, 1\]"),
    (Tucker, dict(vbmf="yes"), "true or false"),
    (CP, dict(energy=0.9), "no nested spectrum"),
    (CP, dict(rank=4, n_iter_max=0), "positive integer"),
    (CP, dict(rank=4, min_channels=0), "positive integer"),
])
def test_config_mistakes_are_refused(cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        cls(**bad)


def test_configs_round_trip():
    for cfg in (Tucker(vbmf=True), Tucker(param_ratio=0.45, ignore=["features.0"]), CP(rank=8)):
        assert Config.from_dict(cfg.to_dict()) == cfg
    assert Tucker(vbmf=True).rule() == "vbmf" and not Tucker(vbmf=True).needs_data and Tucker(budget=0.5).needs_data


def test_tucker_on_digits_halves_the_macs_skips_the_first_conv_and_reloads_and_exports(tmp_path):
    from slimkit.core.measure import count_macs
    from slimkit.export.onnx import export_onnx, ort_session, run_onnx
    from slimkit.zoo.digits import accuracy, load_digits_split

    x, y = load_digits_split("calibration")
    dense, model, ctx = sk.load("digits-cnn"), sk.load("digits-cnn"), Context()
    sk.factorize_(model, Tucker(param_ratio=0.45), ctx=ctx)
    assert type(model.features[0]) is nn.Conv2d and isinstance(model.features[4], TuckerConv2d)
    assert model.features[4].ranks == (34, 17)
    assert any("skipped features.0: too small to gain" in n for n in ctx.notes), ctx.notes
    assert count_macs(model, x[:1]) <= 0.5 * count_macs(dense, x[:1])  # 0.451x measured
    assert accuracy(model, x, y) > 0.9  # 0.97-0.98 one-shot; the recipe fine-tunes it back
    sk.save(model, tmp_path / "tucker")
    again = sk.load(tmp_path / "tucker")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    path = export_onnx(model, tmp_path / "tucker.onnx").path
    session = ort_session(path)
    got = run_onnx(session, {session.get_inputs()[0].name: x[:16]})[0]
    assert np.abs(got - model(x[:16]).detach().numpy()).max() < 1e-4


def test_cp_and_budget_on_digits():
    from slimkit.core.calibration import CalibrationData
    from slimkit.zoo.digits import load_digits_split

    x, _ = load_digits_split("calibration")
    model = sk.factorize_(sk.load("digits-cnn"), CP(rank=16))
    assert isinstance(model.features[8], CPConv2d) and model.features[8].ranks == (16,)
    model, ctx = sk.load("digits-cnn"), Context()
    dense = sum(m.weight.numel() for m in model.features if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    sk.factorize_(model, Tucker(budget=0.4, sensitivity_grid=[0.2, 0.5], sensitivity_batches=1),
                  data=CalibrationData.from_tensors(x[:128], batch_size=64), ctx=ctx)
    kept = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
               and n not in ("features.0",))
    assert kept <= 0.4 * dense, (kept, dense)
    assert any("Tucker: ranks allocated under a budget of 0.4" in n for n in ctx.notes), ctx.notes


def test_a_fixed_rank_that_gains_nothing_is_refused_unless_forced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    with pytest.raises(ConfigError, match="no smaller than dense.*break-even rank is 7.*force: true"):
        sk.factorize_(model, Tucker(rank=8))  # 64 + 576 + 64 = 704 > 576; rank 7: 56 + 441 + 56 = 553 < 576
    with pytest.raises(ConfigError, match="break-even rank is 26"):
        sk.factorize_(nn.Sequential(nn.Conv2d(8, 8, 3)), CP(rank=27))  # 27 * 22 = 594 >= 576 > 26 * 22 = 572
    with pytest.raises(ConfigError, match="above the channels"):
        sk.factorize_(nn.Sequential(nn.Conv2d(8, 8, 3)), Tucker(rank=9, force=True))
    forced = sk.factorize_(nn.Sequential(nn.Conv2d(8, 8, 3)), Tucker(rank=8, force=True))
    assert isinstance(forced[0], TuckerConv2d)
    with pytest.raises(sk.SlimkitError, match="Tucker changed 0 of the 640 weights"):  # nothing left to gain
        sk.factorize_(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)), Tucker(rank_ratio=1.0))
    ctx = Context(allow_partial=True)
    skipped = sk.factorize_(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)), Tucker(rank_ratio=1.0), ctx=ctx)
    assert type(skipped[0]) is nn.Conv2d and any("no fewer than the dense" in n for n in ctx.notes)
    assert any("a 1x1 conv is a matrix" in n for n in ctx.notes)
