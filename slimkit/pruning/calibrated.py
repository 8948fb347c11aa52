"""The block-wise plumbing Wanda and SparseGPT share: selection, checks, fallbacks and notes.

Both prune the Linear layers inside a decoder's repeated blocks, one block at a time
(``core.blockwise.run_blockwise``), group by group in execution order. This module holds
what is the same for both: choosing and checking every layer before any weight changes
(``plan_pruning``), the groups of one block (``block_groups``), writing a pruned weight
and counting it (``write_pruned``), the magnitude fallback for a layer that received no
calibration tokens, and the closing notes with the measured sparsity and time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.blockwise import check_finite, linear_groups
from slimkit.core.calibration import BlockInputs, find_blocks
from slimkit.core.config import Config
from slimkit.core.errors import DataError
from slimkit.core.linear_like import (
    LinearLike,
    in_features,
    linear_problem,
    linear_weight,
    set_linear_weight,
)
from slimkit.core.registry import Context
from slimkit.core.targets import select_modules
from slimkit.pruning.nm import (
    check_nm_shape,
    check_pattern_sparsity,
    check_sparsity,
    fill_sparsity,
    nm_keep_mask,
    parse_pattern,
    row_keep_mask,
)


def magnitude_keep_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                        per_row: bool) -> torch.Tensor:
    """The fallback for a layer with no calibration tokens: keep the largest |w|.

    N:M within every group; otherwise ``round(sparsity · in)`` per row (``per_row``,
    Wanda's granularity) or ``round(sparsity · numel)`` over the whole layer (SparseGPT's
    exact layer count).
    """
    scores = weight.detach().abs().to(torch.float64)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    if per_row:
        return row_keep_mask(scores, sparsity)
    return row_keep_mask(scores.reshape(1, -1), sparsity).reshape(scores.shape)


@dataclass(frozen=True)
class BlockPruneConfig(Config):
    """Fields and checks every block-wise pruning config (Wanda, SparseGPT) shares.

    sparsity: None (0.5, or 1 − N/M with a pattern) or a fraction in [0, 1); pattern: None
    (unstructured) or "N:M"; include / ignore: module name patterns.
    true_sequential: measure
    each group's inputs through the block's already-pruned groups (q/k/v, then o, then
    gate/up, then down; GPTQ's option of that name); False measures every group on the
    block as it came in, one pass, as the Wanda and SparseGPT reference code does.
    """

    family: ClassVar[str] = "prune"
    leaves_zeros: ClassVar[bool] = True  # unstructured: pruned weights stay in place as zeros
    needs_data: ClassVar[bool] = True

    sparsity: float | None = None
    pattern: str | None = None
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    true_sequential: bool = True

    def __post_init__(self) -> None:
        fill_sparsity(self, type(self).__name__)  # None: 1 − N/M with a pattern, else 0.5
        super().__post_init__()

    def validate(self) -> None:
        """Check sparsity, pattern (and that the two agree) and the name patterns."""
        name = type(self).__name__
        check_sparsity(self.sparsity, f"{name}.sparsity")
        if self.pattern is not None and not isinstance(self.pattern, str):
            self.fail("pattern", f"must be None (unstructured) or a string such as '2:4' or '4:8', "
                                 f"got {self.pattern!r}")
        check_pattern_sparsity(self, parse_pattern(self.pattern, f"{name}.pattern"))
        if not isinstance(self.true_sequential, bool):
            self.fail("true_sequential", f"must be true or false, got {self.true_sequential!r}")
        self.check_name_patterns()


@dataclass
class PruneRun:
    """What a block-wise pruning run has selected and done so far (shared by Wanda and SparseGPT)."""

    label: str
    blocks_name: str
    chosen: set[str]
    outside: list[str]
    nm: tuple[int, int] | None
    sparsity: float
    layers: int = 0
    params: int = 0
    zeros: int = 0
    fallback: int = 0
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self, name: str, weight: torch.Tensor) -> None:
        """Count the zeros of a layer just pruned (``weight`` is what it now holds)."""
        zeros = weight.numel() - int(torch.count_nonzero(weight))
        self.layers += 1
        self.params += weight.numel()
        self.zeros += zeros
        self.layer_sparsity[name] = zeros / weight.numel()


def plan_pruning(model: nn.Module, config: Any, ctx: Context, label: str) -> PruneRun:
    """Select the layers, and check all of them (N:M shape, NaN/inf) before any weight changes.

    Linear-like layers (``core.linear_like``: nn.Linear, FalconLinear, transformers' Conv1D,
    pruned in its own (in, out) layout) are pruned; any other Linear subclass, or a masked
    layer, is skipped with a note naming the reason.
    """
    if getattr(ctx, "data", None) is None:
        raise DataError(f"{label} needs calibration data (data=CalibrationData...); it measures each layer's inputs")
    from torch.nn.utils import parametrize

    blocks_name, _ = find_blocks(model)
    prefix = blocks_name + "."
    nm = parse_pattern(config.pattern, f"{label}.pattern")
    chosen: set[str] = set()
    outside: list[str] = []
    selected = select_modules(model, (LinearLike,), config.include, config.ignore)
    for name, module in selected:
        if not name.startswith(prefix):
            outside.append(name)
        elif parametrize.is_parametrized(module, "weight"):
            ctx.note(f"{label}: skipped {name}: its weight is parametrized (a mask?); strip it first to prune it")
        elif (problem := linear_problem(module, "a pruned weight")) is not None:
            ctx.note(f"{label}: skipped {name}: {problem}")
        else:
            if nm is not None:
                check_nm_shape(name, in_features(module), nm[1])
            chosen.add(name)
    for name, module in selected:
        if name in chosen:
            check_finite(name, module)  # meta (streamed) weights are checked once their block is loaded
    return PruneRun(label, blocks_name, chosen, outside, nm, float(config.sparsity))


def block_groups(b: BlockInputs, chosen: set[str]) -> list[list[str]]:
    """The block's chosen Linear layers (block-relative names) grouped by shared input, in execution order."""
    groups = []
    for g in linear_groups(b.block, b.calls):
        names = [r for r in g.names if f"{b.name}.{r}" in chosen]
        if names:
            groups.append(names)
    for names in groups:
        for r in names:
            check_finite(f"{b.name}.{r}", b.block.get_submodule(r))
    return groups


@torch.no_grad()
def write_pruned(run: PruneRun, name: str, linear: nn.Module, weight: torch.Tensor) -> None:
    """Write the pruned (out, in) ``weight`` into the Linear-like ``linear`` in place (its own layout); count it."""
    set_linear_weight(linear, weight)
    run.record(name, linear.weight.detach())


def fallback_to_magnitude(run: PruneRun, name: str, linear: nn.Module, why: str, per_row: bool) -> None:
    """Prune ``linear`` by magnitude (it got no usable calibration inputs) and say so in the notes."""
    granularity = "N:M" if run.nm else ("per row" if per_row else "per layer")
    run.notes.append(f"{run.label}: {name} {why}; magnitude ({granularity}) used")
    w = linear_weight(linear).detach()  # (out, in): rows and N:M groups run along the inputs
    keep = magnitude_keep_mask(w, run.sparsity, run.nm, per_row)
    write_pruned(run, name, linear, w.masked_fill(~keep, 0.0))
    run.fallback += 1


def finish_notes(run: PruneRun, ctx: Context, seconds: float, settings: str) -> None:
    """The run's notes: fallbacks, scope (what stays dense), and a summary with measured sparsity and time."""
    for line in run.notes:
        ctx.note(line)
    scope = (f"{run.label}: only Linear layers inside {run.blocks_name}.* are pruned, as in the paper and "
             "llm-compressor; lm_head and embeddings stay dense")
    if run.outside:
        shown = ", ".join(run.outside[:5]) + (" ..." if len(run.outside) > 5 else "")
        scope += f" (selected but outside the blocks: {shown})"
    ctx.note(scope)
    per_m = seconds / (run.params / 1e6) if run.params else 0.0
    if run.layer_sparsity:
        values = run.layer_sparsity.values()
        measured = (f"measured sparsity {100 * run.zeros / run.params:.2f}% "
                    f"(per layer {100 * min(values):.2f}% to {100 * max(values):.2f}%)")
    else:
        measured = "no layer pruned"
    pattern = f"{run.nm[0]}:{run.nm[1]}" if run.nm else f"{100 * run.sparsity:g}% unstructured"
    ctx.note(f"{run.label}: pruned {run.layers} Linear layer(s) ({pattern}, {settings}), {run.fallback} by "
             f"magnitude fallback; {measured}; in {seconds:.1f} s ({per_m:.2f} s per million parameters)")


