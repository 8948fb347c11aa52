"""Unstructured magnitude pruning: zero the smallest weights, per layer or across layers.

Scores (``magnitude_scores``): ``l1`` = |w|, ``l2`` = w², ``random`` = seeded uniform
noise (the baseline any criterion must beat). For unstructured pruning l1 and l2 order the
weights the same way; they are both offered so N:M and global scopes, and the structured
pruners, use the same names.

Selection, for each Linear / Conv1d / Conv2d weight (flattened row-major), a transformers
``Conv1D`` (GPT-2; weight stored (in, out)) read as its (out, in) transpose so that rows are
output rows for every layer (``core.linear_like``):

- ``scope="layer"``: exactly ``round(sparsity · numel)`` lowest scores of each layer are
  pruned, chosen by ``torch.topk(scores, k, largest=False)`` on the flattened scores, the
  very call ``torch.nn.utils.prune.l1_unstructured`` makes, so masks (ties included) are
  identical to torch's;
- ``scope="global"``: one ranking over all selected layers (concatenated in model order,
  as ``prune.global_unstructured`` does), exactly ``round(sparsity · total)`` pruned;
- ``scope="row"``: ``round(sparsity · cols)`` per output row (the weight seen as
  (out, in·k·k)), the layout Wanda uses, so the two compare like for like;
- ``pattern="N:M"``: the N highest scores of every M consecutive weights of a row (the
  weight flattened to (out, in·k·k) for a conv) are kept; sparsity is then 1 − N/M;
- ``threshold=α``: prune |w| < α · max|w| of the layer (of all selected layers with
  ``scope="global"``); the resulting sparsity is whatever the weights give. ``sparsity``
  and ``threshold`` are alternatives: give one.

Layers that already carry a mask (``masks.apply_mask``) keep it: their pruned weights are
ranked first, so ``sparsity`` is the layer's total target and masks only grow. This is
what ``GradualPruner`` relies on (torch's ``prune`` instead reads ``amount`` as a fraction
of the still-unpruned weights).

With ``keep_masks`` the masks are attached as parametrizations (``masks.WeightMask``), so
fine-tuning cannot revive pruned weights; ``slimkit.strip`` bakes them in. Without it, the
weights are zeroed in place and nothing stops training from changing them again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import DataError, closest
from slimkit.core.linear_like import linear_kind
from slimkit.core.registry import Context, register
from slimkit.core.targets import select_modules
from slimkit.core.masks import PRUNABLE, apply_mask, get_mask, raw_weight
from slimkit.pruning.nm import (
    check_nm_shape,
    check_pattern_sparsity,
    check_sparsity,
    fill_sparsity,
    nm_keep_mask,
    parse_pattern,
    row_keep_mask,
)

CRITERIA = ("l1", "l2", "random")
SCOPES = ("layer", "global", "row")


# --- pure functions ------------------------------------------------------------------------


def magnitude_scores(weight: torch.Tensor, criterion: str = "l1", generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance of each weight (higher = kept): |w| ("l1"), w² ("l2") or seeded uniform noise ("random").

    "l1" stays in the weight's dtype (what ``torch.nn.utils.prune`` ranks); "l2" squares in at
    least float32 so small half-precision weights do not underflow into ties. "random" draws
    from ``generator`` on the CPU (the same numbers on every device).
    """
    weight = weight.detach()
    if criterion == "l1":
        return weight.abs()
    if criterion == "l2":
        w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        return w * w
    if criterion == "random":
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _prune_count(sparsity: float, numel: int) -> int:
    # Python's round(), as torch.nn.utils.prune uses (ties to even): the same k as torch.
    return round(sparsity * numel)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool keep-mask of ``scores``' shape pruning exactly ``round(sparsity · numel)`` lowest scores.

    Uses ``torch.topk(flat, k, largest=False)`` like ``prune.l1_unstructured``, so the mask is
    bit-for-bit torch's for the same scores (ties included).
    """
    check_sparsity(sparsity, "layer_mask")
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    k = _prune_count(sparsity, scores.numel())
    if k:
        lowest = torch.topk(scores.reshape(-1), k=k, largest=False).indices
        keep.view(-1)[lowest] = False
    return keep


def global_masks(scores_by_layer: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer from one ranking across all of them: exactly ``round(sparsity · total)`` pruned.

    The scores are concatenated in the dict's order and ranked with one ``torch.topk``, as
    ``prune.global_unstructured`` does, so the masks equal torch's for the same order.
    """
    check_sparsity(sparsity, "global_masks")
    if not scores_by_layer:
        return {}
    device = next(iter(scores_by_layer.values())).device
    flat = torch.cat([s.reshape(-1).to(device) for s in scores_by_layer.values()])
    keep = layer_mask(flat, sparsity)
    out, start = {}, 0
    for name, s in scores_by_layer.items():
        out[name] = keep[start:start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def threshold_mask(weight: torch.Tensor, alpha: float, max_abs: float | None = None) -> torch.Tensor:
    """Bool keep-mask pruning |w| < ``alpha`` · max|w| (``max_abs`` replaces the layer's own max|w|, e.g. a global one)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    a = weight.detach().abs()
    reference = float(a.max()) if max_abs is None else float(max_abs)
    return a >= alpha * reference


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask for a weight of any rank: groups of ``m`` consecutive entries of each row of (out, -1)."""
    return nm_keep_mask(scores.reshape(scores.shape[0], -1), n, m).view(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning ``round(sparsity · cols)`` lowest scores of each row of (out, -1)."""
    return row_keep_mask(scores.reshape(scores.shape[0], -1), sparsity).view(scores.shape)


# --- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Magnitude(Config):
    """Magnitude pruning of Linear / Conv1d / Conv2d weights (see the module docstring).

    sparsity: fraction of each layer's weights to prune (of all selected weights with
    ``scope="global"``), in [0, 1); default 0.5, or 1 − N/M with a pattern. threshold: α in
    (0, 1), prune |w| < α · max|w| instead of a fixed fraction (give sparsity or threshold,
    not both; needs criterion "l1" and no pattern). scope: "layer", "global" or "row".
    criterion: "l1", "l2" or "random" (seeded by ``seed``). pattern: None or "N:M" such as
    "2:4" (scope "layer"). keep_masks: attach masks so pruned weights stay zero during
    fine-tuning (else they are only zeroed). include / ignore: module name patterns, e.g.
    ``ignore=["lm_head"]``.
    """

    family: ClassVar[str] = "prune"
    leaves_zeros: ClassVar[bool] = True  # unstructured: pruned weights stay in place as zeros

    sparsity: float | None = None
    threshold: float | None = None
    scope: str = "layer"
    criterion: str = "l1"
    pattern: str | None = None
    seed: int = 0
    keep_masks: bool = True
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The default sparsity depends on the pattern (2:4 prunes exactly half) and does not
        # apply with a threshold; filling it here keeps to_dict/from_dict round trips exact.
        if self.threshold is None:
            fill_sparsity(self, "Magnitude")
        super().__post_init__()

    @property
    def nm(self) -> tuple[int, int] | None:
        """The pattern as ``(N, M)``, or None for unstructured pruning."""
        return parse_pattern(self.pattern, "Magnitude.pattern")

    def validate(self) -> None:
        """Check the sparsity/threshold choice, scope, criterion, pattern, seed, flags and name patterns."""
        if self.scope not in SCOPES:
            self.fail("scope", f"must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}"
                               f"{closest(str(self.scope), SCOPES)}")
        if self.criterion not in CRITERIA:
            self.fail("criterion", f"must be one of {', '.join(map(repr, CRITERIA))}, got {self.criterion!r}"
                                   f"{closest(str(self.criterion), CRITERIA)}")
        if self.pattern is not None and not isinstance(self.pattern, str):
            self.fail("pattern", f"must be null (unstructured) or an 'N:M' string such as '2:4', got {self.pattern!r}")
        nm = self.nm
        if self.threshold is not None:
            if self.sparsity is not None:
                self.fail("threshold", "give either sparsity (a fixed fraction) or threshold (prune |w| < α·max|w|), "
                                       "not both")
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
                self.fail("threshold", f"must be α in (0, 1): prune |w| < α·max|w|, got {t!r}")
            if nm is not None:
                self.fail("threshold", "an N:M pattern fixes the sparsity at 1 − N/M; use threshold without a pattern")
            if self.scope == "row":
                self.fail("threshold", "a threshold compares against the layer's (scope 'layer') or the model's "
                                       "(scope 'global') max|w|; scope 'row' takes a sparsity")
            if self.criterion != "l1":
                self.fail("criterion", "a threshold compares |w| with α·max|w|: use criterion 'l1'")
        else:
            check_sparsity(self.sparsity, "Magnitude.sparsity")
        if nm is not None:
            if self.scope != "layer":
                self.fail("scope", f"an N:M pattern ({self.pattern}) is chosen within each group of M weights: "
                                   "use scope 'layer'")
            check_pattern_sparsity(self, nm)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            self.fail("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.keep_masks, bool):
            self.fail("keep_masks", f"must be true or false, got {self.keep_masks!r}")
        self.check_name_patterns()


# --- plumbing ------------------------------------------------------------------------------


def _rows_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``module.weight``) with output rows first: a Conv1D's (in, out) tensors are transposed.

    Its own inverse, so it also turns a rows-first mask back into the module's layout.
    """
    return t.t() if linear_kind(module) == "conv1d" else t


@dataclass
class _Target:
    """One weight to prune and every selected module that holds it (tied weights are pruned once)."""

    names: list[str]
    modules: list[nn.Module]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (masked when a mask is attached), detached, output rows first."""
        return _rows_first(self.modules[0], self.modules[0].weight.detach())

    def mask(self) -> torch.Tensor | None:
        """The attached keep-mask, output rows first (None without one)."""
        old = get_mask(self.modules[0])
        return None if old is None else _rows_first(self.modules[0], old)

    def to_layout(self, keep: torch.Tensor) -> torch.Tensor:
        """A rows-first mask in the module's own weight layout (contiguous: it becomes a mask buffer)."""
        return _rows_first(self.modules[0], keep).contiguous()


def prunable_targets(model: nn.Module, config: Magnitude, notes: list[str] | None = None) -> list[_Target]:
    """The selected layers' weights, checked (finite, N:M-compatible) before anything changes.

    Meta-device layers are skipped with a line in ``notes``. A weight shared by several
    selected modules is one target. Raises DataError (NaN/inf) or UnsupportedError (N:M on
    indivisible columns) naming the layer.
    """
    notes = notes if notes is not None else []
    by_weight: dict[int, _Target] = {}
    for name, module in select_modules(model, PRUNABLE, config.include, config.ignore):
        weight = raw_weight(module)
        if weight.is_meta:
            notes.append(f"Magnitude: skipped {name}: its weight is on the meta device (not loaded)")
            continue
        if id(weight) in by_weight:
            by_weight[id(weight)].names.append(name)
            by_weight[id(weight)].modules.append(module)
            continue
        by_weight[id(weight)] = _Target([name], [module])
    targets = list(by_weight.values())
    nm = config.nm
    for t in targets:
        if not bool(torch.isfinite(t.weight).all()):
            raise DataError(f"layer {t.name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{t.name!r}])")
        if nm is not None:
            check_nm_shape(t.name, t.weight[0].numel(), nm[1])
    return targets


def compute_masks(targets: list[_Target], config: Magnitude) -> dict[str, torch.Tensor]:
    """Keep-masks (name of each target -> bool tensor shaped like its ``weight``) under ``config``.

    Combined with existing masks: an existing mask's pruned weights score -inf, so they are
    pruned first and stay pruned. Scores are ranked with output rows first (what ``row`` and
    N:M scopes need), then returned in each module's own layout.
    """
    generator = torch.Generator().manual_seed(config.seed)
    scores: dict[str, torch.Tensor] = {}
    old: dict[str, torch.Tensor | None] = {}
    for t in targets:
        old[t.name] = t.mask()
        if config.threshold is None:
            s = magnitude_scores(t.weight, config.criterion, generator)
            if old[t.name] is not None:
                s = s.masked_fill(~old[t.name], float("-inf"))
            scores[t.name] = s
    if config.threshold is not None:
        reference = max(float(t.weight.abs().max()) for t in targets) if config.scope == "global" and targets else None
        keep = {t.name: threshold_mask(t.weight, config.threshold, reference) for t in targets}
    elif config.scope == "global":
        keep = global_masks(scores, config.sparsity)
    elif config.nm is not None:
        keep = {name: nm_mask(s, *config.nm) for name, s in scores.items()}
    elif config.scope == "row":
        keep = {name: row_mask(s, config.sparsity) for name, s in scores.items()}
    else:
        keep = {name: layer_mask(s, config.sparsity) for name, s in scores.items()}
    by_name = {t.name: t for t in targets}
    return {name: by_name[name].to_layout(k if old[name] is None else k & old[name]) for name, k in keep.items()}


def magnitude_masks(model: nn.Module, config: Magnitude) -> dict[str, torch.Tensor]:
    """The keep-masks ``Magnitude`` would apply to ``model`` (layer name -> bool tensor), without applying them."""
    return compute_masks(prunable_targets(model, config), config)


def _shared_notes(model: nn.Module, targets: list[_Target]) -> list[str]:
    """Notes for pruned weights that unselected modules also use (e.g. an lm_head tied to the embedding)."""
    owners: dict[int, list[str]] = defaultdict(list)
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)].append(mname)
        if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
            owners[id(m.parametrizations["weight"].original)].append(mname)
    notes = []
    for t in targets:
        prefixes = tuple(t.names)
        others = sorted({o for o in owners[id(raw_weight(t.modules[0]))]
                         if o not in prefixes and not o.startswith(tuple(n + ".parametrizations" for n in prefixes))})
        if others:
            notes.append(f"Magnitude: {t.name}'s weight is shared with {', '.join(others)}; the pruned entries are "
                         "zeroed there too (but only the masked layer keeps them zero while training)")
    return notes


@register(Magnitude)
def apply_magnitude(model: nn.Module, config: Magnitude, ctx: Context) -> None:
    """Prune the selected layers of ``model`` in place by magnitude; notes the achieved overall sparsity.

    All layers are checked first, so a NaN weight or an N:M-incompatible layer raises with
    the model untouched.
    """
    notes: list[str] = []
    targets = prunable_targets(model, config, notes)
    masks = compute_masks(targets, config)
    notes += _shared_notes(model, targets)
    zeros = total = 0
    with torch.no_grad():
        for i, t in enumerate(targets):
            keep = masks[t.name]
            for module in t.modules:
                if config.keep_masks or get_mask(module) is not None:
                    apply_mask(module, keep)
                else:
                    raw_weight(module).mul_(keep)
            w = t.weight
            zeros += w.numel() - int(torch.count_nonzero(w))
            total += w.numel()
            if ctx.progress is not None:
                ctx.progress(f"Magnitude: {t.name}", (i + 1) / len(targets))
    for line in notes:
        ctx.note(line)
    how = (f"threshold {config.threshold:g}·max|w|" if config.threshold is not None
           else f"{config.pattern}" if config.pattern else f"{config.scope} {config.sparsity:g}")
    masks_text = "masks kept for fine-tuning" if config.keep_masks else "weights zeroed, no masks"
    overall = zeros / total if total else 0.0
    ctx.note(f"Magnitude: pruned {len(targets)} layer(s) ({config.criterion}, {how}): "
             f"{overall:.2%} of their weights are zero ({zeros}/{total}); {masks_text}")
