"""Low-rank maths against slow, obvious references (float64): Eckart–Young, output-optimal truncation, break-even."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError, DataError
from slimkit.factorization.svd import (
    break_even_rank,
    gram_cholesky,
    rank_for_energy,
    rank_for_param_ratio,
    scaled_svd,
    truncated_svd,
    whitened_svd,
)


def layer(out=8, inp=6, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    # Correlated, unevenly scaled inputs: where input-aware truncation differs from plain SVD.
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    x[:, 0] *= 20
    return w, x


def test_truncated_svd_is_the_eckart_young_optimum():
    w, _ = layer()
    for r in range(1, 7):
        f = truncated_svd(w, r)
        s = torch.linalg.svdvals(w)
        assert f.a.shape == (8, r) and f.b.shape == (r, 6)
        assert torch.linalg.matrix_rank(f.a @ f.b) == r
        assert math.isclose(torch.linalg.norm(w - f.a @ f.b).item(), s[r:].pow(2).sum().sqrt().item(), rel_tol=1e-9,
                            abs_tol=1e-12)


def _output_optimal(w, x, r):
    """Reference: the best rank-r W' for ‖(W − W')Xᵀ‖ truncates W Xᵀ, then maps back with the pseudo-inverse of Xᵀ."""
    u, s, vh = torch.linalg.svd(w @ x.T, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.pinv(x.T)


def test_whitened_svd_minimises_the_output_error():
    w, x = layer()
    for r in (1, 2, 4):
        f = whitened_svd(w, x.T @ x, r)
        ref = _output_optimal(w, x, r)
        assert f.damping == 0.0
        assert torch.allclose(f.a @ f.b, ref, atol=1e-8)
        plain = truncated_svd(w, r)
        err = torch.linalg.norm((w - f.a @ f.b) @ x.T)
        assert err < torch.linalg.norm((w - plain.a @ plain.b) @ x.T)


def test_whitened_svd_regularises_a_singular_gram_and_reports_it():
    w, x = layer()
    x[:, 3] = 0.0  # a dead input: XᵀX is singular
    f = whitened_svd(w, x.T @ x, 3)
    assert f.damping > 0 and torch.isfinite(f.a).all() and torch.isfinite(f.b).all()
    # Still close to the optimum on the live inputs.
    ref_err = torch.linalg.norm((w - _output_optimal(w, x, 3)) @ x.T)
    assert torch.linalg.norm((w - f.a @ f.b) @ x.T) <= ref_err * 1.01 + 1e-6


def test_gram_cholesky_refuses_nan_and_non_square():
    with pytest.raises(DataError, match="NaN"):
        gram_cholesky(torch.full((3, 3), float("nan")))
    with pytest.raises(DataError, match="square"):
        gram_cholesky(torch.ones(3, 2))


def test_scaled_svd_weights_the_error_by_the_input_scale():
    w, x = layer()
    mean_abs = x.abs().mean(0)
    f = scaled_svd(w, mean_abs, 3, alpha=1.0)
    s = mean_abs
    # Reference: truncate W·diag(s) and undo the scale.
    u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
    ref = ((u[:, :3] * sv[:3]) @ vh[:3]) / s
    assert torch.allclose(f.a @ f.b, ref, atol=1e-9)
    assert torch.allclose(scaled_svd(w, mean_abs, 3, alpha=0.0).a @ scaled_svd(w, mean_abs, 3, alpha=0.0).b,
                          truncated_svd(w, 3).a @ truncated_svd(w, 3).b, atol=1e-9)  # alpha 0 is plain SVD


@pytest.mark.parametrize("rank", [0, 7, -1, 2.5, True])
def test_rank_out_of_range_is_refused(rank):
    w, _ = layer()
    with pytest.raises(ConfigError, match=r"rank must be an integer in 1\.\.6"):
        truncated_svd(w, rank)


def test_shape_mismatches_name_the_inputs():
    w, x = layer()
    with pytest.raises(DataError, match="does not match"):
        whitened_svd(w, torch.eye(5, dtype=torch.float64), 2)
    with pytest.raises(DataError, match="do not match"):
        scaled_svd(w, torch.ones(5), 2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_break_even_rank_is_the_last_rank_that_saves_parameters(m, n):
    r = break_even_rank(m, n)
    assert r * (m + n) < m * n or r == 0
    assert (r + 1) * (m + n) >= m * n


def test_rank_for_param_ratio_and_energy():
    assert rank_for_param_ratio(384, 384, 0.8) == 153  # 0.8 · 384² / 768 = 153.6
    assert rank_for_param_ratio(10, 10, 0.01) == 1
    with pytest.raises(ConfigError):
        rank_for_param_ratio(10, 10, 0.0)
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 3
    with pytest.raises(ConfigError):
        rank_for_energy(s, 1.5)
