"""Techniques that compose: order checks before anything runs, masks baked in between steps,
zeros kept (or the loss of them said), and the whole chain recorded and reloaded."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError, RecipeError
from slimkit.core.masks import masked_modules
from slimkit.core.registry import Context
from slimkit.quantization.modules import QuantLinear
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe
from slimkit.recipe.steps import order_problem, sparse_layers
from tests.llm_archs import tiny_causal_lm, token_batches


def _data():
    return CalibrationData.from_tensors(token_batches(8, 32), batch_size=4, key="input_ids")


def _recipe(*stages):
    return Recipe.from_dict({"stages": [{"name": name, "steps": list(steps)} for name, steps in stages]})


def _zero_fraction(module) -> float:
    w = module.dense_weight() if isinstance(module, QuantLinear) else module.weight.detach()
    return float((w == 0).float().mean())


def test_prune_after_packing_is_refused_before_anything_runs():
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = _recipe(("quantize", [{"type": "RTN", "bits": 4, "group_size": 32}]),
                     ("prune", [{"type": "StructuredPrune", "ratio": 0.3}]))
    with pytest.raises(RecipeError) as err:
        run_recipe(model, recipe, _data())
    message = str(err.value)
    assert "StructuredPrune cannot run after RTN" in message and "Put StructuredPrune before RTN" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing ran


def test_verb_on_a_quantized_model_names_both_steps():
    model = tiny_causal_lm("llama")
    slimkit.quantize_(model, slimkit.RTN(bits=8))
    with pytest.raises(ConfigError, match="Magnitude cannot run after RTN"):
        slimkit.prune_(model, slimkit.Magnitude(sparsity=0.5))


def test_order_problem_allows_prune_then_quantize_and_cast_then_prune():
    assert order_problem([], slimkit.Magnitude(sparsity=0.5)) is None
    assert order_problem(["Magnitude"], slimkit.RTN(bits=4)) is None
    assert order_problem(["CastPrecision"], slimkit.Magnitude(sparsity=0.5)) is None
    assert "SVD cannot run after GPTQ" in order_problem(["GPTQ"], slimkit.SVD(rank_ratio=0.5))


def test_masks_are_baked_in_before_quantizing_and_zeros_survive_the_chain(tmp_path):
    model = tiny_causal_lm("llama")
    recipe = _recipe(("prune", [{"type": "Magnitude", "sparsity": 0.5, "keep_masks": True}]),
                     ("quantize", [{"type": "GPTQ", "bits": 4, "group_size": 32}]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = run_recipe(model, recipe, _data(), Context())
    assert not masked_modules(model)
    assert any("baked the pruning masks" in n for n in ctx.notes)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized
    for name, m in quantized.items():
        assert _zero_fraction(m) >= 0.5, name  # Magnitude's 50% stays (a kept weight may also round to 0)
    assert not any("did not keep the zeros" in n for n in ctx.notes)
    # the chain is recorded, and a reload rebuilds it with equal logits
    assert [s["type"] for s in slimkit.core.io.model_info(model)["steps"]] == ["Magnitude", "GPTQ"]
    slimkit.save(model, tmp_path / "m")
    again = slimkit.load(tmp_path / "m")
    ids = token_batches(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_a_step_that_fills_in_zeros_says_so():
    model = tiny_causal_lm("llama")
    data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimkit.prune_(model, slimkit.Wanda(sparsity=0.5), data=data)
        assert len(sparse_layers(model)) >= 12
        ctx = Context()
        slimkit.quantize_(model, slimkit.GPTQ(bits=4, group_size=32, keep_zeros=False), data=data, ctx=ctx)
    lost = [n for n in ctx.notes if "did not keep the zeros" in n]
    assert lost and "50.0% zeros before" in lost[0]


def test_svd_after_pruning_says_the_sparsity_is_gone():
    model = tiny_causal_lm("llama")
    slimkit.prune_(model, slimkit.Magnitude(sparsity=0.5, keep_masks=False))
    ctx = Context()
    slimkit.factorize_(model, slimkit.SVD(rank_ratio=0.25), ctx=ctx)
    assert any("did not keep the zeros" in n and "no longer one dense weight" in n for n in ctx.notes)


def test_llm_sparse_int4_recipe_keeps_half_zeros_through_recovery_and_gptq(tmp_path):
    import dataclasses

    from slimkit.distillation.distill import Distill
    from slimkit.recipe.schema import Stage, resolve_recipe
    from slimkit.zoo.corpus import load_split

    recipe = resolve_recipe("llm-sparse-int4")
    assert Recipe.from_yaml_text(recipe.to_yaml()) == recipe
    assert [type(s).__name__ for s in recipe.steps] == ["SparseGPT", "Distill", "GPTQ"]
    short = dataclasses.replace(recipe, stages=tuple(
        Stage(st.name, tuple(dataclasses.replace(s, steps=2, warmup_steps=1, batch_size=2, seq_len=32, eval_every=0)
                             if isinstance(s, Distill) else s for s in st.steps)) for st in recipe.stages))
    model = slimkit.load("stdlib-coder")
    calib = CalibrationData.from_texts(load_split("calibration"), slimkit.tokenizer_of(model), seq_len=32, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = run_recipe(model, short, data=calib)
    layers = {n: m for n, m in ctx.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 42
    for name, m in layers.items():
        assert 0.5 <= _zero_fraction(m) < 0.6, name
        assert torch.equal(m.scale, m.scale.half().float()), name  # fp16_scales: stored in 16 bits losslessly
    assert any("stay exact zeros" in n for n in ctx.notes)
    slimkit.save(ctx.model, tmp_path / "m")
    from safetensors import safe_open

    from slimkit.core.sparse_storage import SPARSE_CODES_KEY

    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert len(json.loads(f.metadata()[SPARSE_CODES_KEY])) == 42  # every layer: bitmask + kept codes
    again = slimkit.load(tmp_path / "m")
    ids = token_batches(1, 16, vocab=200, seed=3)
    with torch.no_grad():
        assert torch.equal(ctx.model(input_ids=ids).logits, again(input_ids=ids).logits)
