import pytest
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.targets import check_patterns, matches, select_modules, set_submodule


def _model():
    return nn.ModuleDict({
        "layers": nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(4, 4), "mlp": nn.Linear(4, 4)}) for _ in range(2)]),
        "lm_head": nn.Linear(4, 8),
        "norm": nn.LayerNorm(4),
    })


def test_pattern_kinds():
    assert matches("model.lm_head", "lm_head")
    assert matches("lm_head", "lm_head")
    assert not matches("my_lm_head", "lm_head")
    assert matches("layers.0.q_proj", "layers.*.q_proj")
    assert not matches("layers.0.q_proj", "q_*")  # globs match the whole name
    assert matches("layers.1.mlp", "re:layers\\.[0-9]+\\.mlp")
    assert not matches("layers.1.mlp.x", "re:layers\\.[0-9]+\\.mlp")  # regex must match the whole name


def test_select_include_ignore():
    names = [n for n, _ in select_modules(_model(), (nn.Linear,))]
    assert names == ["layers.0.q_proj", "layers.0.mlp", "layers.1.q_proj", "layers.1.mlp", "lm_head"]
    names = [n for n, _ in select_modules(_model(), (nn.Linear,), include=["re:.*mlp"], ignore=["layers.1.*"])]
    assert names == ["layers.0.mlp"]
    names = [n for n, _ in select_modules(_model(), (nn.Linear,), ignore=["lm_head", "nothing_here"])]
    assert "lm_head" not in names and len(names) == 4


def test_include_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="match no Linear"):
        select_modules(_model(), (nn.Linear,), include=["norm"])


def test_bad_regex_is_reported():
    with pytest.raises(ConfigError, match="bad regex"):
        check_patterns(["re:("], "RTN.ignore")


def test_set_submodule():
    m = _model()
    new = nn.Identity()
    set_submodule(m, "layers.1.mlp", new)
    assert m["layers"][1]["mlp"] is new
