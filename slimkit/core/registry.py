"""Config type -> handler: the one dispatch table behind every verb.

Handlers register with ``@register(ConfigType)``. The built-in techniques are imported
explicitly in ``_BUILTIN_MODULES`` the first time a lookup happens (no package walking,
and ``import slimkit`` stays cheap).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError

Handler = Callable[[Any, Config, "Context"], None]

_HANDLERS: dict[type[Config], Handler] = {}
_TYPES: dict[str, type[Config]] = {}
_loaded = False

# Every module that registers a built-in technique; add a new technique's module here.
_BUILTIN_MODULES = (
    "slimkit.quantization.weight_only",
    "slimkit.quantization.ptq",
    "slimkit.quantization.mixed",
    "slimkit.quantization.qat",
    "slimkit.quantization.smoothquant",
    "slimkit.quantization.llm_int8",
    "slimkit.quantization.gptq",
    "slimkit.quantization.awq",
    "slimkit.pruning.structured",
    "slimkit.pruning.magnitude",
    "slimkit.pruning.wanda",
    "slimkit.pruning.sparsegpt",
    "slimkit.distillation.distill",
    "slimkit.factorization.svd",
    "slimkit.factorization.conv",
)


@dataclass
class Context:
    """What a handler gets besides the model and its config.

    ``data`` is the CalibrationData (or None), ``notes`` collects lines for the report
    (skipped layers and why), ``progress`` is a callable ``(description, fraction)``,
    ``stream`` is set by ``streaming.compress_checkpoint`` (see ``blockwise.run_blockwise``).
    ``teacher`` is the model a distillation step learns from (in a recipe: the model as it was
    before the first step); ``model`` is set by the recipe runner to the model it ended with,
    which differs from the one passed in when a step builds a new (student) model.
    ``allow_partial`` lets a step change less than a tenth of the weights it targets (see ``api.apply``).
    """

    data: Any = None
    notes: list[str] = field(default_factory=list)
    progress: Callable[[str, float], None] | None = None
    stream: Any = None  # a streaming.BlockStream when blocks are read from disk one at a time
    teacher: Any = None
    model: Any = None
    allow_partial: bool = False  # accept a step that changes < 10% of the weights it was asked to cover
    data_description: str = ""  # what the calibration data was, for the report

    def note(self, line: str) -> None:
        """Record a line that the run's report will show."""
        self.notes.append(line)


def register(config_type: type[Config]) -> Callable[[Handler], Handler]:
    """Decorator: make ``fn(model, config, ctx)`` the handler of ``config_type``."""

    def deco(fn: Handler) -> Handler:
        if config_type in _HANDLERS:
            raise RuntimeError(f"{config_type.__name__} already has a handler")
        _HANDLERS[config_type] = fn
        _TYPES[config_type.__name__] = config_type
        return fn

    return deco


def _ensure_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(name)


def config_types() -> dict[str, type[Config]]:
    """The allow-list: config type name -> class, for every registered technique."""
    _ensure_builtins()
    return dict(_TYPES)


def handler_for(config: Config) -> Handler:
    """The handler registered for ``config``'s type; ConfigError if none is."""
    _ensure_builtins()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(f"no handler is registered for {type(config).__name__}") from None
