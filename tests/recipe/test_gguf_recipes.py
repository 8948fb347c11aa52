"""The shipped GGUF recipes (gguf-q4_0, gguf-q4_k): every quantized layer lands on a llama.cpp grid.

Each recipe runs end to end on the zoo coder with a small calibration set passed in (to stay
fast); ``export_gguf`` must then copy every quantized layer's codes (none re-quantized) into
the recipe's types, and the gguf package's reading of each tensor must equal slimkit's weight.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.quantization.modules import QuantEmbedding, QuantLinear
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe, resolve_recipe

gguf = pytest.importorskip("gguf")

# recipe -> (type for --type, output type, tensor types expected in the file)
RECIPES = {"gguf-q4_0": ("q4_0", None, {"q4_0": 44}), "gguf-q4_k": ("q4_k", "q6_k", {"q4_k": 37, "q5_0": 6, "q6_k": 1})}


@pytest.fixture(scope="module")
def coder():
    return slimkit.load("stdlib-coder")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_gguf_recipe_lands_on_the_grid_and_exports_without_rounding(name, coder, tmp_path):
    from gguf import quants

    from slimkit.export.gguf import export_gguf
    from slimkit.zoo.corpus import load_split

    recipe = resolve_recipe(name)
    assert recipe.model == "stdlib-coder" and Recipe.from_yaml_text(recipe.to_yaml()) == recipe
    model = copy.deepcopy(coder)
    data = CalibrationData.from_texts(load_split("calibration")[:4], slimkit.tokenizer_of(model), seq_len=64, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 samples: the few-samples warning
        run_recipe(model, recipe, data=data)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert len(layers) == 44  # 42 block Linears, lm_head, the embedding
    qtype, output_type, expected = RECIPES[name]
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype=qtype, output_type=output_type)
    assert result.copied == 44 and result.requantized == 0
    assert {k: v for k, v in result.tensor_types.items() if k != "f32"} == expected
    reader = gguf.GGUFReader(out)
    got = {t.name: t for t in reader.tensors}
    ref = layers["model.layers.0.mlp.down_proj"].dense_weight().numpy()
    t = got["blk.0.ffn_down.weight"]
    deq = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
    assert np.array_equal(deq, ref)  # a symmetric grid (q4_0, or q4_k's fallback q5_0): bit for bit
    emb = layers["model.embed_tokens"].dense_weight(torch.float32).numpy()
    t = got["token_embd.weight"]
    deq = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(emb.shape)
    assert np.allclose(deq, emb, rtol=0, atol=1e-6 * np.abs(emb).max())
