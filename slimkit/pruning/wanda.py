"""Wanda (Sun et al. 2023): prune by |weight| × input norm, per output row, with no weight update.

For a Linear with weight W (out, in) whose calibration inputs are X (tokens, in), Wanda
scores every weight by its magnitude times the L2 norm of the input feature it multiplies,

    S_ij = |W_ij| · ‖X_:,j‖₂        (the norm over ALL calibration tokens)

and, in each output row, prunes the lowest-scoring ``round(sparsity · in)`` weights
(N:M: in every M consecutive inputs of a row, keeps the N highest). Comparing within a
row, not across the layer, is what the paper found to matter for LLMs. No weight is
updated: the survivors keep their values (SparseGPT, beside this file, updates them).

The pure functions (``accumulate_sq_norms``, ``wanda_scores``, ``wanda_mask``,
``wanda_prune``) hold the maths. The handler walks the decoder blocks with
``core.blockwise.run_blockwise`` (so a checkpoint bigger than memory streams from disk)
and prunes each block's Linear groups in execution order (q/k/v, o, gate/up, down),
measuring every group's inputs through the already-pruned layers (true-sequential); the
next block is calibrated on the pruned block's outputs.

The block-wise plumbing it shares with SparseGPT lives in ``pruning.calibrated``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core.blockwise import collect_inputs, run_blockwise, warn_if_few_samples
from slimkit.core.calibration import BlockInputs
from slimkit.core.errors import DataError
from slimkit.core.linear_like import linear_weight
from slimkit.core.registry import Context, register
from slimkit.pruning.calibrated import (
    BlockPruneConfig,
    block_groups,
    fallback_to_magnitude,
    finish_notes,
    plan_pruning,
    write_pruned,
)
from slimkit.pruning.nm import (
    Pattern,
    check_sparsity,
    nm_keep_mask,
    pattern_nm,
    row_keep_mask,
)

# --- pure functions ------------------------------------------------------------------------


def accumulate_sq_norms(sq_sum: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add a batch of layer inputs ``x`` (tokens, in) to the running per-feature Σ x_j², in float64.

    ``sq_sum`` None starts a float64 zero vector on ``x``'s device. float64 because the sum
    runs over every calibration token (16k and more) and is never rescaled; its square
    root is ‖X_:,j‖₂. Updated in place and returned.
    """
    x = x.reshape(-1, x.shape[-1])
    if sq_sum is None:
        sq_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    if sq_sum.shape != (x.shape[-1],):
        raise ValueError(f"norm accumulator of shape {tuple(sq_sum.shape)} cannot take inputs with "
                         f"{x.shape[-1]} features")
    sq_sum.add_(x.to(torch.float64).pow(2).sum(0))
    return sq_sum


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| · ‖X_:,j‖₂ as a float64 (out, in) tensor.

    ``input_norm`` is the (in,) L2 norm of each input feature over all calibration tokens
    (``accumulate_sq_norms(...).sqrt()``). float64 so that near-equal scores of a float32
    weight are not rounded into ties.
    """
    if weight.dim() != 2 or input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm of shape {tuple(input_norm.shape)} does not match a weight of shape "
                         f"{tuple(weight.shape)} (one norm per input column)")
    return weight.detach().abs().to(torch.float64) * input_norm.detach().to(torch.float64).unsqueeze(0)


def wanda_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern = None) -> torch.Tensor:
    """Bool keep-mask (True = keep) from (out, in) ``scores``.

    Unstructured (``pattern`` None): in every row exactly ``round(sparsity · in)`` lowest
    scores are pruned (ties prune the earlier column). ``pattern`` "N:M" (or ``(N, M)``):
    in every M consecutive columns of a row the N highest are kept, and ``sparsity`` is
    not used (it is 1 − N/M).
    """
    nm = pattern_nm(pattern)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    check_sparsity(sparsity, "wanda_mask")
    return row_keep_mask(scores, float(sparsity))


def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
                pattern: Pattern = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight, keep mask)``: ``weight`` with the lowest Wanda scores set to 0, nothing else changed."""
    if not bool(torch.isfinite(weight).all()):
        raise DataError("weight contains NaN or inf; pruning needs finite values")
    keep = wanda_mask(wanda_scores(weight, input_norm), sparsity, pattern)
    return weight.detach().masked_fill(~keep, 0.0), keep


# --- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wanda(BlockPruneConfig):
    """Wanda pruning (|W|·‖X‖ per output row, no weight update) of the Linear layers inside a decoder's blocks.

    sparsity: fraction of each selected layer's weights set to 0, in [0, 1); exactly
    ``round(sparsity · in_features)`` per output row. pattern: None (unstructured) or
    "N:M" such as "2:4" / "4:8" (keep N of every M consecutive inputs in a row; sparsity
    must then be 1 − N/M, 0.5 for both). include / ignore: module name patterns (default:
    every Linear; the shipped recipe ignores lm_head).

    Only Linear layers inside the repeated decoder blocks are touched, as in the paper and
    llm-compressor: lm_head and the embeddings run outside them and stay dense. Pruned
    weights are exact zeros in the layers' ordinary weights (``core.masks.
    attach_masks_from_zeros`` keeps them at zero while fine-tuning).
    """


# --- handler -------------------------------------------------------------------------------


def _input_sq_norms(b: BlockInputs, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Σ x_j² over every calibration token of each named layer's input (each layer its own: they are cheap)."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        sums[name] = accumulate_sq_norms(sums.get(name), x)

    return sums, collect_inputs(b.block, b.calls, names, add)


@register(Wanda)
def apply_wanda(model: nn.Module, config: Wanda, ctx: Context) -> None:
    """Wanda-prune the selected Linear layers inside ``model``'s decoder blocks, in place.

    Every selected layer is checked (N:M divisibility, NaN/inf) before any weight changes.
    Each group of layers reading one tensor is pruned in execution order, its inputs
    measured through the already-pruned groups of the block. A layer that received no
    calibration token is pruned by magnitude per row, with a note.
    """
    start = time.perf_counter()
    run = plan_pruning(model, config, ctx, "Wanda")
    data = ctx.data
    warn_if_few_samples(data, ctx, "Wanda")

    def process(b: BlockInputs) -> None:
        groups = block_groups(b, run.chosen)
        if not config.true_sequential:  # every group measured on the block as it came in, one pass
            sums, counts = _input_sq_norms(b, [r for names in groups for r in names])
        for names in groups:
            if config.true_sequential:
                sums, counts = _input_sq_norms(b, names)
            for r in names:
                linear = b.block.get_submodule(r)
                full = f"{b.name}.{r}"
                if counts[r] == 0:
                    fallback_to_magnitude(run, full, linear, "received no calibration tokens", per_row=True)
                    continue
                pruned, _ = wanda_prune(linear_weight(linear).detach(), sums.pop(r).sqrt(), run.sparsity, run.nm)
                write_pruned(run, full, linear, pruned)

    run_blockwise(model, data, process, ctx, "Wanda")
    order = "true-sequential" if config.true_sequential else "one pass per block"
    settings = order if run.nm else f"per output row, {order}"
    finish_notes(run, ctx, time.perf_counter() - start, settings)
