"""Extension points that let upper layers plug into core without core importing them.

Core (io, checkpoints) must not import the zoo or a technique family, yet loading a zoo
name or a pruned checkpoint needs them. Upper layers register what they provide here:

- *model sources*: something that turns a name into a model (the zoo);
- *checkpoint hooks*: code that adjusts what ``io.save`` writes and what ``io.load``
  rebuilds (pruning bakes its masks in and resizes structurally pruned layers).

The package's ``__init__`` registers one installer that imports the built-in providers
the first time core asks for them, so ``import slimkit`` itself stays lean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_installers: list[Callable[[], None]] = []
_installed = False


def on_first_use(installer: Callable[[], None]) -> None:
    """Run ``installer`` (which registers providers) before the first lookup of any provider."""
    _installers.append(installer)


def ensure_installed() -> None:
    """Run every pending installer once (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for installer in list(_installers):
        installer()


@dataclass(frozen=True)
class ModelSource:
    """A provider of named models (the zoo): ``names()`` lists them, ``load(name)`` builds one.

    ``build_architecture(arch, config)`` rebuilds an untrained nn.Module of a named
    architecture from a checkpoint's architecture config (None when it has none).
    ``describe()`` is a short phrase for error messages ("zoo models: a, b").
    """

    names: Callable[[], list[str]]
    load: Callable[[str], Any]
    build_architecture: Callable[[str, dict], Any] | None = None
    label: str = "named models"


_sources: list[ModelSource] = []


def register_model_source(source: ModelSource) -> None:
    """Make the models of ``source`` loadable by name through ``slimkit.core.io.load``."""
    _sources.append(source)


def model_sources() -> list[ModelSource]:
    """Every registered model source."""
    ensure_installed()
    return list(_sources)


@dataclass(frozen=True)
class CheckpointHook:
    """Code that takes part in saving and loading checkpoints.

    - ``state_dict(model)``: the state dict to save instead of ``model.state_dict()``, or None;
    - ``meta(model, steps)``: extra ``slimkit.json`` entries (a dict, may be empty);
    - ``prepare(model)``: adjust a freshly rebuilt architecture before specs are swapped in;
    - ``before_load(model, shapes, meta)``: adjust the rebuilt model to the file's tensor shapes.
    """

    name: str
    state_dict: Callable[[Any], dict | None] | None = None
    meta: Callable[[Any, list], dict] | None = None
    prepare: Callable[[Any], None] | None = None
    before_load: Callable[[Any, dict, dict], None] | None = None


_hooks: dict[str, CheckpointHook] = {}


def register_checkpoint_hook(hook: CheckpointHook) -> None:
    """Register (or replace, by name) a checkpoint hook."""
    _hooks[hook.name] = hook


def checkpoint_hooks() -> list[CheckpointHook]:
    """Every registered checkpoint hook, in registration order."""
    ensure_installed()
    return list(_hooks.values())


_kind_resolvers: list[Callable[[Any], str | None]] = []


def register_kind_resolver(resolver: Callable[[Any], str | None]) -> None:
    """Let an upper layer name the kind of a model that has none recorded (the tasks' ``claims``)."""
    _kind_resolvers.append(resolver)


def resolve_kind(model: Any) -> str | None:
    """The kind the first registered resolver gives ``model``, or None."""
    ensure_installed()
    for resolver in _kind_resolvers:
        kind = resolver(model)
        if kind is not None:
            return kind
    return None
