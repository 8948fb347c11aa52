"""slimkit.pruning.nm against slow Python-loop references (ties included)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.pruning.nm import (
    check_nm_shape,
    check_sparsity,
    nm_keep_mask,
    parse_pattern,
    row_keep_mask,
)


def nm_reference(scores: list[list[float]], n: int, m: int) -> list[list[bool]]:
    """Keep the n highest of each m consecutive entries of a row; among equal scores the earlier column wins."""
    out = []
    for row in scores:
        keep = [False] * len(row)
        for g in range(0, len(row), m):
            cols = sorted(range(g, g + m), key=lambda j: (-row[j], j))
            for j in cols[:n]:
                keep[j] = True
        out.append(keep)
    return out


def row_reference(scores: list[list[float]], sparsity: float) -> list[list[bool]]:
    """Prune the round(sparsity * cols) lowest of each row; among equal scores the earlier column goes first."""
    out = []
    for row in scores:
        k = round(sparsity * len(row))
        keep = [True] * len(row)
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[:k]:
            keep[j] = False
        out.append(keep)
    return out


# Small integer scores make ties frequent, which is where implementations differ.
@st.composite
def nm_case(draw):
    n, m = draw(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]))
    rows = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(0, 3), min_size=rows * groups * m, max_size=rows * groups * m))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, groups * m), n, m


@settings(max_examples=60, deadline=None)
@given(nm_case())
def test_nm_keep_mask_matches_loop_reference(case):
    scores, n, m = case
    keep = nm_keep_mask(scores, n, m)
    assert keep.dtype == torch.bool
    assert keep.tolist() == nm_reference(scores.tolist(), n, m)
    # Exactly n kept in every group of m.
    assert (keep.reshape(scores.shape[0], -1, m).sum(-1) == n).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 17), sparsity=st.floats(0.0, 0.99),
       data=st.data())
def test_row_keep_mask_matches_loop_reference(rows, cols, sparsity, data):
    values = data.draw(st.lists(st.integers(0, 3), min_size=rows * cols, max_size=rows * cols))
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    keep = row_keep_mask(scores, sparsity)
    assert keep.tolist() == row_reference(scores.tolist(), sparsity)
    assert ((~keep).sum(1) == round(sparsity * cols)).all()


def test_nm_keep_mask_refuses_indivisible_columns():
    with pytest.raises(UnsupportedError, match="not divisible by M=4"):
        nm_keep_mask(torch.rand(2, 6), 2, 4)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern(None) is None
    assert parse_pattern("unstructured") is None
    for bad in ("2-4", "a:b", "4:4", "0:4", "5:4", "2:4:8"):
        with pytest.raises(ConfigError, match="Wanda.pattern"):
            parse_pattern(bad, "Wanda.pattern")


def test_check_sparsity_and_shape():
    for ok in (0, 0.0, 0.5, 0.999):
        check_sparsity(ok, "X.sparsity")
    for bad in (1.0, -0.1, 1.5, True, "0.5", None):
        with pytest.raises(ConfigError, match="X.sparsity"):
            check_sparsity(bad, "X.sparsity")
    check_nm_shape("fc", 8, 4)
    with pytest.raises(UnsupportedError, match="'model.fc'.*6 input columns.*M=4"):
        check_nm_shape("model.fc", 6, 4)
