"""Attributes a model's forward reads that a structural edit changed (head counts after head pruning).

Shapes alone do not say how many heads an attention module has once some were removed, so
structural edits record such attributes on the model (JSON-able values, kept in
``model.__dict__["_slimkit_structure"]``: module name -> {attribute: value}); checkpoints
save them and reloading sets them again. Code that renumbers layers (a student made by
dropping layers) renumbers the records with ``renumber_structure``.

Only the integer size fields in ``STRUCTURE_FIELDS`` may be recorded: a checkpoint's
``structure`` is set on rebuilt modules with ``setattr``, so an open list would let a
crafted ``slimkit.json`` change any attribute (``variance_epsilon``, a flag, a method).
``structure_problem`` says what is wrong with one record; recording refuses such a record
here, and the loader (``pruning.checkpoint_hooks``) refuses a checkpoint holding one.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from slimkit.core.errors import UnsupportedError

STRUCTURE_ATTR = "_slimkit_structure"

# The attributes structured pruning changes (``pruning/transformer_groups.py``: the head-size,
# query-head, key/value-head, query-width and MLP-width families it rewrites), all positive
# integer sizes. Keep in step with those tuples; a test checks they are all listed here.
STRUCTURE_FIELDS = frozenset({
    "head_dim", "attention_head_size", "head_size", "dim_per_head",
    "num_heads", "num_attention_heads", "n_heads",
    "num_key_value_heads", "num_kv_heads",
    "all_head_size", "inner_dim",
    "intermediate_size", "ffn_dim",
})


def structure_problem(module_name: Any, attrs: Any) -> str | None:
    """What is wrong with recording ``attrs`` for module ``module_name``, or None when the record is allowed.

    Allowed: a string module name and a mapping from names in ``STRUCTURE_FIELDS`` to
    positive ints (not bools).
    """
    if not isinstance(module_name, str):
        return f"a module name must be a string, got {module_name!r}"
    if not isinstance(attrs, Mapping):
        return f"the attributes recorded for {module_name!r} must be a mapping of name to integer, got {attrs!r}"
    for attr, value in attrs.items():
        if attr not in STRUCTURE_FIELDS:
            return (f"attribute {attr!r} of {module_name!r} is not a structural size slimkit records; allowed: "
                    f"{', '.join(sorted(STRUCTURE_FIELDS))}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"attribute {attr!r} of {module_name!r} must be a positive integer, got {value!r}"
    return None


def record_attributes(model: nn.Module, module_name: str, attrs: Mapping[str, Any]) -> None:
    """Record that submodule ``module_name`` ("" = the model) must get ``attrs`` set when rebuilt.

    Values must be JSON-able (they go into ``slimkit.json``) and each attribute one of
    ``STRUCTURE_FIELDS`` with a positive int value (UnsupportedError otherwise); a later
    record of the same attribute overwrites the earlier one.
    """
    try:
        plain = json.loads(json.dumps(dict(attrs)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedError(f"attributes recorded for {module_name!r} must be JSON-able ({exc})") from None
    problem = structure_problem(module_name, plain)
    if problem is not None:
        raise UnsupportedError(f"cannot record structure: {problem}")
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
