"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

A few input channels of an LLM's Linear layers carry values far larger than the rest, so a
per-tensor or per-token int8 grid sized for them rounds every other channel to almost
nothing. Per input channel j, SmoothQuant divides the activation by

    s_j = max|X_j|^alpha / max|W_:,j|^(1 − alpha)

and multiplies the weight's input column j by the same s_j: X·diag(s)⁻¹ · (W·diag(s))ᵀ = X·Wᵀ.
alpha = 0.5 splits the difficulty evenly between activations and weights; larger alpha
pushes more of it into the weights. The division is folded into the op that produces the
input (``blockwise.fold_input_scale``): the attention norm for q/k/v, the MLP norm for
gate/up, up_proj's output rows for down_proj, v_proj's for o_proj (heads one to one only),
fc1 for OPT's fc2 (ReLU commutes with a positive scale). The model stays float and
computes the same function; a W8A8 step follows, e.g.
``[SmoothQuant(alpha=0.5), DynamicQuant(per_token=True)]`` or ``StaticQuant(...)``.

``StaticQuant(smooth_alpha=...)`` is the other form of the same idea: an explicit input
multiply kept in each QuantLinear, for models (post-norm encoders) whose norm output also
feeds the residual so that nothing can be folded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.blockwise import (
    feed_inputs,
    fold_input_scale,
    linear_groups,
    run_blockwise,
)
from slimkit.core.calibration import BlockInputs
from slimkit.core.config import Config
from slimkit.core.errors import DataError
from slimkit.core.linear_like import linear_problem, linear_weight
from slimkit.core.registry import Context, register
from slimkit.core.targets import matches


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor | Sequence[torch.Tensor],
                  alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale s_j = max|X_j|^alpha / max|W_:,j|^(1 − alpha), float32.

    ``act_absmax``: (in,) max |x_j| over the calibration tokens. ``weight_absmax``: (in,)
    max |W_ij| over the output rows of every layer that reads this input, or a sequence /
    (n_layers, in) stack of per-layer maxima, reduced here by a max (q, k and v share one
    input, hence one s). A channel that is zero (or non-finite) in the activations or in
    all the weights gets s = 1: there is nothing to migrate, and a 0 or inf would poison the fold.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not isinstance(weight_absmax, torch.Tensor):
        weight_absmax = torch.stack([w.detach() for w in weight_absmax])
    w = weight_absmax.detach().double()
    if w.dim() == 2:
        w = w.amax(dim=0)
    a = act_absmax.detach().double()
    if a.shape != w.shape:
        raise ValueError(f"activation maxima {tuple(a.shape)} and weight maxima {tuple(w.shape)} differ in length")
    # float64: a^alpha / w^(1-alpha) of float32 extremes must not overflow before the check below.
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s)).float()


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x_j| per channel (last dim) of a (tokens, features) batch, as float32."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()


@dataclass(frozen=True)
class SmoothQuant(Config):
    """SmoothQuant: fold per-channel scales that move activation outliers into the weights (no layer changes).

    alpha: migration strength in (0, 1]; 0.5 in the paper (0.75–0.85 for models with
    stronger outliers). include / ignore: Linear layer names (full paths; plain, glob or
    ``re:``); a group of layers sharing one input is smoothed only when all its members
    are selected. Needs calibration data (per-channel input maxima). Follow it with a W8A8
    step such as ``DynamicQuant(per_token=True)`` or ``StaticQuant()``.
    """

    family: ClassVar[str] = "quantize"
    needs_data: ClassVar[bool] = True

    alpha: float = 0.5
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check alpha and the name patterns."""
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1:
            self.fail("alpha", f"must be a number in (0, 1] (0.5 is the paper's default), got {a!r}")
        self.check_name_patterns()


def _selected(full_name: str, config: SmoothQuant) -> bool:
    if config.include and not any(matches(full_name, p) for p in config.include):
        return False
    return not any(matches(full_name, p) for p in config.ignore)


@register(SmoothQuant)
def apply_smoothquant(model: nn.Module, config: SmoothQuant, ctx: Context) -> None:
    """Fold SmoothQuant scales into every decoder block of ``model``, in place, block by block.

    For each block: group its Linear layers by shared input, record every group's
    per-channel input maxima on the calibration data (inputs from the already smoothed
    blocks before it), compute s from them and the group's current weights, and fold it
    (checked on the block's output; refused folds are left undone and noted).
    """
    if ctx.data is None:
        raise DataError("SmoothQuant needs calibration data (data=CalibrationData...) to measure activation maxima")
    counts = {"smoothed": 0, "layers": 0}
    notes: list[str] = []

    def process(b: BlockInputs) -> None:
        groups = linear_groups(b.block, b.calls)
        todo = []
        for group in groups:
            full = [f"{b.name}.{n}" for n in group.names]
            chosen = [_selected(n, config) for n in full]
            if not any(chosen):
                continue
            if not all(chosen):
                left = [n for n, c in zip(full, chosen) if not c]
                notes.append(f"SmoothQuant: {', '.join(full)} not smoothed: they share one input and "
                             f"{', '.join(left)} is not selected")
                continue
            problems = [f"{n}: {p}" for n, r in zip(full, group.names)
                        if (p := linear_problem(b.block.get_submodule(r), "a smoothed layer"))]
            if problems:
                notes.append(f"SmoothQuant: {', '.join(full)} not smoothed: {'; '.join(problems)}")
                continue
            if group.producer is None:
                notes.append(f"SmoothQuant: {', '.join(full)} not smoothed: no op inside the block with a "
                             "per-channel weight produces their input (it comes from the previous block, or "
                             "from attention whose value heads are shared), so there is nothing to fold 1/s into")
                continue
            todo.append(group)
        if not todo:
            return
        absmax: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor) -> None:
            m = channel_absmax(x)
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

        # One pass for all groups: a fold changes only its own group's weight columns and its
        # producer, so every other group's inputs (up to the scale it gets itself) stay the same.
        seen = feed_inputs(b.block, b.calls, [g.names[0] for g in todo], record)
        for group in todo:
            full = ", ".join(f"{b.name}.{n}" for n in group.names)
            if not seen[group.names[0]]:
                notes.append(f"SmoothQuant: {full} not smoothed: it received no calibration tokens")
                continue
            act = absmax[group.names[0]]
            if not bool(torch.isfinite(act).all()):
                raise DataError(f"the input of {full} has NaN or inf on the calibration data; fix the model or "
                                f"ignore those layers")
            # max |W_ij| over output rows, per input column j, of the (out, in) weights (Conv1D's read transposed).
            weights = [linear_weight(b.block.get_submodule(n)).detach().abs().amax(dim=0).float()
                       for n in group.names]
            s = smooth_scales(act, weights, config.alpha)
            if fold_input_scale(b.block, group, s, b.calls[0]):
                counts["smoothed"] += 1
                counts["layers"] += len(group.names)
            else:
                notes.append(f"SmoothQuant: {full} not smoothed: folding 1/s into {b.name}.{group.producer} "
                             "would change the block's output (a norm that does not scale linearly, an "
                             "activation between the layers, or shared attention heads)")

    blocks = run_blockwise(model, ctx.data, process, ctx, "SmoothQuant")
    for line in notes:
        ctx.note(line)
    ctx.note(f"SmoothQuant: alpha {config.alpha}: smoothed {counts['smoothed']} input group(s) "
             f"({counts['layers']} Linear layers) in {blocks} block(s); the model stays float — follow with a "
             "W8A8 step (DynamicQuant(per_token=True) or StaticQuant)")
