"""Pruning masks that stay applied while a model is fine-tuned.

A mask is a ``torch.nn.utils.parametrize`` parametrization, ``WeightMask``: the module's
``weight`` becomes ``original * mask`` on every access. Gradients therefore reach only the
kept weights (the product rule gives pruned entries a zero gradient), and an optimizer
step cannot bring a pruned weight back: whatever the optimizer writes into ``original``,
the forward pass sees zero there. ``apply_mask`` also zeroes the pruned entries of
``original``, so weight decay and momentum (which act on ``original``) keep them at zero.

``strip`` bakes the masks in: each masked ``weight`` becomes a plain Parameter holding the
masked values (the same Parameter object as ``original``, so an optimizer built on the model
keeps working). ``slimkit.save`` writes masked weights under their plain names without
touching the model's masks (see ``masked_state_dict``).

A masked module's class becomes torch's ``Parametrized<Class>`` subclass: ``isinstance``
checks still hold, but code that requires the exact class (e.g. RTN) wants ``strip`` first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.errors import DataError, UnsupportedError
from slimkit.core.linear_like import LinearLike
from slimkit.core.targets import select_modules

# The layer types whose weights pruning masks by default: every nn.Linear and transformers
# Conv1D (``LinearLike``; a mask is element-wise, so a Conv1D is masked in its own (in, out) layout).
PRUNABLE = (LinearLike, nn.Conv1d, nn.Conv2d)


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask`` with a bool buffer ``mask`` (True = kept)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The masked weight: pruned entries are zero, kept entries pass through (and get gradients)."""
        return weight * self.mask

    def extra_repr(self) -> str:
        """``kept=k/n`` in the module's repr."""
        kept = int(self.mask.sum())
        return f"kept={kept}/{self.mask.numel()}"


def _mask_parametrization(module: nn.Module, name: str = "weight") -> WeightMask | None:
    """The WeightMask among ``module``'s parametrizations of ``name``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p
    return None


def raw_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The stored tensor behind ``module.<name>``: the parametrization's ``original`` when masked, else the Parameter."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The bool keep-mask (True = kept) attached to ``module.<name>``, or None when it has none."""
    p = _mask_parametrization(module, name)
    return None if p is None else p.mask


def apply_mask(module: nn.Module, mask: torch.Tensor, combine: bool = True, name: str = "weight") -> nn.Module:
    """Attach the bool keep-``mask`` to ``module.<name>`` so pruned entries stay zero; returns the module.

    With an existing mask, ``combine=True`` keeps the intersection (a weight pruned once
    stays pruned) and ``combine=False`` replaces it. The pruned entries of the stored
    weight are zeroed too, so weight decay and momentum cannot move them.
    """
    weight = raw_weight(module, name)
    if tuple(mask.shape) != tuple(weight.shape):
        raise DataError(f"mask of shape {tuple(mask.shape)} does not match {type(module).__name__}.{name} "
                        f"of shape {tuple(weight.shape)}")
    mask = mask.detach().to(device=weight.device, dtype=torch.bool)
    existing = _mask_parametrization(module, name)
    with torch.no_grad():
        if existing is None:
            parametrize.register_parametrization(module, name, WeightMask(mask))
        elif combine:
            existing.mask &= mask
        else:
            existing.mask.copy_(mask)
        final = _mask_parametrization(module, name).mask
        raw_weight(module, name).mul_(final)  # in place: keeps the Parameter an optimizer may hold
    return module


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` whose ``weight`` carries a WeightMask."""
    return [(n, m) for n, m in model.named_modules() if _mask_parametrization(m) is not None]


def strip(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight and remove the parametrizations; returns ``model``.

    Each masked ``weight`` becomes a plain Parameter (the former ``original`` object, so an
    optimizer holding it stays valid) whose pruned entries are zero.
    """
    for name, module in masked_modules(model):
        others = [type(p).__name__ for p in module.parametrizations["weight"] if not isinstance(p, WeightMask)]
        if others:
            raise UnsupportedError(f"layer {name!r} has other parametrizations on its weight ({', '.join(others)}) "
                                   "besides the pruning mask; remove them first")
        _own_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def _own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a private copy of its ``Parametrized<Class>`` class.

    ``copy.deepcopy`` of a masked model shares that class between original and copy, and
    ``remove_parametrizations`` deletes the ``weight`` property from the class, which would
    break the other model. A private class makes stripping one leave the other intact.
    """
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def masked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each masked weight under its plain name, masked (the model is untouched).

    ``<m>.parametrizations.weight.original`` and the mask buffer are replaced by
    ``<m>.weight`` = original × mask, so the dict loads into the unmasked architecture.
    When the pruned entries of ``original`` are already zero (``apply_mask`` zeroes them)
    ``original`` itself is used, which keeps a tied weight's shared storage (and its tie).
    """
    state = model.state_dict(keep_vars=False)
    for name, module in masked_modules(model):
        if len(module.parametrizations["weight"]) != 1:
            raise UnsupportedError(f"layer {name!r} has other parametrizations on its weight besides the pruning "
                                   "mask; slimkit.save cannot write it under its plain name")
        owner = f"{name}." if name else ""  # "" when the model itself is the masked layer
        prefix = f"{owner}parametrizations.weight."
        original = state[prefix + "original"]
        mask = _mask_parametrization(module).mask
        baked = original if not bool(original[~mask].any()) else original * mask
        # Insert the plain key where the parametrized ones were, so the order stays the model's.
        new_state: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == prefix + "original":
                new_state[f"{owner}weight"] = baked.detach()
            elif not key.startswith(prefix):
                new_state[key] = value
        state = new_state
    return state


def attach_masks_from_zeros(model: nn.Module, include: Sequence[str] = (), ignore: Sequence[str] = ()) -> list[str]:
    """Mask the existing zeros (``weight != 0``) of the selected Linear/Conv layers; returns the masked layer names.

    For fine-tuning after a method that zeroes weights without masks (SparseGPT, Wanda,
    a reloaded pruned checkpoint): the zeros then survive training. Layers with no zero
    are left alone.
    """
    names = []
    for name, module in select_modules(model, PRUNABLE, include, ignore):
        weight = module.weight.detach()
        if weight.is_meta:
            continue
        keep = weight != 0
        if not bool(keep.all()):
            apply_mask(module, keep)
            names.append(name)
    return names


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One layer's row of a sparsity report: weight shape, zero count, element count, zero fraction."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's elements that are exactly zero."""
        return self.zeros / self.total if self.total else 0.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer weight sparsity of a model and the overall figure (zeros / elements over all rows)."""

    layers: tuple[LayerSparsity, ...]

    @property
    def zeros(self) -> int:
        """Zero weights over all rows."""
        return sum(r.zeros for r in self.layers)

    @property
    def total(self) -> int:
        """Weight elements over all rows."""
        return sum(r.total for r in self.layers)

    @property
    def overall(self) -> float:
        """Zeros / elements over all rows (0.0 for a model with no weighted layer)."""
        return self.zeros / self.total if self.total else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        """The row of layer ``name``; KeyError when the report has none."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict:
        """Plain data: every layer row and the overall figures."""
        return {
            "layers": [{"name": r.name, "shape": list(r.shape), "zeros": r.zeros, "total": r.total,
                        "sparsity": r.sparsity} for r in self.layers],
            "zeros": self.zeros, "total": self.total, "overall": self.overall,
        }

    def to_markdown(self) -> str:
        """A Markdown table: one row per layer, then the overall row."""
        lines = ["| layer | shape | zeros | total | sparsity |", "|---|---|---:|---:|---:|"]
        for r in self.layers:
            shape = "×".join(map(str, r.shape))
            lines.append(f"| {r.name} | {shape} | {r.zeros} | {r.total} | {r.sparsity:.2%} |")
        lines.append(f"| **overall** | | {self.zeros} | {self.total} | {self.overall:.2%} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer zeros of every weighted layer (as ``evaluation.measure.layer_sparsity`` selects them) and overall.

    Masked weights are measured as the forward pass sees them (original × mask).
    """
    from slimkit.core.measure import layer_sparsity

    fractions = layer_sparsity(model)
    rows = []
    for name, fraction in fractions.items():
        module = model.get_submodule(name)
        dense = getattr(module, "dense_weight", None)
        with torch.no_grad():
            weight = dense() if callable(dense) else module.weight
        total = weight.numel()
        # layer_sparsity gives zeros / total; round() recovers the exact integer count.
        rows.append(LayerSparsity(name=name, shape=tuple(weight.shape), zeros=round(fraction * total), total=total))
    return SparsityReport(layers=tuple(rows))
