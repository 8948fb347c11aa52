"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that corrects each removed weight's error.

For a Linear with weight W (out, in) and calibration inputs X (tokens, in), SparseGPT
minimizes the layer's output error ‖(W − Ŵ)·Xᵀ‖² over sparse Ŵ with GPTQ's machinery:
the Hessian H = 2·XᵀX/n (``quantization.gptq.accumulate_hessian``) and U, the upper
Cholesky factor of the damped H⁻¹ (``quantization.gptq.factor_hessian``: dead inputs,
dampening and its escalation, ``HessianError``). Columns are visited left to right;
removing weight w_j (setting it to 0) is compensated by the not-yet-visited columns of its
row (the Optimal Brain Surgeon update):

    e = w_j / U_jj  (0 for a kept weight)        W[:, k] −= e · U[j, k]   (k > j)

The mask is chosen from the *current* (already updated) weights by the OBS saliency
w²/U_jj², lowest pruned:
- unstructured: once per block of ``block_size`` columns, when the block is reached,
  over the whole (rows × block) slice, as the reference implementation (IST-DASLab
  sparsegpt.py, and llm-compressor) does. The reference prunes everything at or below
  the block's ``int(numel · sparsity)``-th score, which gives one weight too many (more on
  ties); here each block prunes exactly its share of ``round(sparsity · rows · cols)``
  (the cumulative count rounded at the block's end minus at its start; ties go to the
  earlier position), so every layer holds exactly that many pruned weights. Rows may
  differ from one another (as in the paper); the layer total is exact.
- N:M: when the first column of every group of M is reached, each row keeps the N
  highest-saliency weights of those M columns (blocks are widened to whole groups).
Inside a block the update is applied column by column; the rest of the matrix receives
the block's errors in one matmul at the end (GPTQ's lazy batch update), which gives the
same result as the column-by-column form.

``apply_sparsegpt`` walks the decoder blocks with ``core.blockwise.run_blockwise`` (a
checkpoint bigger than memory streams from disk), pruning each block's Linear groups in
execution order (q/k/v, o, gate/up, down) on inputs measured through the already-pruned
groups; the next block is calibrated on the pruned block's outputs.
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
from slimkit.core.streaming import return_freed_memory
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
    check_nm_shape,
    check_sparsity,
    nm_keep_mask,
    pattern_nm,
)
from slimkit.core.hessian import (
    HessianError,
    HessianFactor,
    accumulate_hessian,
    factor_hessian,
)

# --- pure functions ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseGPTResult:
    """The outcome of ``sparsegpt_prune``.

    ``weight``: the pruned (out, in) weight in the computation's dtype (float64 for float64
    inputs, else float32), exact zeros where ``mask`` is False. ``mask``: bool, True = kept.
    ``loss``: the OBS objective Σ e² over the pruned weights (e = w/U_jj at the time each
    is removed), which equals tr((W − Ŵ)·H_d·(W − Ŵ)ᵀ) with H_d the damped Hessian
    (for H = 2XᵀX/n: 2/n·‖(W − Ŵ)Xᵀ‖² plus the dampening term). ``damp``: the
    dampening fraction actually used.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    damp: float


def _cumulative(sparsity: float, rows: int, upto: int) -> int:
    """Pruned weights among the first ``upto`` columns: the layer's exact count, spread over the blocks."""
    return round(sparsity * rows * upto)


def sparsegpt_prune(W: torch.Tensor, factor_or_H: HessianFactor | torch.Tensor, sparsity: float = 0.5,
                    pattern: Pattern = None, block_size: int = 128, *, damp: float = 0.01) -> SparseGPTResult:
    """SparseGPT-prune one (out, in) weight given its inputs' (in, in) Hessian or an already computed factor.

    ``sparsity``: with ``pattern`` None exactly ``round(sparsity · out · in)`` weights of the
    layer are pruned (see the module docstring for how they are spread over the column
    blocks); with ``pattern`` "N:M" (or ``(N, M)``) each row keeps N of every M consecutive
    weights and ``sparsity`` is not used. ``block_size``: columns per mask choice (unstructured)
    and per lazy update. ``damp``: dampening when a Hessian (not a factor) is given.
    A Hessian computes in float64 when it is float64, else in float32.
    """
    if isinstance(factor_or_H, HessianFactor):
        factor = factor_or_H
    else:
        factor = factor_hessian(factor_or_H, damp=damp)
    if factor.perm is not None:
        raise ValueError("SparseGPT visits columns in their natural order: factor the Hessian with act_order=False")
    U = factor.U
    if W.dim() != 2 or W.shape[1] != U.shape[0]:
        raise ValueError(f"weight of shape {tuple(W.shape)} does not match a Hessian of size {U.shape[0]}")
    if not bool(torch.isfinite(W).all()):
        raise DataError("weight contains NaN or inf; pruning needs finite values")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    nm = pattern_nm(pattern)
    rows, cols = W.shape
    if nm is None:
        check_sparsity(sparsity, "sparsegpt_prune")
        sparsity = float(sparsity)
    else:
        n, m = nm
        check_nm_shape("weight", cols, m)
    dt = U.dtype
    # Transposed working copy: column j of W is the contiguous row j of Wt. Dead inputs
    # (always 0 in the calibration data) keep their weights unless pruned: their row and
    # column of H are zero, so U couples them to nothing and no update reaches them.
    Wt = W.detach().to(device=U.device, dtype=dt).T.contiguous()  # (cols, rows)
    keep_t = torch.ones(cols, rows, dtype=torch.bool, device=U.device)
    dead = factor.dead.to(U.device)
    bs = block_size if nm is None else max(1, block_size // m) * m  # whole N:M groups in every block
    total = torch.zeros((), dtype=torch.float64, device=U.device)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = Wt[i1:i2]  # (block, rows) view: updated in place
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        K1 = keep_t[i1:i2]
        # Saliency of removing each weight, w²/U_jj²; a dead input's weights cost nothing on the data.
        if nm is None:
            k = _cumulative(sparsity, rows, i2) - _cumulative(sparsity, rows, i1)
            if k:
                sal = (W1 / d.unsqueeze(1)).pow(2)
                sal[dead[i1:i2]] = 0.0
                lowest = torch.sort(sal.reshape(-1), stable=True).indices[:k]
                K1.view(-1)[lowest] = False
        E1 = torch.empty_like(W1)  # e of the block's columns
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                sal = (W1[i:i + m] / d[i:i + m].unsqueeze(1)).pow(2)  # (m, rows), from the updated weights
                sal[dead[i1 + i:i1 + i + m]] = 0.0
                K1[i:i + m] = nm_keep_mask(sal.T, n, m).T
            col = W1[i]
            e = col.masked_fill(K1[i], 0.0) / d[i]
            E1[i] = e
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1.0)  # OBS update of the block's later columns
        W1.masked_fill_(~K1, 0.0)
        total += E1.double().pow(2).sum()
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # lazy update of everything after the block
    return SparseGPTResult(weight=Wt.T.contiguous(), mask=keep_t.T.contiguous(), loss=float(total), damp=factor.damp)


# --- config and handler --------------------------------------------------------------------


@dataclass(frozen=True)
class SparseGPT(BlockPruneConfig):
    """SparseGPT pruning (OBS weight updates from the inputs' Hessian) of the Linear layers inside a decoder's blocks.

    sparsity: fraction of each selected layer's weights set to 0, in [0, 1), exact per layer.
    pattern: None (unstructured) or "N:M" such as "2:4" / "4:8" (keep N of every M
    consecutive inputs in a row; sparsity must then be 1 − N/M). block_size: columns per
    mask choice (unstructured) and per lazy update; 128 as in the paper. dampening:
    fraction of mean(diag H) added to H's diagonal, in (0, 1], raised ×10 (up to three
    times) if H is still not positive definite. include / ignore: module name patterns.

    Only Linear layers inside the repeated decoder blocks are touched, as in the paper and
    llm-compressor: lm_head and the embeddings stay dense. Pruned weights are exact zeros
    in the layers' ordinary weights, the kept ones updated. To prune and quantize in one
    pass (the paper's joint mode), use ``GPTQ(sparsity=..., pattern=..., bits=...)``; to
    quantize afterwards keeping these zeros, any GPTQ (``keep_zeros``), RTN or AWQ step.
    """

    block_size: int = 128
    dampening: float = 0.01

    def validate(self) -> None:
        """Check sparsity and pattern (and that they agree), block_size, dampening and the name patterns."""
        super().validate()
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            self.fail("block_size", f"must be a positive integer (128 is usual), got {bs!r}")
        d = self.dampening
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1):
            self.fail("dampening", f"must be a number in (0, 1] (a fraction of the mean Hessian diagonal; "
                                   f"0.01 is usual), got {d!r}")


def _leader_hessians(b: BlockInputs, groups: list[list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One Hessian per group (accumulated on its first member: the members read one tensor) and tokens per layer."""
    leaders = {names[0] for names in groups}
    acc: dict[str, tuple[torch.Tensor | None, int]] = {}

    def add(name: str, x: torch.Tensor) -> None:
        if name in leaders:
            acc[name] = accumulate_hessian(*acc.get(name, (None, 0)), x)

    counts = collect_inputs(b.block, b.calls, [r for names in groups for r in names], add)
    return {name: H for name, (H, _) in acc.items()}, counts


@register(SparseGPT)
def apply_sparsegpt(model: nn.Module, config: SparseGPT, ctx: Context) -> None:
    """SparseGPT-prune the selected Linear layers inside ``model``'s decoder blocks, in place.

    Every selected layer is checked (N:M divisibility, NaN/inf) before any weight changes.
    Each group of layers reading one tensor shares one Hessian factorization and is pruned
    in execution order, its inputs measured through the already-pruned groups of the block.
    A layer that received no calibration token is pruned by magnitude (exact count over the
    layer, or N:M), with a note.
    """
    start = time.perf_counter()
    run = plan_pruning(model, config, ctx, "SparseGPT")
    data = ctx.data
    warn_if_few_samples(data, ctx, "SparseGPT")

    def process(b: BlockInputs) -> None:
        groups = block_groups(b, run.chosen)
        if not config.true_sequential:  # every group measured on the block as it came in, one pass
            hessians, counts = _leader_hessians(b, groups)
        for names in groups:
            leader = names[0]
            if config.true_sequential:
                hessians, counts = _leader_hessians(b, [names])
            H = hessians.pop(leader, None)
            live = []
            for r in names:
                linear = b.block.get_submodule(r)
                if counts[r] == 0:
                    fallback_to_magnitude(run, f"{b.name}.{r}", linear, "received no calibration tokens", per_row=False)
                elif counts[r] != counts[leader]:
                    fallback_to_magnitude(run, f"{b.name}.{r}", linear,
                                          f"did not read the same input as {b.name}.{leader}", per_row=False)
                else:
                    live.append(r)
            if not live:
                continue
            try:
                factor = factor_hessian(H, damp=config.dampening)
            except HessianError as exc:
                raise DataError(f"Hessian of {b.name}.{leader} {exc.detail}") from None
            if factor.damp != config.dampening:
                run.notes.append(f"SparseGPT: the Hessian of {b.name}.{leader} needed dampening={factor.damp:g} "
                                 f"(escalated from {config.dampening:g}) to be positive definite")
            for r in live:
                linear = b.block.get_submodule(r)
                result = sparsegpt_prune(linear_weight(linear).detach(), factor, run.sparsity, run.nm,
                                         config.block_size)
                write_pruned(run, f"{b.name}.{r}", linear, result.weight)
                del result
            del H
            if ctx.stream is not None:  # streamed: keep the peak near one block
                del factor
                return_freed_memory()

    run_blockwise(model, data, process, ctx, "SparseGPT")
    finish_notes(run, ctx, time.perf_counter() - start,
                 f"block_size={config.block_size}, dampening={config.dampening:g}, "
                 + ("true-sequential" if config.true_sequential else "one pass per block"))
