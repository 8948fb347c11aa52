"""Pruning's part in saving and loading checkpoints, registered with core so core needs no pruning import.

- save: masked layers (``masks.WeightMask``) are written with their masks baked into plain
  weight names, the live model staying masked;
- ``slimkit.json``: a model that went through ``StructuredPrune`` records the attributes its
  forward reads (head counts, ...) under ``structure``;
- load: a masked skeleton is stripped (the file holds baked weights), and a structurally
  pruned checkpoint resizes the rebuilt layers to the file's shapes before the strict load.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.core.plugins import CheckpointHook, register_checkpoint_hook
from slimkit.core.masks import masked_modules, masked_state_dict, strip
from slimkit.core.structure import structure_of
from slimkit.pruning.resize import resize_to_checkpoint


def _state_dict(model: nn.Module) -> dict | None:
    return masked_state_dict(model) if masked_modules(model) else None


def _meta(model: nn.Module, steps: list[dict]) -> dict[str, Any]:
    if not any(step.get("type") == "StructuredPrune" for step in steps):
        return {}
    return {"structure": structure_of(model)}


def _prepare(model: nn.Module) -> None:
    if masked_modules(model):
        strip(model)


def _before_load(model: nn.Module, shapes: dict, meta: dict) -> None:
    if meta.get("structure") is not None:
        resize_to_checkpoint(model, shapes, meta["structure"])


register_checkpoint_hook(CheckpointHook("pruning", state_dict=_state_dict, meta=_meta, prepare=_prepare,
                                        before_load=_before_load))
