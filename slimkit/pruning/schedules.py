"""Sparsity schedules: prune while training (Zhu & Gupta's gradual schedule) or in rounds.

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune") raises the sparsity from
s_i to s_f over n pruning steps Δt apart, starting at t₀:

    s_t = s_f + (s_i − s_f) · (1 − (t − t₀) / (n·Δt))³        t = t₀, t₀ + Δt, ..., t₀ + n·Δt

fast at first, while many redundant weights remain, slower near the end. Iterative
pruning instead prunes in k equal rounds, each followed by fine-tuning (Han et al. 2015;
lottery-ticket style with ``geometric=True``: the same fraction of the survivors each round).

``GradualPruner`` is a callback for the user's own training loop, like
``torch.ao.pruning``'s sparsifier + scheduler or Torch-Pruning's ``pruner.step()``::

    pruner = sk.GradualPruner(model, sk.Gradual(final_sparsity=0.8, begin_step=0, end_step=1000, frequency=100))
    for step, batch in enumerate(loader):
        pruner.step(step)           # re-prunes at the scheduled sparsity when it changes
        loss = ...; loss.backward(); opt.step()
    pruner.finish()                 # bake the masks in (strip)

Masks are attached as parametrizations (``masks.WeightMask``), so between pruning steps the
optimizer trains only the kept weights, and they only grow: a weight pruned once stays pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.io import attach_info, model_info
from slimkit.core.registry import Context
from slimkit.core import masks
from slimkit.pruning.magnitude import Magnitude, apply_magnitude, prunable_targets

# --- pure functions ------------------------------------------------------------------------


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def polynomial_sparsity(step: int, initial: float, final: float, begin_step: int, end_step: int,
                        frequency: int, power: float = 3) -> float:
    """Zhu & Gupta's sparsity at training ``step``: ``initial`` before ``begin_step``, ``final`` from ``end_step`` on.

    In between, s = final + (initial − final)·(1 − (t − begin)/(end − begin))^power with t
    = ``step`` rounded down to ``begin_step`` + a multiple of ``frequency`` (the value only
    changes on pruning steps; ``end_step`` is always one, even when not on the grid).
    """
    _check_int(begin_step, "begin_step", 0)
    _check_int(frequency, "frequency", 1)
    if isinstance(end_step, bool) or not isinstance(end_step, int) or end_step <= begin_step:
        raise ConfigError(f"end_step must be an integer > begin_step ({begin_step}), got {end_step!r}")
    if not 0.0 <= initial <= final < 1.0:
        raise ConfigError(f"sparsities must satisfy 0 <= initial <= final < 1, got initial {initial!r}, final {final!r}")
    if not (isinstance(power, (int, float)) and power > 0):
        raise ConfigError(f"power must be a positive number, got {power!r}")
    if step < begin_step:
        return float(initial)
    if step >= end_step:
        return float(final)
    t = begin_step + (step - begin_step) // frequency * frequency
    progress = (t - begin_step) / (end_step - begin_step)
    return float(final + (initial - final) * (1.0 - progress) ** power)


def iterative_sparsity(round_index: int, rounds: int, final: float, geometric: bool = False) -> float:
    """Sparsity after round ``round_index`` of ``rounds`` (0 = before the first, clamped to [0, rounds]).

    Linear: ``final · r/rounds`` (equal steps, Torch-Pruning's default). Geometric: ``1 − (1 −
    final)^(r/rounds)``, the same fraction of the surviving weights every round (lottery ticket).
    """
    _check_int(rounds, "rounds", 1)
    if not 0.0 <= final < 1.0:
        raise ConfigError(f"final sparsity must be in [0, 1), got {final!r}")
    r = min(max(int(round_index), 0), rounds)
    if geometric:
        return float(1.0 - (1.0 - final) ** (r / rounds))
    return float(final * r / rounds)


# --- configs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScheduleConfig(Config):
    """What Gradual and Iterative share: the Magnitude settings of every pruning step."""

    family: ClassVar[str] = "prune"
    leaves_zeros: ClassVar[bool] = True  # unstructured: pruned weights stay in place as zeros

    scope: str = "layer"
    criterion: str = "l1"
    seed: int = 0
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def magnitude(self, sparsity: float) -> Magnitude:
        """The one-shot Magnitude config that one pruning step applies at ``sparsity``."""
        return Magnitude(sparsity=sparsity, scope=self.scope, criterion=self.criterion, seed=self.seed,
                         keep_masks=True, include=self.include, ignore=self.ignore)

    def _check_magnitude_fields(self, sparsity: float) -> None:
        try:
            self.magnitude(sparsity)
        except ConfigError as exc:  # name this config, not the Magnitude built from it
            text = str(exc)
            raise ConfigError(type(self).__name__ + text[len("Magnitude"):] if text.startswith("Magnitude.")
                              else f"{type(self).__name__}: {text}") from None

    def sparsity_at(self, step: int) -> float:  # pragma: no cover - overridden
        """The scheduled sparsity at ``step``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Gradual(_ScheduleConfig):
    """Gradual magnitude pruning during training (Zhu & Gupta's cubic schedule), for ``GradualPruner``.

    initial_sparsity → final_sparsity (0 <= initial <= final < 1) between begin_step and
    end_step (begin < end), re-pruning every ``frequency`` (>= 1) steps; power 3 is the
    paper's. No pruning happens before begin_step. scope ("layer", "global", "row"),
    criterion ("l1", "l2", "random"), seed, include and ignore are Magnitude's.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    power: float = 3.0
    def validate(self) -> None:
        """Check the schedule (begin < end, frequency >= 1, 0 <= initial <= final < 1) and the Magnitude fields."""
        for name in ("initial_sparsity", "final_sparsity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                self.fail(name, f"must be a number in [0, 1), got {v!r}")
        if self.initial_sparsity > self.final_sparsity:
            self.fail("initial_sparsity", f"must not exceed final_sparsity ({self.final_sparsity}): masks only grow")
        for name, minimum in (("begin_step", 0), ("frequency", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                self.fail(name, f"must be an integer >= {minimum}, got {v!r}")
        e = self.end_step
        if isinstance(e, bool) or not isinstance(e, int) or e <= self.begin_step:
            self.fail("end_step", f"must be an integer > begin_step ({self.begin_step}), got {e!r}")
        p = self.power
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (p > 0 and math.isfinite(p)):
            self.fail("power", f"must be a positive number (3 in Zhu & Gupta), got {p!r}")
        self._check_magnitude_fields(self.final_sparsity)

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at training ``step`` (0 before begin_step: nothing is pruned yet)."""
        if step < self.begin_step:
            return 0.0
        return polynomial_sparsity(step, self.initial_sparsity, self.final_sparsity, self.begin_step,
                                   self.end_step, self.frequency, self.power)


@dataclass(frozen=True)
class Iterative(_ScheduleConfig):
    """Iterative magnitude pruning in ``rounds`` one-shot steps, each followed by the user's fine-tuning.

    Call ``GradualPruner.step(r)`` for r = 1..rounds: round r prunes to
    ``final_sparsity · r/rounds`` (``geometric``: ``1 − (1 − final)^(r/rounds)``). scope,
    criterion, seed, include and ignore are Magnitude's.
    """

    final_sparsity: float = 0.8
    rounds: int = 4
    geometric: bool = False
    def validate(self) -> None:
        """Check final_sparsity in [0, 1), rounds >= 1, the flag and the Magnitude fields."""
        v = self.final_sparsity
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            self.fail("final_sparsity", f"must be a number in [0, 1), got {v!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            self.fail("rounds", f"must be an integer >= 1, got {self.rounds!r}")
        if not isinstance(self.geometric, bool):
            self.fail("geometric", f"must be true or false, got {self.geometric!r}")
        self._check_magnitude_fields(self.final_sparsity)

    def sparsity_at(self, step: int) -> float:
        """The sparsity after round ``step`` (0 = unpruned, ``rounds`` = final)."""
        return iterative_sparsity(step, self.rounds, self.final_sparsity, self.geometric)


# --- the training-loop callback ------------------------------------------------------------


class GradualPruner:
    """Prune ``model`` on a schedule from inside the user's training loop (see the module docstring).

    ``step(t)`` prunes to ``config.sparsity_at(t)`` when that exceeds what is already pruned
    (for ``Iterative``, t is the round number); ``sparsity`` is the measured fraction of
    zeros in the selected weights; ``finish()`` bakes the masks in.
    """

    def __init__(self, model: nn.Module, config: Gradual | Iterative) -> None:
        if not isinstance(config, _ScheduleConfig):
            raise ConfigError(f"GradualPruner takes a Gradual or Iterative schedule, got {type(config).__name__}; "
                              "for one-shot pruning use slimkit.prune_(model, slimkit.Magnitude(...))")
        self.model = model
        self.config = config
        # Select and check the layers now, so a typo or a NaN weight fails before training starts.
        self._targets = prunable_targets(model, config.magnitude(config.final_sparsity))
        self.target = 0.0  # the scheduled sparsity applied last
        self.notes: list[str] = []

    def step(self, step: int) -> bool:
        """Prune to the sparsity scheduled at ``step`` if it grew; returns whether masks changed."""
        sparsity = self.config.sparsity_at(step)
        if sparsity <= self.target:
            return False
        ctx = Context()
        apply_magnitude(self.model, self.config.magnitude(sparsity), ctx)
        self.notes = ctx.notes
        self.target = sparsity
        return True

    @property
    def sparsity(self) -> float:
        """Measured fraction of zeros over the selected layers' (masked) weights."""
        zeros = total = 0
        with torch.no_grad():
            for t in self._targets:
                w = t.weight
                zeros += w.numel() - int(torch.count_nonzero(w))
                total += w.numel()
        return zeros / total if total else 0.0

    @property
    def done(self) -> bool:
        """Whether the final sparsity of the schedule has been applied."""
        final = self.config.final_sparsity
        return math.isclose(self.target, final, abs_tol=1e-12) or self.target > final

    def finish(self, strip: bool = True) -> nn.Module:
        """Record the schedule among the model's steps and (``strip``) bake the masks in; returns the model.

        It does not prune further: call ``step`` with the final step first if the loop ended
        early (``done`` says whether it did).
        """
        if strip:
            masks.strip(self.model)
        info = model_info(self.model)
        attach_info(self.model, steps=[*info.get("steps", []), self.config.to_dict()])
        return self.model
