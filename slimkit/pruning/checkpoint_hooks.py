"""Pruning's part in saving and loading checkpoints, registered with core so core needs no pruning import.

- save: masked layers (``masks.WeightMask``) are written with their masks baked into plain
  weight names, the live model staying masked;
- ``slimkit.json``: a model that went through ``StructuredPrune`` records the attributes its
  forward reads (head counts, ...) under ``structure``;
- load: a masked skeleton is stripped (the file holds baked weights), and a structurally
  pruned checkpoint resizes the rebuilt layers to the file's shapes before the strict load.

``structure`` is untrusted input that ends in ``setattr`` on rebuilt modules, so it is read
only from a checkpoint whose steps include ``StructuredPrune``, and only as existing integer
size attributes from ``core.structure.STRUCTURE_FIELDS`` with positive values.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.core.errors import ModelLoadError
from slimkit.core.masks import masked_modules, masked_state_dict, strip
from slimkit.core.plugins import CheckpointHook, register_checkpoint_hook
from slimkit.core.structure import structure_of, structure_problem
from slimkit.pruning.resize import resize_to_checkpoint


def _state_dict(model: nn.Module) -> dict | None:
    return masked_state_dict(model) if masked_modules(model) else None


_STRUCTURED_STEP = "StructuredPrune"


def _is_structured(steps: Any) -> bool:
    return isinstance(steps, list) and any(isinstance(s, dict) and s.get("type") == _STRUCTURED_STEP for s in steps)


def _meta(model: nn.Module, steps: list[dict]) -> dict[str, Any]:
    if not _is_structured(steps):
        return {}
    return {"structure": structure_of(model)}


def _prepare(model: nn.Module) -> None:
    if masked_modules(model):
        strip(model)


def check_structure(model: nn.Module, meta: dict) -> None:
    """Refuse (ModelLoadError) a ``structure`` record the loader must not apply to ``model``.

    Refused: a record in a checkpoint with no ``StructuredPrune`` step, a module name the
    model lacks, an attribute outside ``STRUCTURE_FIELDS``, a value that is not a positive
    int, or an attribute the module does not already hold as an int (so a record can only
    change a size, never add or retype an attribute).
    """
    structure = meta.get("structure")
    if not _is_structured(meta.get("steps")):
        raise ModelLoadError(f"slimkit.json records 'structure' but none of its steps is {_STRUCTURED_STEP}; "
                             "slimkit sets recorded attributes only on a structurally pruned checkpoint")
    if not isinstance(structure, dict):
        raise ModelLoadError(f"slimkit.json 'structure' must map module names to attributes, got {structure!r}")
    for name, attrs in structure.items():
        problem = structure_problem(name, attrs)
        if problem is not None:
            raise ModelLoadError(f"slimkit.json 'structure': {problem}")
        try:
            target = model.get_submodule(name) if name else model
        except AttributeError:
            raise ModelLoadError(f"slimkit.json 'structure' names module {name!r}, which the rebuilt model "
                                 "lacks") from None
        for attr in attrs:
            current = getattr(target, attr, None)
            if not isinstance(current, int) or isinstance(current, bool):
                raise ModelLoadError(f"slimkit.json 'structure' sets {attr!r} on {name!r} "
                                     f"({type(target).__name__}), which has no such integer attribute")


def _before_load(model: nn.Module, shapes: dict, meta: dict) -> None:
    if meta.get("structure") is not None:
        check_structure(model, meta)
        resize_to_checkpoint(model, shapes, meta["structure"])


register_checkpoint_hook(CheckpointHook("pruning", state_dict=_state_dict, meta=_meta, prepare=_prepare,
                                        before_load=_before_load))
