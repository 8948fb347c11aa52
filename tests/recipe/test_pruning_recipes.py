"""The shipped pruning recipes.

LLM part (wanda-50, sparsegpt-2of4): each recipe is parsed, round-tripped and run end to end
on tiny decoders (with a small calibration set passed in, to stay fast); the pruned layers
must hold exactly the recipe's sparsity, and the saved model must reload to the same logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe, resolve_recipe
from tests.llm_archs import tiny_causal_lm, token_batches

LLM_RECIPES = {"wanda-50": ("Wanda", None), "sparsegpt-2of4": ("SparseGPT", (2, 4))}


def _data():
    return CalibrationData.from_tensors(token_batches(8, 32), batch_size=4, key="input_ids")


def _block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def _check_exact(weight, nm, per_row):
    rows, cols = weight.shape
    zeros = weight == 0
    if nm is not None:
        n, m = nm
        assert torch.all(zeros.reshape(rows, cols // m, m).sum(-1) == m - n)
    elif per_row:
        assert torch.all(zeros.sum(1) == cols // 2)
    else:
        assert int(zeros.sum()) == rows * cols // 2


@pytest.mark.parametrize("name", sorted(LLM_RECIPES))
def test_llm_recipe_parses_round_trips_and_targets_the_zoo_coder(name):
    recipe = resolve_recipe(name)
    assert recipe.model == "stdlib-coder" and recipe.calibration.source == "stdlib"
    assert recipe.calibration.n == 64 and recipe.calibration.seq_len == 256
    assert Recipe.from_yaml_text(recipe.to_yaml()) == recipe
    (step,) = recipe.steps
    assert type(step).__name__ == LLM_RECIPES[name][0] and step.ignore == ("lm_head",) and step.sparsity == 0.5
    assert "sparsity" in recipe.evaluate


@pytest.mark.parametrize("name", sorted(LLM_RECIPES))
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_llm_recipe_prunes_every_block_linear_exactly_and_reloads(tmp_path, name, arch):
    kind, nm = LLM_RECIPES[name]
    model, dense = tiny_causal_lm(arch), tiny_causal_lm(arch)
    ids = token_batches(2, 32, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 samples: the few-samples warning
        ctx = run_recipe(model, resolve_recipe(name), data=_data())
    layers = _block_linears(model)
    assert len(layers) == (14 if arch == "llama" else 12)
    for lin in layers.values():
        _check_exact(lin.weight, nm, per_row=kind == "Wanda")
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert any(line.startswith(f"{kind}: pruned {len(layers)} Linear") for line in ctx.notes)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        ref = dense(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    slimkit.save(model, tmp_path / "m")
    reloaded = slimkit.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, out, rtol=0, atol=0)
    for n, lin in _block_linears(reloaded).items():
        assert torch.equal(lin.weight, layers[n].weight)
