"""The shipped LLM weight-quantization recipes (w4-gptq, w4-awq, w8a8-smoothquant) on a tiny decoder.

Each recipe is parsed, round-tripped and run end to end (with a small calibration set
passed in, to stay fast); the result is saved, reloaded and must give the same logits.
"""

from __future__ import annotations

import pytest
import torch

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.core.registry import Context
from slimkit.quantization.modules import QuantLinear
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe, resolve_recipe
from tests.llm_archs import tiny_causal_lm, token_batches


def _data():
    return CalibrationData.from_tensors(token_batches(8, 32), batch_size=4, key="input_ids")


@pytest.mark.parametrize("name", ["w4-gptq", "w4-awq", "w8a8-smoothquant"])
def test_recipe_parses_round_trips_and_targets_the_zoo_coder(name):
    recipe = resolve_recipe(name)
    assert recipe.model == "stdlib-coder" and recipe.calibration.source == "stdlib"
    assert Recipe.from_yaml_text(recipe.to_yaml()) == recipe


@pytest.mark.parametrize("name, bits, act", [("w4-gptq", 4, None), ("w4-awq", 4, None), ("w8a8-smoothquant", 8, "dynamic_token")])
def test_recipe_quantizes_every_block_linear_and_reloads(tmp_path, name, bits, act):
    model = tiny_causal_lm("llama")
    fp32 = tiny_causal_lm("llama")
    ids = token_batches(2, 32, seed=9)
    recipe = resolve_recipe(name)
    # The recipes use group size 128; the tiny model's widths are 64/128, so use 32 here.
    steps = []
    for stage in recipe.stages:
        for step in stage.steps:
            fields = step.to_dict()
            if "group_size" in fields:
                fields["group_size"] = 32
            steps.append(type(step).from_dict(fields))
    ctx = Context()
    for step in steps:
        slimkit.apply(model, step, _data(), ctx)
    block_linears = {n: m for n, m in model.named_modules() if n.startswith("model.layers.")
                     and isinstance(m, (QuantLinear, torch.nn.Linear))}
    assert len(block_linears) == 14
    assert all(isinstance(m, QuantLinear) and m.bits == bits and m.act_mode == act for m in block_linears.values())
    with torch.no_grad():
        out = model(input_ids=ids).logits
        ref = fp32(input_ids=ids).logits
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.25 if bits == 4 else 0.05)
    slimkit.save(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(slimkit.load(tmp_path / "m")(input_ids=ids).logits, out, rtol=0, atol=0)


def test_recipe_runner_runs_w4_gptq_as_shipped_on_a_model_with_128_wide_layers(tiny_lm_dir):
    """The recipe exactly as shipped (group 128) through run_recipe, on a model whose layers are 128 wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ctx = run_recipe(model, resolve_recipe("w4-gptq"), data=_data())
    layers = [m for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 and all(m.group_size == 128 and m.g_idx is None for m in layers)
    assert any(line.startswith("GPTQ: quantized 7 Linear") for line in ctx.notes)
