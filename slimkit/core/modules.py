"""Replacement modules that a saved checkpoint can rebuild.

A compressed layer (an int8 QuantLinear, later a factorized or sparse layer) subclasses
``SlimkitModule``: it describes its own construction in ``slimkit_spec()`` (JSON data:
shapes, bits, group size) and ``from_slimkit_spec(spec)`` builds an empty module of the
same shapes. ``slimkit.save`` records each such module's spec beside the safetensors
weights; ``slimkit.load`` rebuilds the original architecture, swaps these modules in
from their specs, then loads the weights strictly. No code is ever unpickled.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_MODULE_TYPES: dict[str, type[SlimkitModule]] = {}


class SlimkitModule(nn.Module):
    """Base of slimkit's rebuildable replacement modules (see the module docstring).

    ``attached = True`` marks a module that is *added* as a new child of an existing module
    (its path does not exist in the rebuilt architecture; its parent must). ``after_load``
    runs once per module class after a checkpoint's weights are in (e.g. to switch the
    model to code that calls the added modules).
    """

    attached: bool = False

    @classmethod
    def after_load(cls, model: nn.Module) -> None:
        """Called once with the reloaded model when a checkpoint holds modules of this class."""

    def slimkit_spec(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``from_slimkit_spec`` of them gives an empty module of the same shapes."""
        raise NotImplementedError

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> SlimkitModule:
        """An empty module of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        raise NotImplementedError


def register_module_type(cls: type[SlimkitModule]) -> type[SlimkitModule]:
    """Class decorator: let checkpoints name ``cls`` (by its class name) and rebuild it."""
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def module_type(name: str) -> type[SlimkitModule]:
    """The registered module class called ``name``; KeyError if unknown."""
    from slimkit.core.registry import _ensure_builtins

    _ensure_builtins()
    return _MODULE_TYPES[name]
