"""What every low-rank technique shares: the rank rules of its config, and the run's record and notes.

A ``LowRankConfig`` (SVD for Linear layers, Tucker and CP for Conv2d) names exactly one
rule for the ranks:

- ``rank``: a fixed rank for every layer (refused above a layer's full rank, and above its
  break-even rank unless ``force``);
- ``rank_ratio``: that fraction of each layer's full rank;
- ``param_ratio``: the rank whose factors keep that fraction of each layer's parameters;
- ``energy``: the smallest rank whose singular values keep that fraction of Σ s²;
- ``budget``: the selected layers together keep that fraction of their parameters, and the
  ranks are allocated by each layer's measured sensitivity (``factorization.allocation``).

With the relative rules, a layer whose rank lands at or above break-even (the factors would
be no smaller than the dense layer) is skipped and reported, never made larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from slimkit.core.config import Config
from slimkit.core.registry import Context

RULES = ("rank", "rank_ratio", "param_ratio", "energy", "budget")
DEFAULT_GRID = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)  # coarse: each point costs a forward pass per layer


@dataclass(frozen=True)
class LowRankConfig(Config):
    """Base of the factorization configs: layer selection and one rank rule (see the module docstring).

    sensitivity_grid: the parameter ratios each layer is tried at when ``budget`` allocates
    the ranks; sensitivity_batches: how many calibration batches measure each try.
    """

    family = "factorize"
    extra_rules: ClassVar[tuple[str, ...]] = ()  # boolean rules a subclass adds (Tucker's vbmf)

    rank: int = 0
    rank_ratio: float = 0.0
    param_ratio: float = 0.0
    energy: float = 0.0
    budget: float = 0.0
    force: bool = False
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    sensitivity_grid: tuple[float, ...] = DEFAULT_GRID
    sensitivity_batches: int = 4

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Calibration data is needed to allocate a budget (and, for SVD, when activation-aware)."""
        return self.budget > 0

    def rule(self) -> str:
        """The name of the one rank rule that is set."""
        return next(r for r in RULES + self.extra_rules if getattr(self, r))

    def validate(self) -> None:
        """Exactly one rank rule, each in range; a valid sensitivity grid and selection patterns."""
        chosen = [r for r in RULES + self.extra_rules if getattr(self, r)]
        if len(chosen) != 1:
            what = f"{', '.join(chosen)} are all set" if chosen else "none is set"
            self.fail("rank", f"set exactly one of {', '.join(RULES + self.extra_rules)} ({what}); e.g. param_ratio: 0.8 keeps "
                              "80% of each layer's parameters")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            self.fail("rank", f"must be a positive integer, got {self.rank!r}")
        for name in ("rank_ratio", "param_ratio", "energy", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
                self.fail(name, f"must be a number in (0, 1], got {value!r}")
        for name in ("param_ratio", "budget"):
            if getattr(self, name) == 1:
                self.fail(name, "1.0 keeps every parameter: no factorization can gain anything; use a value below 1")
        grid = self.sensitivity_grid
        if not grid or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < 1 for g in grid):
            self.fail("sensitivity_grid", f"must be a non-empty list of parameter ratios in (0, 1), got {list(grid)!r}")
        if isinstance(self.sensitivity_batches, bool) or not isinstance(self.sensitivity_batches, int) \
                or self.sensitivity_batches < 1:
            self.fail("sensitivity_batches", f"must be a positive integer, got {self.sensitivity_batches!r}")
        if not isinstance(self.force, bool):
            self.fail("force", f"must be true or false, got {self.force!r}")
        self.check_name_patterns()


@dataclass
class FactorizeRun:
    """What a factorization run did, for its notes: ranks per layer, parameters before and after, skips."""

    label: str
    ranks: dict[str, object] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def record(self, name: str, rank: object, dense_params: int, factor_params: int) -> None:
        """One layer factorized at ``rank``: ``dense_params`` became ``factor_params``."""
        self.ranks[name] = rank
        self.params_before += dense_params
        self.params_after += factor_params

    def skip(self, name: str, reason: str) -> None:
        """One selected layer left dense, and why."""
        self.skipped.append((name, reason))

    def finish(self, ctx: Context, seconds: float, settings: str) -> None:
        """Write the notes: skipped layers, damping, and a summary with the measured parameter change."""
        for name, reason in self.skipped:
            ctx.note(f"{self.label}: skipped {name}: {reason}")
        for line in self.notes:
            ctx.note(line)
        if not self.ranks:
            ctx.note(f"{self.label}: no layer was factorized ({settings})")
            return
        ratio = self.params_after / self.params_before
        shown = ", ".join(f"{n}: {r}" for n, r in list(self.ranks.items())[:4])
        more = f", ... ({len(self.ranks)} layers)" if len(self.ranks) > 4 else ""
        ctx.note(f"{self.label}: factorized {len(self.ranks)} layer(s) ({settings}); their parameters "
                 f"{self.params_before:,} -> {self.params_after:,} ({ratio:.3f}x); ranks {shown}{more}; "
                 f"in {seconds:.1f} s")

