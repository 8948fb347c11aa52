"""What a step changed: the weights it was asked to cover and how many of them it actually changed.

A technique that silently compresses nothing (an unknown layer type, a pattern that
selects the wrong layers) is the worst kind of success: a saved artifact at 1.00x with
exit 0. ``snapshot`` fingerprints every weight matrix before a step; ``coverage`` compares
after it. A weight counts as changed when its module was replaced (a quantized or
factorized layer), its shape changed (structured pruning) or its values changed (pruning,
a smoothing fold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.targets import matches


@dataclass(frozen=True)
class WeightPrint:
    """A cheap fingerprint of one weight: its module object, shape and float64 sums of x and x²."""

    module_id: int
    module_type: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    total: float
    squares: float
    aliases: tuple[str, ...] = ()  # every name of a tied tensor


def _weights(model: nn.Module) -> dict[str, tuple[nn.Module, torch.Tensor, tuple[str, ...]]]:
    """Every weight matrix (>= 2-D float tensor) by its first ``module.name``, with every name it has.

    A parametrized tensor (a pruning mask) counts as its effective value under its plain name;
    a tied tensor appears once, with all its names (an lm_head tied to the embedding).
    """
    from torch.nn.utils import parametrize

    found: dict[int, list] = {}
    for mname, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{mname}.":
            continue
        tensors = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            tensors = [(n, getattr(module, n)) for n in module.parametrizations.keys()]
        for pname, p in tensors:
            if p.dim() < 2 or not p.is_floating_point() or p.device.type == "meta":
                continue
            full = f"{mname}.{pname}" if mname else pname
            key = id(p) if isinstance(p, nn.Parameter) else id(module) * 1000 + hash(pname) % 1000
            if key in found:
                found[key][2].append(full)
            else:
                found[key] = [module, p, [full]]
    return {names[0]: (module, p, tuple(names)) for module, p, names in found.values()}


@torch.no_grad()
def snapshot(model: nn.Module) -> dict[str, WeightPrint]:
    """Fingerprints of every weight matrix of ``model`` (a few float64 reductions each, no copies)."""
    prints = {}
    for name, (module, p, aliases) in _weights(model).items():
        x = p.detach().double()
        prints[name] = WeightPrint(id(module), type(module).__name__, tuple(p.shape), p.dtype, float(x.sum()),
                                   float((x * x).sum()), aliases)
    return prints


@dataclass
class Coverage:
    """How many weight elements a step was asked to cover and how many it changed, and the untouched ones by type."""

    asked: int = 0
    changed: int = 0
    untouched: dict[str, int] = field(default_factory=dict)  # module type -> elements left unchanged

    @property
    def fraction(self) -> float:
        """Changed / asked (1.0 when nothing was asked)."""
        return self.changed / self.asked if self.asked else 1.0

    def describe_untouched(self, limit: int = 4) -> str:
        """"Conv2d (11,200,000 weights), LSTM (...)": the largest untouched module types."""
        top = sorted(self.untouched.items(), key=lambda kv: -kv[1])[:limit]
        return ", ".join(f"{t} ({n:,} weights)" for t, n in top) or "none"


def _asked(print_: WeightPrint, config: Any) -> bool:
    """Whether ``config`` asked to cover this weight under any of its names (include/ignore; an
    embedding only with ``embeddings=True``, unless another of its names, a tied head, is included)."""
    include = tuple(getattr(config, "include", ()) or ())
    ignore = tuple(getattr(config, "ignore", ()) or ())
    for i, name in enumerate(print_.aliases):
        layer = name.rpartition(".")[0]
        if include and not any(matches(layer, p) for p in include):
            continue
        if any(matches(layer, p) for p in ignore):
            continue
        if i == 0 and "Embedding" in print_.module_type and not getattr(config, "embeddings", False):
            continue
        return True
    return False


def coverage(before: dict[str, WeightPrint], model: nn.Module, config: Any) -> Coverage:
    """Compare ``model`` now with its ``snapshot`` taken before applying ``config``."""
    after = {name: module for name, (module, _, _) in _weights(model).items()}
    now = snapshot(model)
    result = Coverage()
    for name, old in before.items():
        if not _asked(old, config):
            continue
        n = 1
        for d in old.shape:
            n *= d
        result.asked += n
        new = now.get(name)
        module = after.get(name)
        changed = (new is None or module is None or id(module) != old.module_id or new.shape != old.shape
                   or new.dtype != old.dtype or new.total != old.total or new.squares != old.squares)
        if changed:
            result.changed += n
        else:
            result.untouched[old.module_type] = result.untouched.get(old.module_type, 0) + n
    return result
