"""GPTQ (Frantar et al. 2022): weight-only quantization that corrects each rounding error.

For a Linear with weight W (out, in) and calibration inputs X (tokens, in), GPTQ minimizes
the output error ‖(W − Q)·Xᵀ‖² through the Hessian of that quadratic,

    H = 2·XᵀX / n        (in, in), accumulated batch by batch (``accumulate_hessian``)

Columns are quantized one at a time; after column i is rounded, the not-yet-quantized
columns absorb its error (the Optimal Brain Surgeon update). With U the upper Cholesky
factor of H⁻¹ (``factor_hessian``):

    q_i = Q(w_i)        e = (w_i − q_i) / U_ii        W[:, j] −= e · U[i, j]   (j > i)

``gptq_quantize`` does this in column blocks: inside a block the update is applied column
by column, the rest of the matrix receives the block's errors in one matmul at the end
(the "lazy batch" update), which gives the same result as the column-by-column form.

Details (see ALGORITHMS.md):
- dead inputs (H_ii = 0, a feature that is always 0) get H_ii = 1 and W[:, i] = 0;
- dampening: H += damp·mean(diag H)·I, escalated ×10 (three times) if H is still not
  positive definite, then a ``HessianError`` (a DataError);
- groups: a group's scale/zero is computed (min/max, like ``quantize_weight``) from the
  *current, already-updated* weights when its first column is reached; the column blocks
  are widened to whole groups so those weights are always up to date;
- act-order: columns are processed by descending H_ii; groups are runs of ``group_size``
  *processed* columns, and ``g_idx`` (in original column order) gives each column's group.
- sparsity (``keep_zeros``): the exact zeros of W (an earlier pruning step) stay zeros. When
  column i is reached, its pruned rows get the code of 0 whatever the OBS updates wrote there,
  so their whole value is the error e that flows on to the later, kept weights (SparseGPT's
  masked update); a group's range is taken over its kept weights only (0 is always inside).

``apply_gptq`` walks the decoder blocks with ``core.blockwise.run_blockwise`` and, with
``true_sequential``, quantizes a block's input groups in execution order (q/k/v, o,
gate/up, down), re-measuring each group's inputs through the already-quantized layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.blockwise import (
    check_finite,
    collect_inputs,
    linear_groups,
    run_blockwise,
    warn_if_few_samples,
)
from slimkit.core.calibration import BlockInputs, find_blocks
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.hessian import (  # noqa: F401  (re-exported: GPTQ's Hessian maths)
    HessianError,
    HessianFactor,
    accumulate_hessian,
    factor_hessian,
)
from slimkit.core.linear_like import (
    LinearLike,
    in_features,
    linear_problem,
    linear_shape,
    linear_weight,
)
from slimkit.core.nm import (
    check_nm_shape,
    check_pattern_sparsity,
    check_sparsity,
    nm_keep_mask,
    parse_pattern,
)
from slimkit.core.registry import Context, register
from slimkit.core.streaming import return_freed_memory
from slimkit.core.targets import select_modules, set_submodule
from slimkit.quantization.grids import GRIDS, BlockGrid, fp16_value, grid_for_columns, grid_problem
from slimkit.quantization.modules import QuantLinear
from slimkit.quantization.primitives import (
    BITS,
    QuantizedWeight,
    code_dtype,
    qrange,
    scale_zero_from_range,
)

# Bit widths GPTQ targets (3 only once the primitives can store it).
GPTQ_BITS = tuple(b for b in (2, 3, 4, 8) if b in BITS)
# Dampening escalations after the first attempt, each ×10 (0.01 -> 0.1 -> 1 -> 10).
# Below this many calibration samples the Hessian of a wide layer is poorly conditioned.


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """The outcome of ``gptq_quantize``.

    ``weight``: codes and scales in original column order (``g_idx`` set with act-order
    and groups). ``error``: the GPTQ objective Σ (w_i − q_i)² / U_ii² over all weights,
    which equals tr((W − Q)·H_d·(W − Q)ᵀ) with H_d the damped Hessian and W with dead
    columns zeroed (for H = 2XᵀX/n: 2/n·‖(W − Q)Xᵀ‖² plus the dampening term).
    ``damp``: the dampening fraction actually used.
    """

    weight: QuantizedWeight
    error: float
    damp: float


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    keep_zeros: bool = True,
    grid: BlockGrid | None = None,
    fp16_scales: bool = False,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
) -> GPTQResult:
    """GPTQ-quantize one (out, in) weight given the (in, in) Hessian of its inputs.

    ``group_size`` None: one scale per output row (found on the original weights);
    otherwise a scale per ``group_size`` columns, found from the updated weights when
    the group starts. ``block_size`` changes speed only, not the result. float64 ``W``
    and ``H`` compute in float64 (for tests), anything else in float32. ``keep_zeros``:
    W's exact zeros are pruned positions and come out as exact zeros (a dense W has none,
    so this changes nothing there). ``grid``: a GGUF block grid replacing bits/group_size/symmetric.
    """
    factor = factor_hessian(H, damp=damp, act_order=act_order)
    return gptq_quantize_factored(W, factor, bits=bits, group_size=group_size, symmetric=symmetric,
                                  block_size=block_size, keep_zeros=keep_zeros, grid=grid, fp16_scales=fp16_scales,
                                  sparsity=sparsity, nm=nm)


def gptq_quantize_factored(
    W: torch.Tensor, factor: HessianFactor, *, bits: int, group_size: int | None, symmetric: bool,
    block_size: int = 128, keep_zeros: bool = True, grid: BlockGrid | None = None, fp16_scales: bool = False,
    sparsity: float = 0.0, nm: tuple[int, int] | None = None,
) -> GPTQResult:
    """``gptq_quantize`` with H already factored, so layers sharing an input share one factorization.

    ``grid`` (a GGUF block grid, ``quantization.grids``) replaces bits/group_size/symmetric:
    the parameters of each run of ``grid.span`` columns are chosen by the grid's rule from the
    updated weights when the run starts, and codes are rounded against them. ``fp16_scales``:
    each scale is rounded to float16 when chosen (the codes and the error feedback use the
    rounded one), so a checkpoint stores the scales in 16 bits without loss.

    ``sparsity`` / ``nm``: prune in the same pass (SparseGPT's joint sparsification and
    quantization, Frantar & Alistarh 2023 §3.5): when a column block is reached (an N:M
    group, for ``nm``), its weights of lowest OBS saliency w²/U_jj² — from the current,
    already-updated weights, as SparseGPT chooses — join the pruned set, exactly
    ``round(sparsity·rows·cols)`` over the layer (earlier zeros counted); pruned weights get
    the code of 0 and their whole value flows on as error, kept ones their rounding error.
    """
    prune = nm is not None or sparsity > 0
    if prune and factor.perm is not None:
        raise ConfigError("pruning while quantizing visits columns left to right, as SparseGPT does: "
                          "it cannot be combined with act_order")
    if grid is not None:
        if factor.perm is not None:
            raise ConfigError(f"act-order cannot be used with the {grid.name} grid: GGUF blocks are runs of consecutive columns")
        bits, group_size, symmetric = grid.bits, grid.group_size, grid.symmetric
        if W.shape[1] % grid.span:
            raise ConfigError(f"{W.shape[1]} input columns do not split into {grid.name} blocks of {grid.span}")
    if W.dim() != 2 or W.shape[1] != factor.U.shape[0]:
        raise ValueError(f"weight of shape {tuple(W.shape)} does not match a Hessian of size {factor.U.shape[0]}")
    if not bool(torch.isfinite(W).all()):
        raise DataError("weight contains NaN or inf; quantization needs finite values")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    qmin, qmax = (grid.qmin, grid.qmax) if grid is not None else qrange(bits, symmetric)
    float_zero = grid is not None and grid.float_zero
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    span = gs if grid is None else grid.span  # columns whose parameters are chosen together
    if gs <= 0 or cols % gs:
        raise ConfigError(f"group_size {group_size} does not divide the {cols} input columns")
    n_groups = cols // gs
    U = factor.U
    dt = U.dtype
    w = W.detach().to(device=U.device, dtype=dt).clone()
    pruned = (w == 0) if keep_zeros or prune else None
    if pruned is not None and not bool(pruned.any()) and not prune:
        pruned = None  # dense: the plain algorithm, bit for bit
    w[:, factor.dead] = 0.0
    if factor.perm is not None:
        w = w[:, factor.perm]
        pruned = None if pruned is None else pruned[:, factor.perm]
    # Transposed working copy: column i of W is the contiguous row i of Wt.
    Wt = w.T.contiguous()  # (cols, rows)
    Pt = None if pruned is None else pruned.T.contiguous()  # (cols, rows): True where W was pruned
    del w, pruned
    Qt = torch.empty(cols, rows, dtype=code_dtype(symmetric, bits), device=U.device)  # codes, processing order
    scales = torch.empty(n_groups, rows, dtype=torch.float32, device=U.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.float32 if float_zero else torch.int32, device=U.device)
    if group_size is None:
        s, z = scale_zero_from_range(Wt.amin(0), Wt.amax(0), bits, symmetric)
        scales[0], zeros[0] = fp16_value(s) if fp16_scales else s, z
    # Widen blocks to whole parameter runs: a group's scale needs its columns fully updated.
    bs = block_size if group_size is None else max(1, block_size // span) * span
    if nm is not None:
        check_nm_shape("weight", cols, nm[1])
        bs = max(bs // nm[1], 1) * nm[1]  # whole N:M groups in every block
    dead_t = factor.dead.to(U.device)
    total = torch.zeros((), dtype=torch.float64, device=U.device)
    s_col = z_col = None
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = Wt[i1:i2]  # (block, rows) view: updated in place
        U1 = U[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)  # scaled errors e of the block's columns
        d1 = U1.diagonal()
        if prune and nm is None:  # the block's share of the layer's pruned count, lowest saliency first
            P1 = Pt[i1:i2]
            extra = round(sparsity * rows * i2) - round(sparsity * rows * i1) - int(P1.sum())
            if extra > 0:
                sal = (W1 / d1.unsqueeze(1)).pow(2)
                sal[dead_t[i1:i2]] = 0.0
                sal[P1] = float("inf")  # already pruned: counted, not chosen again
                P1.view(-1)[torch.sort(sal.reshape(-1), stable=True).indices[:extra]] = True
        for i in range(i2 - i1):
            c = i1 + i
            if nm is not None and c % nm[1] == 0:  # each row keeps the N most salient of these M columns
                m = nm[1]
                sal = (W1[i:i + m] / d1[i:i + m].unsqueeze(1)).pow(2)
                sal[dead_t[c:c + m]] = 0.0
                sal[Pt[c:c + m]] = -1.0  # already pruned: stays pruned
                Pt[c:c + m] |= ~nm_keep_mask(sal.T, nm[0], m).T
            if c % span == 0 and group_size is not None:
                g = W1[i:i + span]
                if Pt is not None:  # the range of the kept weights (pruned ones become 0, inside it)
                    g = g.masked_fill(Pt[c:c + span], 0.0)
                if grid is None:
                    s, z = scale_zero_from_range(g.amin(0), g.amax(0), bits, symmetric)
                    scales[c // gs], zeros[c // gs] = fp16_value(s) if fp16_scales else s, z
                else:
                    s, z = grid.params(g.T)  # (rows, span // gs) each
                    scales[c // gs:(c + span) // gs] = s.T
                    if z is not None:
                        zeros[c // gs:(c + span) // gs] = z.T
            if c % gs == 0:
                s_col, z_col = scales[c // gs].to(dt), zeros[c // gs].to(dt)
                zero_code = torch.round(z_col).clamp(qmin, qmax) if float_zero else z_col
            col = W1[i]
            if float_zero:  # a fractional zero point: round after adding it
                q = torch.clamp(torch.round(col / s_col + z_col), qmin, qmax)
            else:
                q = torch.clamp(torch.round(col / s_col) + z_col, qmin, qmax)
            if Pt is not None:
                q = torch.where(Pt[c], zero_code, q)  # a pruned weight gets the code of 0 (exactly 0 unless float_zero)
            Qt[c] = q
            e = (col - (q - z_col) * s_col) / U1[i, i]
            E1[i] = e
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1.0)  # OBS update of the block's later columns
        total += E1.double().pow(2).sum()
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # lazy update of everything after the block
    codes = Qt.T  # (rows, cols), processing order
    g_idx = None
    if factor.perm is not None:
        inv = torch.argsort(factor.perm)
        codes = codes[:, inv]  # back to original column order
        if group_size is not None:
            g_idx = (torch.arange(cols, device=U.device) // gs)[inv].to(torch.int32)
    weight = QuantizedWeight(
        q=codes.contiguous(),
        scale=scales.T.contiguous(),
        zero=None if symmetric else zeros.T.contiguous() if float_zero else zeros.T.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=g_idx,
    )
    return GPTQResult(weight=weight, error=float(total), damp=factor.damp)


# --- config and handler ----------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQ(Config):
    """GPTQ weight-only quantization of the Linear layers inside a decoder's blocks.

    bits: 2, 4 or 8 (3 where the primitives store it). group_size: a scale per
    ``group_size`` input columns (a multiple of 8 dividing every selected layer's
    in_features), or None for one per output channel. symmetric: signed codes, z = 0.
    act_order: process columns by descending Hessian diagonal (stores ``g_idx``).
    damp: dampening fraction of mean(diag H), in (0, 1]. block_size: columns per lazy
    update (speed only). true_sequential: quantize q/k/v, then o, then gate/up, then down,
    each measured through the already-quantized layers. include / ignore: module name
    patterns. lm_head and embeddings are outside the blocks and stay float. keep_zeros:
    the exact zeros of an earlier pruning step stay exact zeros (the OBS update never
    leaves a value in a pruned position); false quantizes them like any weight.
    grid: a GGUF block grid (q8_0, q5_0, q4_0, q4_1, q4_k, q6_k; ``quantization.grids``) to
    quantize onto, so ``slimkit export gguf`` copies the codes as they are; it sets the bits,
    group size and symmetry (the three fields above are then not used). A layer whose rows
    do not split into the grid's blocks gets llama.cpp's fallback type (q4_k -> q5_0, q6_k -> q8_0).
    fp16_scales: round each scale to float16 as it is chosen (GPTQ corrects against the
    rounded value), so checkpoints store scales in 16 bits, losslessly (0.125 instead of 0.25
    bits per weight at group 128).
    sparsity / pattern: also prune, in the same pass, as SparseGPT's joint sparsification and
    quantization does: ``sparsity`` of each layer's weights (exact per layer), or an N:M
    ``pattern`` such as "2:4" (sparsity then 1 − N/M); the pruned weights' error is corrected
    by the later columns together with the rounding errors. 0 / None: quantize only.
    lm_head: also GPTQ the output layer, on the final hidden states of the calibration data
    (measured through the quantized blocks), as AutoGPTQ's ``lm_head=True``; a tied output
    layer is left float with a note. It is never pruned.
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    keep_zeros: bool = True
    grid: str | None = None
    fp16_scales: bool = False
    sparsity: float = 0.0
    pattern: str | None = None
    lm_head: bool = False
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check every field's type and range."""
        if self.grid is not None:
            if self.grid not in GRIDS:
                self.fail("grid", f"must be one of {', '.join(GRIDS)} (a GGUF block type) or None, got {self.grid!r}")
            if self.act_order:
                self.fail("act_order", f"cannot be used with grid {self.grid!r}: GGUF blocks are runs of consecutive "
                                       "columns, act-order groups are not; set act_order: false")
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int) or b not in GPTQ_BITS:
            self.fail("bits", f"must be one of {', '.join(map(str, GPTQ_BITS))}, got {b!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 8):
            self.fail("group_size",
                      f"must be None (per output channel) or a positive multiple of 8 such as 32, 64 or 128, got {gs!r}")
        for name in ("symmetric", "act_order", "true_sequential", "keep_zeros", "fp16_scales", "lm_head"):
            if not isinstance(getattr(self, name), bool):
                self.fail(name, f"must be true or false, got {getattr(self, name)!r}")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1):
            self.fail("damp", f"must be a number in (0, 1] (a fraction of the mean Hessian diagonal; 0.01 is usual), got {d!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            self.fail("block_size", f"must be a positive integer (128 is usual), got {bs!r}")
        nm = parse_pattern(self.pattern, "GPTQ.pattern")
        if nm is not None and self.sparsity == 0.0:
            object.__setattr__(self, "sparsity", 1.0 - nm[0] / nm[1])  # the pattern's own sparsity
        check_sparsity(self.sparsity, "GPTQ.sparsity")
        check_pattern_sparsity(self, nm)
        if (self.sparsity > 0 or nm) and self.act_order:
            self.fail("act_order", "pruning while quantizing visits columns left to right, as SparseGPT does; "
                                   "set act_order: false")
        self.check_name_patterns()


def _divisor_hint(cols: int, gs: int) -> str:
    """A group size that divides ``cols`` (the largest smaller than ``gs``), or None."""
    smaller = [g for g in (256, 128, 64, 32, 16, 8) if g < gs and cols % g == 0]
    return f"group_size {smaller[0]}" if smaller else "group_size None (per channel)"


@register(GPTQ)
def apply_gptq(model: nn.Module, config: GPTQ, ctx: Context) -> None:
    """GPTQ-quantize the selected Linear layers inside ``model``'s decoder blocks, in place.

    Only Linear layers inside the repeated blocks are quantized (lm_head and the
    embeddings run outside them, as in AutoGPTQ and llm-compressor; use RTN for those).
    Every selected layer is checked (group size, NaN/inf) before anything changes. A
    Linear that received no calibration token falls back to RTN, with a note.
    """
    data = getattr(ctx, "data", None)
    if data is None:
        raise DataError("GPTQ needs calibration data (data=CalibrationData...); it measures each layer's inputs")
    start = time.perf_counter()
    blocks_name, _ = find_blocks(model)
    prefix = blocks_name + "."
    selected = select_modules(model, (LinearLike,), config.include, config.ignore)
    # Names only: holding the modules would keep every replaced weight alive (and, when
    # streaming, every block's weights once loaded).
    chosen: set[str] = set()
    outside: list[str] = []
    gs = config.group_size
    for name, module in selected:
        if not name.startswith(prefix):
            outside.append(name)
        elif (problem := linear_problem(module, "a QuantLinear")) is not None:
            ctx.note(f"GPTQ: skipped {name}: {problem}")
        elif config.grid is not None:
            if (problem := grid_problem(config.grid, in_features(module))) is not None:
                raise ConfigError(f"GPTQ.grid: {name}: {problem}; leave the layer out with ignore=[{name!r}]")
            chosen.add(name)
        elif gs is not None and in_features(module) % gs:
            cols = in_features(module)
            raise ConfigError(
                f"GPTQ.group_size: {gs} does not divide in_features {cols} of {name}; "
                f"use {_divisor_hint(cols, gs)} or leave the layer out with ignore=[{name!r}]"
            )
        else:
            chosen.add(name)
    for name, module in selected:
        if name in chosen:
            check_finite(name, module)  # meta (streamed) weights are checked once their block is loaded
    del selected

    warn_if_few_samples(data, ctx, "GPTQ")

    nm = parse_pattern(config.pattern, "GPTQ.pattern")
    if nm is not None:
        for name in chosen:
            cols = in_features(model.get_submodule(name))
            if cols % nm[1]:
                raise ConfigError(f"GPTQ.pattern: {name} has {cols} input columns, not divisible by M={nm[1]} of "
                                  f"{config.pattern}; leave it out with ignore=[{name!r}]")
    stats = {"layers": 0, "params": 0, "rtn": 0, "sparse": 0, "zeros": 0, "pruned_min": 1.0, "pruned_max": 0.0}
    fallbacks: dict[str, int] = {}  # grid name -> layers written on it instead of config.grid

    def layer_grid(module: nn.Module) -> BlockGrid | None:
        if config.grid is None:
            return None
        grid = grid_for_columns(config.grid, in_features(module))
        if grid.name != config.grid:
            fallbacks[grid.name] = fallbacks.get(grid.name, 0) + 1
        return grid

    def rtn(module: nn.Module) -> QuantLinear:
        grid = layer_grid(module)
        if grid is not None:
            return QuantLinear.from_linear(module, weight=grid.quantize(linear_weight(module)))
        if config.fp16_scales or config.sparsity > 0:
            # GPTQ with an identity Hessian: round-to-nearest (and magnitude pruning), scales chosen as GPTQ does
            w = linear_weight(module).detach().float()
            eye = factor_hessian(torch.eye(w.shape[1], dtype=torch.float32), damp=config.damp)
            result = gptq_quantize_factored(w, eye, bits=config.bits, group_size=gs, symmetric=config.symmetric,
                                            keep_zeros=config.keep_zeros, fp16_scales=config.fp16_scales,
                                            sparsity=config.sparsity, nm=nm)
            return QuantLinear.from_linear(module, weight=result.weight)
        return QuantLinear.from_linear(module, config.bits, gs, config.symmetric)

    notes: list[str] = []

    def process(b: BlockInputs) -> None:
        block = b.block
        groups = []
        for g in linear_groups(block, b.calls):
            names = [r for r in g.names if f"{b.name}.{r}" in chosen]
            if names:
                groups.append(names)
        for names in groups:
            for r in names:
                check_finite(f"{b.name}.{r}", block.get_submodule(r))
        # No dict of the block's modules is kept here: it would hold every replaced float
        # Linear alive until the block is done (a second copy of the block's weights).
        done: dict[str, QuantLinear] = {}
        if config.true_sequential:
            for names in groups:
                hessians, counts = _hessians(block, b.calls, [names])
                _quantize_group(block, b.name, names, hessians.get(names[0]), counts, done)
        else:
            hessians, counts = _hessians(block, b.calls, groups)
            for names in groups:
                _quantize_group(block, b.name, names, hessians.pop(names[0], None), counts, done)
        for r, qlinear in done.items():
            _swap(block, r, qlinear)

    def _quantize_group(block, block_name, names, H, counts, done) -> None:
        # Until the block is finished a quantized layer is stood in for by a plain Linear holding
        # its dequantized weight: the same outputs as the QuantLinear, without unpacking codes
        # on every later calibration forward.
        modules = dict(block.named_modules())
        leader = names[0]
        live = []
        for r in names:
            if counts[r] == 0 or counts[r] != counts[leader]:
                why = ("received no calibration tokens" if counts[r] == 0
                       else f"did not read the same input as {block_name}.{leader}")
                notes.append(f"GPTQ: {block_name}.{r} {why}; RTN used")
                done[r] = rtn(modules[r])
                _swap(block, r, _stand_in(modules[r], done[r], ctx))
                stats["rtn"] += 1
            else:
                live.append(r)
        if not live:
            return
        try:
            factor = factor_hessian(H, damp=config.damp, act_order=config.act_order)
        except HessianError as exc:
            raise DataError(f"Hessian of {block_name}.{leader} {exc.detail}") from None
        del H
        if factor.damp != config.damp:
            notes.append(f"GPTQ: the Hessian of {block_name}.{leader} needed damp={factor.damp:g} "
                         f"(escalated from {config.damp:g}) to be positive definite")
        for r in live:
            linear = modules[r]
            w = linear_weight(linear).detach()
            zeros = int((w == 0).sum())
            if zeros * 10 >= w.numel():  # a pruned layer (a dense one has next to no exact zeros)
                stats["sparse"] += 1
                stats["zeros"] += zeros if config.keep_zeros else 0
            result = gptq_quantize_factored(w, factor, bits=config.bits, group_size=gs, symmetric=config.symmetric,
                                            block_size=config.block_size, keep_zeros=config.keep_zeros,
                                            grid=layer_grid(linear), fp16_scales=config.fp16_scales,
                                            sparsity=config.sparsity, nm=nm)
            del w
            if config.sparsity > 0:
                frac = float((result.weight.dequantize() == 0).float().mean())
                stats["pruned_min"], stats["pruned_max"] = min(stats["pruned_min"], frac), max(stats["pruned_max"], frac)
            done[r] = QuantLinear.from_linear(linear, weight=result.weight)
            _swap(block, r, _stand_in(linear, done[r], ctx))
            stats["layers"] += 1
            stats["params"] += linear.weight.numel()
        if ctx.stream is not None:  # streamed: keep the peak near one block (the factor and copies are freed)
            del factor, linear, modules, result
            return_freed_memory()

    run_blockwise(model, data, process, ctx, "GPTQ")
    if config.lm_head:
        head = _quantize_output_layer(model, data, config, ctx, layer_grid)
        if head:
            stats["layers"] += 1
            stats["params"] += head

    for line in notes:
        ctx.note(line)
    scope = (f"GPTQ: only Linear layers inside {blocks_name}.* are quantized, as in AutoGPTQ and llm-compressor; "
             "lm_head and embeddings stay float")
    if config.lm_head:
        scope = f"GPTQ: the Linear layers inside {blocks_name}.* and the output layer are quantized; embeddings stay float"
        head = getattr(model, "get_output_embeddings", lambda: None)()
        outside = [n for n in outside if model.get_submodule(n) is not head]
    if outside:
        shown = ", ".join(outside[:5]) + (" ..." if len(outside) > 5 else "")
        scope += f" (selected but outside the blocks: {shown}; use RTN for them)"
    ctx.note(scope)
    if config.sparsity > 0:
        what = config.pattern or f"{config.sparsity:.0%} unstructured"
        ctx.note(f"GPTQ: pruned while quantizing ({what}, SparseGPT's joint mode): "
                 f"{stats['pruned_min']:.2%}–{stats['pruned_max']:.2%} exact zeros per layer (the pruned weights, "
                 "and kept ones that round to 0)")
    if stats["sparse"] and config.sparsity == 0:
        ctx.note(f"GPTQ: {stats['sparse']} layer(s) were ≥ 10% exact zeros (an earlier pruning step); "
                 + (f"their {stats['zeros']:,} zeros stay exact zeros (keep_zeros)" if config.keep_zeros else
                    "keep_zeros=false: their zeros were quantized like any weight, so the sparsity is lost"))
    seconds = time.perf_counter() - start
    params = stats["params"]  # weights GPTQ quantized (RTN fallbacks not counted)
    per_m = seconds / (params / 1e6) if params else 0.0
    granularity = "per output channel" if gs is None else f"group size {gs}"
    if config.grid is not None:
        shown = ", ".join(f"{n} layer(s) on {name}" for name, n in fallbacks.items())
        ctx.note(f"GPTQ: onto the GGUF {config.grid} grid"
                 + (f"; rows that do not split into its blocks use llama.cpp's fallback: {shown}" if fallbacks else ""))
        kind = f"the {config.grid} grid ("
    else:
        kind = f"int{config.bits} ({'symmetric' if config.symmetric else 'asymmetric'}, {granularity}, "
    ctx.note(
        f"GPTQ: quantized {stats['layers']} Linear layer(s) to {kind}act_order={config.act_order}, "
        f"true_sequential={config.true_sequential}, damp={config.damp:g}), {stats['rtn']} by RTN fallback, "
        f"in {seconds:.1f} s ({per_m:.2f} s per million parameters)"
    )


def _quantize_output_layer(model: nn.Module, data, config: GPTQ, ctx: Context, layer_grid) -> int:
    """GPTQ the model's output layer (lm_head) on its inputs, the final hidden states of the calibration data
    measured through the already-quantized blocks; returns its weight count (0 when skipped, with a note)."""
    from slimkit.core.calibration import _model_device, _to, run_model, trim_padding

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    path = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    problem = None if head is None else linear_problem(head, "a QuantLinear")
    if head is None or path is None or problem:
        ctx.note(f"GPTQ: lm_head=true, but {'the model has no output layer' if head is None else problem}; left as it is")
        return 0
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    if inputs is not None and getattr(inputs, "weight", None) is head.weight:
        ctx.note(f"GPTQ: {path} is tied to the input embedding; left float (quantize both with "
                 "RTN(embeddings=True) to keep the tie)")
        return 0
    if ctx.stream is not None or head.weight.is_meta:
        ctx.note(f"GPTQ: lm_head=true is not applied while streaming a checkpoint; {path} left float")
        return 0
    acc: list = [None, 0]
    mask: list = [None]

    def hook(_module, args):
        x = args[0]
        if mask[0] is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask[0].shape):
            x = x[mask[0].bool()]
        acc[0], acc[1] = accumulate_hessian(acc[0], acc[1], x.detach().reshape(-1, x.shape[-1]))

    handle = head.register_forward_pre_hook(hook)
    device = _model_device(model)
    try:
        with torch.no_grad():
            for batch in data:
                batch = trim_padding(_to(batch, device))
                mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                run_model(model, batch)
    finally:
        handle.remove()
    if acc[0] is None:
        ctx.note(f"GPTQ: {path} received no calibration tokens; left float")
        return 0
    try:
        factor = factor_hessian(acc[0], damp=config.damp)
    except HessianError as exc:
        raise DataError(f"Hessian of {path} {exc.detail}") from None
    w = linear_weight(head).detach()
    result = gptq_quantize_factored(w, factor, bits=config.bits, group_size=config.group_size,
                                    symmetric=config.symmetric, block_size=config.block_size,
                                    keep_zeros=config.keep_zeros, grid=layer_grid(head),
                                    fp16_scales=config.fp16_scales)
    set_submodule(model, path, QuantLinear.from_linear(head, weight=result.weight))
    return w.numel()


def _stand_in(linear: nn.Module, qlinear: QuantLinear, ctx: Context) -> nn.Module:
    """A plain Linear computing what ``qlinear`` computes (its dequantized weight, the same bias).

    ``linear``: the Linear-like layer being replaced (a Conv1D too). When streaming, memory
    comes first: the QuantLinear itself (dequantizing on every forward) rather than a float
    copy of the weight.
    """
    if ctx.stream is not None:
        return qlinear
    w = linear.weight
    out_f, in_f = linear_shape(linear)
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(qlinear.dense_weight(w.dtype), requires_grad=False)
    new.bias = linear.bias
    return new


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    old = block.get_submodule(name)
    new.train(old.training)
    set_submodule(block, name, new)


def _hessians(block: nn.Module, calls, groups: list[list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One Hessian per group (its members read the same input, so the first member's is accumulated).

    Also returns the tokens each member received. The block is run one call at a time and
    cut short as soon as every member has seen its input (true-sequential's q/k/v pass
    costs almost nothing), which a layer that does not run on a call simply never triggers.
    """
    names = [r for g in groups for r in g]
    leaders = {g[0] for g in groups}
    H: dict[str, torch.Tensor] = {}
    n: dict[str, int] = {}

    def fn(name: str, x: torch.Tensor) -> None:
        if name in leaders:
            H[name], n[name] = accumulate_hessian(H.get(name), n.get(name, 0), x)

    return H, collect_inputs(block, calls, names, fn)
