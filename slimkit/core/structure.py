"""Attributes a model's forward reads that a structural edit changed (head counts after head pruning).

Shapes alone do not say how many heads an attention module has once some were removed, so
structural edits record such attributes on the model (JSON-able values, kept in
``model.__dict__["_slimkit_structure"]``: module name -> {attribute: value}); checkpoints
save them and reloading sets them again. Code that renumbers layers (a student made by
dropping layers) renumbers the records with ``renumber_structure``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from slimkit.core.errors import UnsupportedError

STRUCTURE_ATTR = "_slimkit_structure"

def record_attributes(model: nn.Module, module_name: str, attrs: Mapping[str, Any]) -> None:
    """Record that submodule ``module_name`` ("" = the model) must get ``attrs`` set when rebuilt.

    Values must be JSON-able (they go into ``slimkit.json``); a later record of the same
    attribute overwrites the earlier one.
    """
    try:
        plain = json.loads(json.dumps(dict(attrs)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedError(f"attributes recorded for {module_name!r} must be JSON-able ({exc})") from None
    model.__dict__.setdefault(STRUCTURE_ATTR, {}).setdefault(module_name, {}).update(plain)


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """A copy of the attributes recorded on ``model`` by ``record_attributes`` ({} when none)."""
    return copy.deepcopy(model.__dict__.get(STRUCTURE_ATTR, {}))


def renumber_structure(model: nn.Module, list_name: str, keep: Sequence[int]) -> None:
    """Rename the records of layers ``keep`` of the layer list ``list_name`` to their new index; drop the rest."""
    records = model.__dict__.get(STRUCTURE_ATTR)
    if not records:
        return
    prefix = f"{list_name}." if list_name else ""
    new_index = {str(old): str(new) for new, old in enumerate(keep)}
    renamed: dict[str, Any] = {}
    for name, attrs in records.items():
        if not name.startswith(prefix):
            renamed[name] = attrs
            continue
        index, _, rest = name[len(prefix):].partition(".")
        if index in new_index:
            renamed[prefix + new_index[index] + ("." + rest if rest else "")] = attrs
    model.__dict__[STRUCTURE_ATTR] = renamed
