"""Choose which modules a technique touches: include and ignore by name, glob or regex.

A pattern is one of
- ``"re:<regex>"``: the regex must match the whole module name (``re.fullmatch``);
- a glob with ``*``, ``?`` or ``[``: matched against the whole name (``fnmatch``);
- a plain name: equal to the module name or to its trailing dotted part
  (``"lm_head"`` matches ``"lm_head"`` and ``"model.lm_head"``, not ``"my_lm_head"``).
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from slimkit.core.errors import ConfigError


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches one include/ignore ``pattern``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def check_patterns(patterns: Iterable[str], owner: str) -> None:
    """Raise ConfigError if a ``re:`` pattern does not compile (``owner`` names the config field)."""
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{owner}: patterns must be non-empty strings, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"{owner}: bad regex {p!r}: {exc}") from None


def select_modules(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    include: Sequence[str] = (),
    ignore: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` of one of ``types``, kept by ``include``, dropped by ``ignore``.

    An empty ``include`` keeps every module of the right type. An include pattern that
    matches no module of those types is a ConfigError (a typo would otherwise silently
    compress nothing); an ignore pattern that matches nothing is allowed.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    if include:
        unmatched = [p for p in include if not any(matches(n, p) for n, _ in candidates)]
        if unmatched:
            kinds = "/".join(t.__name__ for t in types)
            sample = ", ".join(n for n, _ in candidates[:5])
            raise ConfigError(f"include pattern(s) {unmatched} match no {kinds} module; names look like: {sample}")
        candidates = [(n, m) for n, m in candidates if any(matches(n, p) for p in include)]
    return [(n, m) for n, m in candidates if not any(matches(n, p) for p in ignore)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_layer_map(mapping: object, owner: str, check_value) -> None:
    """Validate a per-layer map ``{pattern: value, ..., "default": value}`` (e.g. bits per layer).

    ``check_value(value)`` returns an error string or None. The map needs a ``"default"``
    entry so every layer gets a value; patterns follow ``matches``.
    """
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{owner}: a per-layer map must be a non-empty mapping of pattern -> value")
    if "default" not in mapping:
        raise ConfigError(f"{owner}: the per-layer map {mapping!r} needs a 'default' entry for the layers no pattern matches")
    check_patterns([k for k in mapping if k != "default"], owner)
    for key, value in mapping.items():
        problem = check_value(value)
        if problem:
            raise ConfigError(f"{owner}[{key!r}]: {problem}")


def value_for(name: str, setting):
    """The value a per-layer setting gives module ``name``: the setting itself, or from a map.

    In a map, the first pattern (in order) that matches ``name`` wins, else ``"default"``.
    """
    if not isinstance(setting, dict):
        return setting
    for pattern, value in setting.items():
        if pattern != "default" and matches(name, pattern):
            return value
    return setting["default"]


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path at which each module is reachable, by ``id`` (a shared module is replaced at all of them)."""
    paths: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(name)
    return paths


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """For each Parameter (by ``id``), the paths of every module holding it directly: a tied weight has several."""
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)].append(name)
    return owners


def tie_notes(model: nn.Module, targets: Sequence[tuple[str, nn.Module]], label: str,
              kept: Iterable[str] = ()) -> list[str]:
    """Notes for replaced layers whose weight another module also holds (an lm_head tied to the embedding).

    ``targets``: the (name, module) pairs being replaced; ``kept``: names whose tie the
    caller preserves (no note). One note per tie, saying whether the other copy stays
    float or is replaced too (each copy on its own, so the tie is broken).
    """
    paths, owners = module_paths(model), weight_owners(model)
    selected = {n for n, _ in targets}
    kept = set(kept)
    notes = []
    for name, module in targets:
        weight = getattr(module, "weight", None)
        if name in kept or not isinstance(weight, torch.Tensor):
            continue
        others = [o for o in owners.get(id(weight), []) if o not in paths[id(module)]]
        if others and all(o not in selected or name < o for o in others):  # one note per tie
            both = any(o in selected for o in others)
            fate = "each copy is replaced separately" if both else "the other copy stays float"
            notes.append(f"{label}: {name}'s weight is shared with {', '.join(others)}; {fate}, so the tie is broken")
    return notes


def subclass_reason(module: nn.Module, replacement: str) -> str:
    """Why ``module`` (a subclass of a layer type) is skipped: ``replacement`` cannot stand in for it.

    A layer holding a pruning mask (a torch parametrization) says how to make it quantizable.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return ("its weight holds a pruning mask (a parametrization): call slimkit.strip(model) first "
                "to bake the mask in, then quantize")
    return f"it is a {type(module).__name__}, a subclass {replacement} cannot stand in for"
