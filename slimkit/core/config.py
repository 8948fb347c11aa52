"""The Config base: one frozen, validated dataclass per algorithm.

A config is data, never code: ``to_dict`` gives ``{"type": ..., "version": ..., **fields}``
and ``Config.from_dict`` rebuilds only types on the registry's allow-list, so a recipe
file can never name an arbitrary import path. Unknown keys are errors that name the
closest valid key; a silently ignored typo would compress with the wrong settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from slimkit.core.errors import ConfigError, closest


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every algorithm config.

    Subclasses are frozen dataclasses that set ``family`` (the verb that applies them:
    "quantize", "prune", "factorize", ...), ``needs_data`` when they calibrate, and
    override ``validate`` to check their fields.
    List-valued fields are stored as tuples so configs stay hashable and immutable.
    """

    family: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_data: ClassVar[bool] = False  # True when the handler needs CalibrationData (GPTQ, Wanda, ...)
    leaves_zeros: ClassVar[bool] = False  # True when the technique leaves pruned weights in place as zeros
    qat_base: ClassVar[bool] = False  # True when QAT can train for this config's result (RTN, StaticQuant)
    # True when the step turns float weights into integer codes (QuantLinear & co.): a later step that
    # edits float weights (pruning, factorization) cannot follow it.
    packs_weights: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range; subclasses override."""

    def fail(self, field: str, message: str) -> None:
        """Raise a ConfigError that names this config type and the offending field."""
        raise ConfigError(f"{type(self).__name__}.{field}: {message}")

    def check_name_patterns(self, fields: tuple[str, ...] = ("include", "ignore")) -> None:
        """Check that each of ``fields`` is a tuple of valid module name patterns (plain, glob or ``re:``)."""
        from slimkit.core.targets import check_patterns

        for name in fields:
            value = getattr(self, name)
            if not isinstance(value, tuple):
                # A bare string would otherwise be iterated character by character.
                self.fail(name, f"must be a list of module name patterns, e.g. [{value!r}], got {type(value).__name__}")
            check_patterns(value, f"{type(self).__name__}.{name}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data: ``type``, ``version`` and every field (tuples as lists)."""
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of this config's fields, the keys a recipe step may use besides ``type``."""
        return [f.name for f in dataclasses.fields(cls)]

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Config:
        """Rebuild a config from ``to_dict`` output or a recipe step, looking its type up in the registry.

        Raises ConfigError for a missing or unknown type, an unknown key (naming the closest
        valid key), a newer version than this slimkit knows, or an invalid value.
        """
        from slimkit.core.registry import config_types

        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping with a 'type' key, got {type(data).__name__}")
        if "type" not in data:
            raise ConfigError(f"config {data!r} has no 'type'; known types: {', '.join(sorted(config_types()))}")
        name = data["type"]
        types = config_types()
        if name not in types:
            raise ConfigError(f"unknown config type {name!r}{closest(str(name), types)}; known types: {', '.join(sorted(types))}")
        cls = types[name]
        version = data.get("version", cls.version)
        if not isinstance(version, int) or version > cls.version or version < 1:
            raise ConfigError(f"{name}: version {version!r} is not supported (this slimkit reads version <= {cls.version})")
        fields = cls.field_names()
        kwargs = {}
        for key, value in data.items():
            if key in ("type", "version"):
                continue
            if key not in fields:
                raise ConfigError(f"{name}: unknown key {key!r}{closest(key, fields)}; valid keys: {', '.join(fields)}")
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # e.g. a required field missing
            raise ConfigError(f"{name}: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Config):  # a nested config (e.g. QAT's base) as its own type-tagged dict
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
