"""StaticQuant(attention=True): int8 operands for Q·Kᵀ and P·V inside transformers attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError
from slimkit.core.registry import Context, handler_for
from slimkit.quantization.attention import CHILD, QUERY, QuantAttentionInputs, quantized_attention
from slimkit.quantization.primitives import scale_zero_from_range
from slimkit.quantization.ptq import StaticQuant


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64,
                     initializer_range=0.3)  # larger weights than BERT's 0.02, so that rounding shows
    return BertModel(cfg).eval()


def token_batches(vocab, n=3, rows=2, seq=12, pad=True):
    batches = []
    for i in range(n):
        ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(i))
        mask = torch.ones_like(ids)
        if pad:
            mask[-1, seq // 2:] = 0  # padding exercises the additive mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def quantize(model, data, **kw):
    cfg = StaticQuant(attention=True, **kw)
    ctx = Context(data=CalibrationData(data))
    handler_for(cfg)(model, cfg, ctx)
    return ctx


def reference_attention(query, key, value, mask, grids, groups=1):
    """Slow float64 reference: repeat kv heads, fake-quantize operands, scores, softmax, context."""
    def fq(x, role):
        scale, zero = grids[role]
        return ((torch.clamp(torch.round(x.double() / scale) + zero, 0, 255) - zero) * scale)

    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    q, k = fq(query, 0), fq(key, 1)
    scores = q @ k.transpose(-1, -2) / query.shape[-1] ** 0.5 + mask.double()
    p = torch.softmax(scores, dim=-1)
    return (fq(p, 2) @ fq(value, 3)).transpose(1, 2)


def test_quantized_attention_matches_a_float64_reference_with_gqa():
    torch.manual_seed(0)
    quant = QuantAttentionInputs()
    grids = []
    for i, (lo, hi) in enumerate([(-2.0, 2.5), (-3.0, 1.5), (0.0, 1.0), (-1.0, 1.0)]):
        scale, zero = scale_zero_from_range(torch.tensor(lo), torch.tensor(hi), 8, False)
        quant.scale[i], quant.zero[i] = scale, zero
        grids.append((float(scale), int(zero)))

    class Attn(torch.nn.Module):
        num_key_value_groups = 2

    module = Attn().eval()
    setattr(module, CHILD, quant)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, 3:] = torch.finfo(torch.float32).min  # padded keys of the second row
    out, probs = quantized_attention(module, q, k, v, mask, scaling=8 ** -0.5)
    ref = reference_attention(q, k, v, mask, grids, groups=2)
    assert out.shape == (2, 5, 4, 8)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.all(probs[1, :, :, 3:] == 0)
    quant.enabled = False  # identity: plain eager attention
    out_float, _ = quantized_attention(module, q, k, v, mask, scaling=8 ** -0.5)
    plain = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5 + mask, -1) \
        @ v.repeat_interleave(2, 1)
    assert torch.allclose(out_float, plain.transpose(1, 2), atol=1e-6)


def test_bert_attention_scales_are_the_calibration_ranges_and_outputs_stay_close():
    model = tiny_bert()
    data = token_batches(100)
    ref = [model(**b).last_hidden_state for b in data]
    probe = {}

    def record(module, args, kwargs, out, store=probe):  # the value operand of layer 0, from the float model
        store.setdefault("v", []).append(out)

    handle = model.encoder.layer[0].attention.self.value.register_forward_hook(record, with_kwargs=True)
    for b in data:
        model(**b)
    handle.remove()
    ctx = quantize(model, data)
    quant = getattr(model.encoder.layer[0].attention.self, CHILD)
    assert isinstance(quant, QuantAttentionInputs) and quant.enabled
    assert model.config._attn_implementation == "slimkit_int8"
    v = torch.cat([t.flatten() for t in probe["v"]])  # the value operand is the value projection's output
    scale, zero = scale_zero_from_range(v.min(), v.max(), 8, False)
    assert torch.isclose(quant.scale[3], scale, rtol=1e-5) and int(quant.zero[3]) == int(zero)
    assert 0 < float(quant.scale[2]) <= 1 / 255 + 1e-7  # probabilities live in [0, 1]
    assert any("attention matmul inputs" in n and "2 block(s)" in n for n in ctx.notes)
    for b, r in zip(data, ref):
        got = model(**b).last_hidden_state
        mask = b["attention_mask"].bool()
        assert F.cosine_similarity(got[mask], r[mask], dim=-1).mean() > 0.99


def test_attention_quantization_moves_the_output():
    """The attention quantizers do act: disabling them changes the output by more than float noise."""
    model = tiny_bert()
    data = token_batches(100)
    quantize(model, data)
    b = data[0]
    on = model(**b).last_hidden_state
    for layer in model.encoder.layer:
        getattr(layer.attention.self, CHILD).enabled = False
    off = model(**b).last_hidden_state
    assert (on - off).abs().max() > 1e-4


def test_save_reload_and_onnx_export_run_int8_attention(tiny_llama, tmp_path):
    import slimkit
    from slimkit.export.onnx import check_onnx, export_onnx, ort_op_counts

    data = [{"input_ids": b["input_ids"]} for b in token_batches(128, pad=False)]
    quantize(tiny_llama, data)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    expected = tiny_llama(input_ids=ids).logits
    slimkit.save(tiny_llama, tmp_path / "m")
    again = slimkit.load(tmp_path / "m")
    assert again.config._attn_implementation == "slimkit_int8"
    assert isinstance(getattr(again.model.layers[1].self_attn, CHILD), QuantAttentionInputs)
    assert torch.equal(again(input_ids=ids).logits, expected)
    result = export_onnx(again, tmp_path / "m.onnx")
    assert any("attention matmul inputs" in n for n in result.notes)
    check_onnx(again, result.path)  # within the default tolerance, which counts the attention operands
    kernels = ort_op_counts(result.path)
    # 7 Linears per layer, lm_head, and both attention matmuls of each layer, all as int8 GEMMs
    # (P·V feeds o_proj's input quantizer, so ORT writes its output as int8: QLinearMatMul).
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 2 * 7 + 1 + 2 * 2, kernels
    assert "MatMul" not in kernels and "FusedMatMul" not in kernels


def test_fallback_can_return_a_block_attention_to_float():
    model = tiny_bert()
    data = token_batches(100)
    ctx = quantize(model, data, tolerance=1e-7, max_float_layers=40, fallback_to="float")
    quants = [getattr(layer.attention.self, CHILD) for layer in model.encoder.layer]
    assert not any(q.enabled for q in quants)  # an impossible tolerance returns everything
    assert any(f"{CHILD} back to float" in n for n in ctx.notes)


def test_unsupported_models_and_settings_are_named():
    from torch import nn

    mlp = nn.Sequential(nn.Linear(8, 8))
    ctx = quantize(mlp, [torch.randn(4, 8) for _ in range(2)])
    assert any("attention matmuls kept in float" in n and "not a transformers model" in n for n in ctx.notes)
    with pytest.raises(ConfigError, match="attention"):
        StaticQuant(attention=True, act_bits=16)
    with pytest.raises(ConfigError, match="attention"):
        StaticQuant(attention="yes")


def test_ignore_patterns_apply_to_attention_blocks():
    model = tiny_bert()
    quantize(model, token_batches(100), ignore=["encoder.layer.0.attention.self"])
    assert not hasattr(model.encoder.layer[0].attention.self, CHILD)
    assert hasattr(model.encoder.layer[1].attention.self, CHILD)


def test_freeze_reports_roles_never_observed():
    from slimkit.quantization.observers import make_observer

    quant = QuantAttentionInputs()
    quant.observers = [make_observer("minmax", bits=8, symmetric=False) for _ in range(4)]
    quant.observers[QUERY].update(torch.tensor([-1.0, 3.0]))
    assert quant.freeze() == ["key", "probs", "value"]
    assert quant.observers is None
    assert torch.isclose(quant.scale[QUERY], torch.tensor(4.0 / 255))


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_other_supported_decoders_quantize_every_block_and_stay_close(arch):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    data = [{"input_ids": b["input_ids"]} for b in token_batches(128, pad=False)]
    ids = data[0]["input_ids"]
    ref = model(input_ids=ids).logits
    quantize(model, data)
    assert all(isinstance(getattr(layer.self_attn, CHILD), QuantAttentionInputs) for layer in model.model.layers)
    got = model(input_ids=ids).logits
    assert F.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1).min() > 0.99
    for layer in model.model.layers:  # switched off, the registered attention is the model's own eager maths
        getattr(layer.self_attn, CHILD).enabled = False
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids).logits
    model.set_attn_implementation("slimkit_int8")
    assert torch.allclose(model(input_ids=ids).logits, eager, atol=1e-5)
