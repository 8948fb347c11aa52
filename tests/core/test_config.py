import dataclasses

import pytest

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.registry import Context, config_types, handler_for, register


@dataclasses.dataclass(frozen=True)
class _Toy(Config):
    family = "quantize"
    bits: int = 8
    ignore: tuple[str, ...] = ()

    def validate(self):
        if self.bits not in (4, 8):
            self.fail("bits", f"must be 4 or 8, got {self.bits}")


@register(_Toy)
def _apply_toy(model, config, ctx):
    ctx.note(f"toy {config.bits}")


def test_lists_become_tuples_and_config_is_frozen():
    cfg = _Toy(ignore=["lm_head"])
    assert cfg.ignore == ("lm_head",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 4


def test_round_trip_carries_type_and_version():
    cfg = _Toy(bits=4, ignore=("a", "re:b.*"))
    d = cfg.to_dict()
    assert d == {"type": "_Toy", "version": 1, "bits": 4, "ignore": ["a", "re:b.*"]}
    assert Config.from_dict(d) == cfg


def test_validation_names_type_and_field():
    with pytest.raises(ConfigError, match=r"_Toy\.bits: must be 4 or 8, got 3"):
        _Toy(bits=3)


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'bitz'.*did you mean 'bits'"):
        Config.from_dict({"type": "_Toy", "bitz": 4})


def test_unknown_type_and_missing_type_are_errors():
    with pytest.raises(ConfigError, match="did you mean '_Toy'"):
        Config.from_dict({"type": "_Tay"})
    with pytest.raises(ConfigError, match="has no 'type'"):
        Config.from_dict({"bits": 4})
    with pytest.raises(ConfigError, match="version 2 is not supported"):
        Config.from_dict({"type": "_Toy", "version": 2})


def test_registry_dispatches_and_allow_lists():
    assert config_types()["_Toy"] is _Toy
    assert "RTN" in config_types()  # built-ins are registered explicitly on first lookup
    ctx = Context()
    handler_for(_Toy(bits=4))(None, _Toy(bits=4), ctx)
    assert ctx.notes == ["toy 4"]


def test_registering_twice_is_refused():
    with pytest.raises(RuntimeError):
        register(_Toy)(lambda m, c, x: None)
