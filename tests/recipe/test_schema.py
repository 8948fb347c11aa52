from pathlib import Path

import pytest

from slimkit.core.errors import RecipeError
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.schema import Recipe, builtin_recipe_dir, resolve_recipe

GOOD = """
version: 1
model: stdlib-coder
calibration: {corpus: stdlib, samples: 8, seq_len: 32}
stages:
  - name: quantize
    steps:
      - {type: RTN, bits: 8, ignore: [lm_head]}
      - {type: RTN, bits: 4, group_size: 32, include: ["re:.*mlp.*"]}
evaluate: [size, perplexity]
"""


def test_parse_and_round_trip():
    r = Recipe.from_yaml_text(GOOD)
    assert r.steps == [RTN(bits=8, ignore=("lm_head",)), RTN(bits=4, group_size=32, include=("re:.*mlp.*",))]
    assert r.calibration.n == 8 and r.evaluate == ("size", "perplexity")
    again = Recipe.from_yaml_text(r.to_yaml())
    assert again == r and again.to_yaml() == r.to_yaml()


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("bits: 8,", "bitz: 8,"), r"stage 'quantize' step 0: RTN: unknown key 'bitz'.*did you mean 'bits'"),
    (GOOD.replace("stages:", "stagez:"), r"unknown key 'stagez'.*did you mean 'stages'"),
    (GOOD.replace("samples: 8", "sample: 8"), r"calibration: unknown key 'sample'.*did you mean 'samples'"),
    (GOOD.replace("type: RTN, bits: 8", "type: RTM, bits: 8"), r"unknown config type 'RTM'.*did you mean 'RTN'"),
    (GOOD.replace("perplexity]", "perplexty]"), r"unknown metric 'perplexty'.*did you mean 'perplexity'"),
    (GOOD.replace("bits: 8,", "bits: 5,"), r"RTN.bits"),
    (GOOD.replace("version: 1", "version: 7"), r"version 7 is not supported"),
    ("stages: []", r"non-empty list"),
    ("- just a list", r"must be a mapping"),
    ("stages: [{name: a, steps: [{type: RTN}]}]\n  bad: [", r"not valid YAML"),
])
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml_text(text)


def test_safe_loader_refuses_python_tags(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("stages: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(p)


def test_missing_file_and_shipped_names(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_yaml(tmp_path / "none.yaml")
    assert resolve_recipe("int8-weight-only").steps[0] == RTN(bits=8, embeddings=True)


def test_every_shipped_recipe_parses_and_repo_link_points_to_them():
    shipped = sorted(builtin_recipe_dir().glob("*.yaml"))
    assert shipped
    for path in shipped:
        Recipe.from_yaml(path)
    repo_recipes = Path(__file__).resolve().parents[2] / "recipes"
    if repo_recipes.exists():  # absent in an installed wheel
        assert sorted(p.name for p in repo_recipes.glob("*.yaml")) == [p.name for p in shipped]
