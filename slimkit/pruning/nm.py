"""N:M patterns and exact-count masks: the pure functions live in ``core.nm`` (GPTQ's joint
prune-and-quantize mode uses them too); pruning code imports them from here as before."""

from slimkit.core.nm import (  # noqa: F401  (re-exported)
    Pattern,
    check_nm_shape,
    check_pattern_sparsity,
    check_sparsity,
    fill_sparsity,
    nm_keep_mask,
    parse_pattern,
    pattern_nm,
    row_keep_mask,
)
