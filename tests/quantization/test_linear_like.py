"""Linear-like layers (core.linear_like) through the quantizers: Conv1D, FalconLinear, scaled and tied embeddings."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
from transformers.pytorch_utils import Conv1D

import slimkit as sk
from slimkit.core.linear_like import (
    LinearLike,
    as_linear,
    embedding_problem,
    embedding_scale,
    is_linear_like,
    linear_problem,
    linear_shape,
    linear_weight,
    set_linear_weight,
)
from slimkit.core.registry import Context, handler_for
from slimkit.core.masks import apply_mask
from slimkit.quantization.llm_int8 import LLMInt8, LLMInt8Linear
from slimkit.quantization.mixed import CastPrecision, LowPrecision
from slimkit.quantization.modules import QuantEmbedding, QuantLinear, TiedQuantLinear
from slimkit.quantization.qat import QATLinear
from tests.llm_archs import linear_copy, tiny_causal_lm, token_batches

torch.set_num_threads(1)


def run(model, cfg, data=None):
    ctx = Context(data=data)
    handler_for(cfg)(model, cfg, ctx)
    return ctx


class Router(nn.Linear):
    """A Linear subclass whose forward is not x·Wᵀ + b (a softmax over experts)."""

    def forward(self, x):
        return super().forward(x).softmax(-1)


def conv1d(nx=16, nf=8, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.bias)
    return layer


# --- the definition ----------------------------------------------------------------------


def test_which_layers_are_linear_like():
    torch.manual_seed(0)
    plain, falcon, router, conv = nn.Linear(16, 8), FalconLinear(16, 8), Router(16, 8), conv1d()
    mha_out = nn.MultiheadAttention(16, 2).out_proj  # NonDynamicallyQuantizableLinear: nn.Linear's forward
    for m in (plain, falcon, conv, mha_out):
        assert is_linear_like(m) and linear_problem(m) is None and isinstance(m, LinearLike)
    assert isinstance(router, LinearLike) and not is_linear_like(router)  # a candidate, refused with a reason
    assert "Router" in linear_problem(router) and "forward" in linear_problem(router)
    assert not isinstance(nn.Conv1d(4, 4, 1), LinearLike) and not isinstance(nn.Embedding(4, 4), LinearLike)
    assert issubclass(Conv1D, LinearLike) and issubclass(FalconLinear, LinearLike)
    apply_mask(plain, torch.rand(8, 16) > 0.5)  # masked: linear-like, but replacing it needs strip first
    assert is_linear_like(plain) and "strip" in linear_problem(plain)
    int8 = nn.Linear(4, 4)
    int8.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert "int8" in linear_problem(int8)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 8), lambda: FalconLinear(16, 8), conv1d])
def test_weight_is_read_and_written_as_out_in(make):
    torch.manual_seed(1)
    layer = make()
    x = torch.randn(3, 5, 16)
    w = linear_weight(layer)
    assert linear_shape(layer) == (8, 16) and w.shape == (8, 16)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-6, atol=1e-6)  # forward is x·Wᵀ + b
    new = torch.randn(8, 16)
    set_linear_weight(layer, new)
    assert torch.equal(linear_weight(layer), new)
    torch.testing.assert_close(layer(x), x @ new.T + layer.bias, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        linear_weight(layer).mul_(2)  # the view writes through, in the layer's own layout
    assert torch.equal(linear_weight(layer), 2 * new)
    exact = as_linear(layer)
    assert type(exact) is nn.Linear and torch.equal(exact.weight, 2 * new)
    torch.testing.assert_close(exact(x), layer(x), rtol=1e-5, atol=1e-5)  # addmm vs linear: last bits
    with pytest.raises(ValueError, match="8, 16"):
        set_linear_weight(layer, torch.zeros(16, 8))


def test_as_linear_refuses_a_layer_that_is_not_linear_like():
    with pytest.raises(TypeError, match="Router"):
        as_linear(Router(4, 4))


def test_scaled_embedding_is_recognised_and_other_subclasses_are_not():
    torch.manual_seed(0)
    gemma = GemmaTextScaledWordEmbedding(32, 16, padding_idx=0, embed_scale=16 ** 0.5)
    assert embedding_scale(nn.Embedding(4, 4)) is None and embedding_scale(gemma) == 4.0
    assert embedding_problem(gemma) is None

    class Shifted(nn.Embedding):  # positions offset by 2, as OPT's learned positional embedding
        def forward(self, ids):
            return super().forward(ids + 2)

    class Lying(nn.Embedding):  # claims a scale its forward does not apply
        embed_scale = 3.0

        def forward(self, ids):
            return super().forward(ids) + 1

    assert "Shifted" in embedding_problem(Shifted(8, 4)) and "embed_scale" in embedding_problem(Shifted(8, 4))
    assert "not the table lookup times embed_scale=3" in embedding_problem(Lying(8, 4))


# --- quantized Conv1D / FalconLinear ------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 8, False)])
def test_quantlinear_of_a_conv1d_equals_that_of_its_linear(bits, group_size, symmetric):
    conv = conv1d()
    q_conv = QuantLinear.from_linear(conv, bits, group_size, symmetric)
    q_lin = QuantLinear.from_linear(as_linear(conv), bits, group_size, symmetric)
    assert torch.equal(q_conv.qweight, q_lin.qweight) and torch.equal(q_conv.scale, q_lin.scale)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(q_conv(x), x @ q_conv.dense_weight().T + conv.bias, rtol=1e-6, atol=1e-6)


def test_rtn_quantizes_conv1d_and_falcon_and_notes_the_router():
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(16, 32), FalconLinear(32, 32), Router(32, 8))
    ref = copy.deepcopy(model)
    ctx = run(model, sk.RTN(bits=8))
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear) and type(model[2]) is Router
    assert any("skipped 2" in n and "Router" in n for n in ctx.notes)
    assert ctx.notes[-1].startswith("RTN: quantized 2 Linear")
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[2](_dense_chain(model, x)), rtol=1e-5, atol=1e-6)
        assert (model(x) - ref(x)).abs().max() < 0.02  # int8: close to the float model


def _dense_chain(model, x):
    """The first two (quantized) layers computed with their dequantized (out, in) weights."""
    for layer in model[:2]:
        x = x @ layer.dense_weight().T + layer.bias
    return x


def test_gptq_on_gpt2_conv1d_equals_gptq_on_the_same_model_with_linears():
    # GPT-2's Conv1D hold W as (in, out); GPTQ must see (out, in). A copy with every Conv1D turned into
    # the nn.Linear it computes is the reference: the first layer (same inputs) gets identical codes,
    # the rest only differs by addmm vs linear rounding.
    gpt2 = tiny_causal_lm("gpt2")
    linear = linear_copy(gpt2)
    ids = token_batches(8, 32)
    data = sk.CalibrationData.from_tensors(ids, batch_size=4, key="input_ids")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples
        for model in (gpt2, linear):
            sk.quantize_(model, sk.GPTQ(bits=4, group_size=32), data=data)
    a = {n: m for n, m in gpt2.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m for n, m in linear.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(a) == sorted(b) and len(a) == 8  # every Conv1D of both blocks
    assert torch.equal(a["transformer.h.0.attn.c_attn"].qweight, b["transformer.h.0.attn.c_attn"].qweight)
    same = sum(int((a[n].codes() == b[n].codes()).sum()) for n in a) / sum(a[n].codes().numel() for n in a)
    assert same > 0.99
    with torch.no_grad():
        la, lb = gpt2(input_ids=ids[:2]).logits, linear(input_ids=ids[:2]).logits
    assert float((la - lb).norm() / lb.norm()) < 1e-3


def test_smoothquant_fold_into_gpt2_keeps_the_function_and_scales_conv1d_columns():
    model = tiny_causal_lm("gpt2")
    ref = copy.deepcopy(model)
    ids = token_batches(8, 32)
    data = sk.CalibrationData.from_tensors(ids, batch_size=4, key="input_ids")
    ctx = run(model, sk.SmoothQuant(alpha=0.5), data)
    assert any("smoothed 4 input group(s) (4 Linear layers)" in n for n in ctx.notes)  # c_attn and c_fc per block
    before = linear_weight(ref.transformer.h[0].attn.c_attn)
    after = linear_weight(model.transformer.h[0].attn.c_attn)
    s = after[0] / before[0]  # W·diag(s): every row scaled by the same per-input-column s
    torch.testing.assert_close(after, before * s, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(s, torch.ones_like(s))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_llm_int8_and_qat_take_conv1d_and_falcon():
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(16, 32), FalconLinear(32, 8))
    x = torch.randn(5, 16)
    ref = model(x).detach()
    ctx = run(copy.deepcopy(model), LLMInt8())
    assert ctx.notes[-1].startswith("LLMInt8: 2 Linear layer(s)")
    q = copy.deepcopy(model)
    run(q, LLMInt8())
    assert isinstance(q[0], LLMInt8Linear) and isinstance(q[1], LLMInt8Linear)
    assert (q(x) - ref).abs().max() < 0.02
    qat = QATLinear.from_linear(model[0], 8)
    assert qat.weight.shape == (32, 16) and qat.bias is model[0].bias  # a transposed copy, the bias shared
    torch.testing.assert_close(qat.weight, linear_weight(model[0]))


def test_cast_precision_takes_conv1d_and_notes_the_router():
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(16, 32), Router(32, 8))
    x = torch.randn(5, 16)
    ref = model(x).detach()
    ctx = run(model, CastPrecision(dtype="bfloat16"))
    assert isinstance(model[0], LowPrecision) and type(model[1]) is Router
    assert any("skipped 1" in n and "Router" in n for n in ctx.notes)
    assert (model(x) - ref).abs().max() < 0.02
    assert model[0].weight.dtype == torch.float32 and model[0].weight.shape == (32, 16)


# --- embeddings: scaled, tied -----------------------------------------------------------------


def test_scaled_embedding_keeps_its_scale_quantized_saved_and_exported(tmp_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = GemmaTextScaledWordEmbedding(64, 32, padding_idx=0, embed_scale=32 ** 0.5)
    model.forward = lambda ids: model.embed(ids)
    ctx = run(model, sk.RTN(bits=8, embeddings=True))
    q = model.embed
    assert isinstance(q, QuantEmbedding) and q.embed_scale == pytest.approx(32 ** 0.5)
    assert ctx.notes[-1].startswith("RTN: quantized 0 Linear and 1 Embedding")
    ids = torch.tensor([[0, 5, 63, 7]])
    want = q.dense_weight()[ids] * torch.tensor(32 ** 0.5)  # the same scale, after the lookup
    assert torch.equal(q(ids), want) and torch.equal(q.weight, q.dense_weight())  # .weight stays the raw table
    again = QuantEmbedding.from_slimkit_spec(q.slimkit_spec())
    again.load_state_dict(q.state_dict())
    assert torch.equal(again(ids), q(ids))
    from slimkit.export.twins import _ExportEmbedding

    torch.testing.assert_close(_ExportEmbedding(q)(ids), q(ids), rtol=1e-6, atol=1e-6)


def test_embedding_subclass_that_is_not_a_scaled_lookup_is_skipped_with_its_reason():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids + 2)

    model = nn.Module()
    model.emb = Shifted(16, 8)
    ctx = run(model, sk.RTN(embeddings=True), None)
    assert type(model.emb) is Shifted
    assert any("skipped emb" in n and "Shifted" in n for n in ctx.notes)


def test_tied_lm_head_reads_the_embedding_codes_and_the_tie_survives_save_load(tmp_path):
    model = tiny_causal_lm("gemma")  # a scaled embedding tied to lm_head
    ids = token_batches(2, 16)
    run(model, sk.RTN(bits=8, embeddings=True))
    head, table = model.lm_head, model.model.embed_tokens
    assert isinstance(head, TiedQuantLinear) and head.table is table and isinstance(table, QuantEmbedding)
    assert torch.equal(head.weight, table.weight)
    assert not any(k.startswith("lm_head") for k in model.state_dict())  # nothing of its own to store
    x = torch.randn(3, 64)
    torch.testing.assert_close(head(x), x @ table.dense_weight().T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.as_quant_linear()(x), head(x), rtol=0, atol=0)
    copied = copy.deepcopy(model)
    assert copied.lm_head.table is copied.model.embed_tokens  # the copy ties to its own table
    with torch.no_grad():
        out = model(input_ids=ids).logits
    sk.save(model, tmp_path / "tied")
    reloaded = sk.load(tmp_path / "tied")
    assert reloaded.lm_head.table is reloaded.model.embed_tokens
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, out)

    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        keys = f.keys()  # safe_open is not iterable
    stored = [k for k in keys if "embed_tokens" in k or "lm_head" in k]
    assert sorted(stored) == ["model.embed_tokens.qweight", "model.embed_tokens.scale"]  # the table, once

    untied = tiny_causal_lm("gemma")  # lm_head with other bits: a second set of codes on disk
    run(untied, sk.RTN(bits={"lm_head": 4, "default": 8}, embeddings=True))
    assert isinstance(untied.lm_head, QuantLinear)
    sk.save(untied, tmp_path / "untied")
    extra = untied.lm_head.qweight.numel() + 4 * untied.lm_head.scale.numel()  # its packed codes and scales
    sizes = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("tied", "untied")}
    assert sizes["untied"] - sizes["tied"] >= extra


def test_unbound_tied_layer_and_wrong_table_are_clear_errors():
    layer = TiedQuantLinear.from_slimkit_spec({"in_features": 8, "out_features": 4, "source": "emb", "bias": False})
    with pytest.raises(RuntimeError, match="not bound"):
        layer(torch.randn(1, 8))
    with pytest.raises(ValueError, match="4x8 QuantEmbedding"):
        layer.bind(QuantEmbedding(5, 8))
    model = nn.Module()
    model.emb, model.head = nn.Embedding(4, 8), layer
    from slimkit.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="emb"):
        TiedQuantLinear.after_load(model)
