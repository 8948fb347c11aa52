"""N:M semi-structured sparsity and the sparsity settings every pruning config shares.

An N:M pattern keeps at most N non-zeros in every M consecutive weights along a row's
input dimension (2:4 is what sparse tensor cores accelerate). ``nm_keep_mask`` keeps the N
highest-scoring weights of each group; the scores are |w| for magnitude pruning, Wanda's
|w|·‖x‖ or SparseGPT's w²/[H⁻¹]²_jj.
"""

from __future__ import annotations

import torch

from slimkit.core.errors import ConfigError, UnsupportedError


def parse_pattern(pattern: str | None, owner: str = "pattern") -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None or ``"unstructured"`` -> None. ConfigError naming ``owner`` otherwise."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        n_text, m_text = str(pattern).split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise ConfigError(f"{owner}: {pattern!r} is not an N:M pattern such as '2:4' or '4:8' "
                          "(or 'unstructured')") from None
    if not 0 < n < m:
        raise ConfigError(f"{owner}: in {pattern!r} N must satisfy 0 < N < M (keep N of every M weights)")
    return n, m


Pattern = str | tuple[int, int] | None


def pattern_nm(pattern: Pattern) -> tuple[int, int] | None:
    """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``; None / "unstructured" -> None (ConfigError for anything else)."""
    if isinstance(pattern, tuple):
        return parse_pattern(f"{pattern[0]}:{pattern[1]}")
    return parse_pattern(pattern)


def check_sparsity(value: object, owner: str) -> None:
    """ConfigError unless ``value`` is a number in [0, 1) (1.0 would remove every weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{owner}: sparsity must be a number in [0, 1), got {value!r}")


def check_nm_shape(name: str, columns: int, m: int) -> None:
    """UnsupportedError when a layer's input dimension ``columns`` is not a multiple of M."""
    if columns % m:
        raise UnsupportedError(f"layer {name!r} has {columns} input columns, not divisible by M={m} of the N:M "
                               "pattern: ignore it (ignore: [...]) or choose another M")


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask (True = keep) with the ``n`` highest ``scores`` of every ``m`` consecutive entries of each row.

    ``scores`` is (rows, cols) with cols divisible by m. Ties keep the earlier column.
    """
    rows, cols = scores.shape
    if cols % m:
        raise UnsupportedError(f"{cols} columns are not divisible by M={m}")
    grouped = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    # A stable descending sort gives ties to the earlier column, so results are deterministic.
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping the highest ``scores`` of each row, pruning exactly ``round(sparsity * cols)`` per row."""
    cols = scores.shape[1]
    k = round(sparsity * cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, lowest, False)
    return keep


def fill_sparsity(config, owner: str) -> None:
    """Give a config whose ``sparsity`` is None its default: 1 − N/M with an N:M ``pattern``, else 0.5.

    Called from ``__post_init__`` (before validation), so ``to_dict`` / ``from_dict`` round trips stay exact.
    """
    if getattr(config, "sparsity", 0.5) is None:
        nm = parse_pattern(config.pattern, f"{owner}.pattern") if isinstance(config.pattern, str) else None
        object.__setattr__(config, "sparsity", 1.0 - nm[0] / nm[1] if nm else 0.5)


def check_pattern_sparsity(config, nm: tuple[int, int] | None) -> None:
    """ConfigError (via ``config.fail``) when an explicit sparsity disagrees with the N:M pattern's 1 − N/M."""
    if nm is None:
        return
    implied = 1.0 - nm[0] / nm[1]
    if abs(float(config.sparsity) - implied) > 1e-9:
        config.fail("sparsity", f"the pattern {config.pattern} prunes exactly {implied:g} of the weights; "
                                f"leave sparsity out or set it to {implied:g}")
