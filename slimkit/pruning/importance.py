"""Importance of the units of a structured-pruning group: which filters, neurons or heads to keep.

Every criterion scores each *member* of a group (a weight slice coupled to the group's
units) per unit, then the group score is the mean over the members that have a score,
as Torch-Pruning's ``group_reduction="mean"`` does:

- ``l1`` (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): Σ|w| over the unit's
  slice of each member (a filter's kernel, the BN's |gamma|, the next layer's input columns);
- ``l2``: Σw² over the same slices (Torch-Pruning's ``p=2``: the squared norm, not its root);
- ``taylor`` (Molchanov et al. 2019): Σ|w · ∂L/∂w|, first-order estimate of the loss change
  when the unit is removed; needs ``.grad`` on every member's weight;
- ``bn_scale`` (Liu et al. 2017, "Network Slimming"): |gamma| of the group's BatchNorm members;
- ``random``: a seeded uniform draw, the baseline every criterion should beat.

Higher means more important. Members without a weight (an affine-free norm) are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimkit.core.errors import ConfigError, UnsupportedError, closest
from slimkit.pruning.group import Group, Member, unit_weights

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def reduce_mean(scores: list[torch.Tensor], group: Group) -> torch.Tensor:
    """The mean of the members' per-unit scores (float64); UnsupportedError if no member has one."""
    if not scores:
        raise UnsupportedError(f"group {group.root!r} has no weighted member to score")
    return torch.stack([s.double() for s in scores]).mean(0)


class Importance:
    """Scores the units of a group: ``importance(group) -> Tensor[units]`` (higher = keep).

    Subclasses define ``member_score(member) -> Tensor[units] | None`` (None: the member
    does not take part); ``__call__`` reduces them with the mean. ``needs_gradients`` tells
    the caller to fill ``.grad`` first.
    """

    name = ""
    needs_gradients = False

    def member_score(self, member: Member) -> torch.Tensor | None:
        """One member's per-unit score, or None to leave the member out of the mean."""
        raise NotImplementedError

    def __call__(self, group: Group) -> torch.Tensor:
        scores = [s for s in (self.member_score(m) for m in group.members) if s is not None]
        return reduce_mean(scores, group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MagnitudeImportance(Importance):
    """Σ|w|^p of each unit's slice per member (p = 1: L1, p = 2: squared L2), mean over members."""

    def __init__(self, p: int = 1) -> None:
        if p not in (1, 2):
            raise ConfigError(f"MagnitudeImportance.p must be 1 or 2, got {p!r}")
        self.p = p
        self.name = "l1" if p == 1 else "l2"

    def member_score(self, member: Member) -> torch.Tensor | None:
        w = unit_weights(member)
        if w.shape[1] == 0:
            return None
        w = w.double().abs()  # float64: a sum of many small terms keeps its order exactly
        return (w if self.p == 1 else w * w).sum(1)

    def __repr__(self) -> str:
        return f"MagnitudeImportance(p={self.p})"


class TaylorImportance(Importance):
    """Σ|w · grad| of each unit's slice per member, mean over members (gradients must be in ``.grad``)."""

    name = "taylor"
    needs_gradients = True

    def member_score(self, member: Member) -> torch.Tensor | None:
        weight = getattr(member.module, "weight", None)
        if weight is None:
            return None
        if weight.grad is None:
            raise UnsupportedError(f"taylor importance needs gradients, but {member.name}.weight has no .grad: "
                                   "run a backward pass on your loss first, or use importance 'l1'")
        w, g = unit_weights(member), unit_weights(member, weight.grad)
        if w.shape[1] == 0:
            return None
        return (w.double() * g.double()).abs().sum(1)


class BNScaleImportance(Importance):
    """|gamma| of the group's BatchNorm members (Network Slimming), mean over them."""

    name = "bn_scale"

    def member_score(self, member: Member) -> torch.Tensor | None:
        if not isinstance(member.module, _BN) or member.module.weight is None:
            return None
        return unit_weights(member).double().abs().sum(1)

    def __call__(self, group: Group) -> torch.Tensor:
        scores = [s for s in (self.member_score(m) for m in group.members) if s is not None]
        if not scores:
            raise UnsupportedError(f"bn_scale importance needs a BatchNorm (with affine weights) in every group, "
                                   f"but group {group.root!r} has none; use importance 'l1', or ignore "
                                   f"{group.root!r}")
        return reduce_mean(scores, group)


class RandomImportance(Importance):
    """Uniform random scores from a seeded generator (a baseline; the same seed gives the same draw)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Group) -> torch.Tensor:
        return torch.rand(group.units, generator=self.generator)


# name -> factory(seed): the registry StructuredPrune's ``importance`` names are checked against.
_IMPORTANCE_FACTORIES: dict[str, Callable[[int], Importance]] = {}


def register_importance(name: str, factory: Callable[[int], Importance]) -> None:
    """Make ``factory(seed)`` the importance criterion called ``name`` (usable in StructuredPrune)."""
    _IMPORTANCE_FACTORIES[name] = factory


register_importance("l1", lambda seed: MagnitudeImportance(p=1))
register_importance("l2", lambda seed: MagnitudeImportance(p=2))
register_importance("taylor", lambda seed: TaylorImportance())
register_importance("bn_scale", lambda seed: BNScaleImportance())
register_importance("random", RandomImportance)
IMPORTANCES = tuple(_IMPORTANCE_FACTORIES)  # the built-in names, in a stable order for messages


def importance_names() -> tuple[str, ...]:
    """Every registered importance name (the built-in ones and any registered since)."""
    return tuple(_IMPORTANCE_FACTORIES)


def make_importance(name: str, seed: int = 0) -> Importance:
    """The importance criterion registered as ``name``; ConfigError naming the known ones otherwise."""
    factory = _IMPORTANCE_FACTORIES.get(name)
    if factory is None:
        known = importance_names()
        raise ConfigError(f"unknown importance {name!r}{closest(str(name), known)}; choose one of {', '.join(known)}")
    return factory(seed)
