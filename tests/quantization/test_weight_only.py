"""RTN config validation and the handler on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.registry import Context, config_types, handler_for
from slimkit.quantization.modules import QuantEmbedding, QuantLinear, TiedQuantLinear
from slimkit.quantization.weight_only import RTN

torch.set_num_threads(1)


def run(model, cfg, ctx=None):
    ctx = ctx or Context()
    handler_for(cfg)(model, cfg, ctx)
    return ctx


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.ModuleDict({"fc1": nn.Linear(16, 32), "fc2": nn.Linear(32, 32)})
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.encoder["fc1"](x))
        return self.head(torch.relu(self.encoder["fc2"](x)))


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding)))


def tiny_llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def test_sequential_all_linears_replaced_and_close():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(4, 16)
    ref = model(x)
    fractions = []
    ctx = run(model, RTN(), Context(progress=lambda desc, f: fractions.append(f)))
    assert quantized_names(model) == ["0", "2", "4"]
    assert isinstance(model[1], nn.ReLU)
    assert ((model(x) - ref).norm() / ref.norm()) < 0.02
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert "3 Linear" in ctx.notes[-1] and "int8" in ctx.notes[-1] and "per output channel" in ctx.notes[-1]


@pytest.mark.parametrize(
    "include,ignore,expected",
    [
        ((), (), ["encoder.fc1", "encoder.fc2", "head"]),
        ((), ("head",), ["encoder.fc1", "encoder.fc2"]),
        (("encoder.*",), (), ["encoder.fc1", "encoder.fc2"]),
        (("re:.*fc\\d",), ("fc2",), ["encoder.fc1"]),
        (("head", "fc2"), (), ["encoder.fc2", "head"]),
        ((), ("re:encoder\\..*",), ["head"]),
    ],
)
def test_include_ignore_respected(include, ignore, expected):
    model = Tiny()
    run(model, RTN(bits=4, group_size=16, include=include, ignore=ignore))
    assert quantized_names(model) == expected
    for name, m in model.named_modules():
        if name in ("encoder.fc1", "encoder.fc2", "head") and name not in expected:
            assert type(m) is nn.Linear


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="lm_head"):
        run(Tiny(), RTN(include=("lm_head",)))


def test_nan_weight_raises_naming_layer_and_leaves_model_untouched():
    model = Tiny()
    with torch.no_grad():
        model.encoder["fc2"].weight[3, 4] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="encoder.fc2"):
        run(model, RTN())
    assert quantized_names(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_indivisible_group_is_skipped_with_note():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4), nn.Linear(4, 4))
    ctx = run(model, RTN(bits=4, group_size=8))
    assert quantized_names(model) == ["0", "1"]
    assert any("skipped 2" in n and "in_features 4" in n and "group_size 8" in n for n in ctx.notes)
    assert ctx.notes[-1].endswith("skipped 1")


def test_linear_subclass_with_own_forward_is_skipped_with_its_reason():
    class Router(nn.Linear):  # not x·Wᵀ + b: a QuantLinear would silently drop the softmax
        def forward(self, x):
            return super().forward(x).softmax(-1)

    model = nn.Sequential(nn.Linear(16, 16), Router(16, 4))
    ctx = run(model, RTN())
    assert quantized_names(model) == ["0"] and type(model[1]) is Router
    assert any("skipped 1" in n and "Router" in n and "forward" in n for n in ctx.notes)


def test_multihead_attention_out_proj_is_quantized_and_read_through_weight():
    # nn.MultiheadAttention never calls out_proj: it passes out_proj.weight / .bias to the functional
    # form, which now receive the dequantized weight, exactly what the QuantLinear computes with.
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    ctx = run(attn, RTN(bits=4, group_size=8))
    assert isinstance(attn.out_proj, QuantLinear) and not any("skipped" in n and "out_proj" in n for n in ctx.notes)
    dense = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    dense.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("out_proj")}, strict=False)
    with torch.no_grad():
        dense.out_proj.weight.copy_(attn.out_proj.dense_weight())
        dense.out_proj.bias.copy_(attn.out_proj.bias)
        got, want = attn(x, x, x)[0], dense(x, x, x)[0]
    assert torch.equal(got, want)


def test_module_reachable_at_two_paths_is_replaced_at_both():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    run(model, RTN())
    assert isinstance(model[0], QuantLinear) and model[0] is model[2]


@pytest.mark.parametrize("bits,group_size,symmetric,limit", [(8, None, True, 0.02), (4, 32, False, 0.25)])
def test_llama_logits_close(bits, group_size, symmetric, limit):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    linears = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    run(model, RTN(bits=bits, group_size=group_size, symmetric=symmetric, embeddings=True))
    assert quantized_names(model) == sorted(linears + ["model.embed_tokens"])
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()) < limit


def test_llama_ignore_lm_head_and_tied_weights_noted():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ctx = run(model, RTN(embeddings=True))  # both quantized: lm_head reads the embedding's codes, the tie is kept
    assert isinstance(model.lm_head, TiedQuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.table is model.model.embed_tokens
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert not any("shared with" in n for n in ctx.notes)
    assert any("lm_head is tied to model.embed_tokens" in n and "tie is kept" in n for n in ctx.notes)

    model = tiny_llama(tie=True)
    ctx = run(model, RTN(bits={"lm_head": 4, "default": 8}, embeddings=True))  # different bits: two sets of codes
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    tie_notes = [n for n in ctx.notes if "shared with" in n]
    assert len(tie_notes) == 1 and "lm_head" in tie_notes[0] and "embed_tokens" in tie_notes[0]
    assert "tie is broken" in tie_notes[0]

    model = tiny_llama(tie=True)
    ctx = run(model, RTN())  # lm_head quantized, the embedding keeps the float table
    assert isinstance(model.lm_head, QuantLinear) and type(model.model.embed_tokens) is nn.Embedding
    assert any("shared with model.embed_tokens" in n and "stays float" in n for n in ctx.notes)

    model = tiny_llama(tie=True)
    ctx = run(model, RTN(ignore=("lm_head",)))
    assert type(model.lm_head) is nn.Linear and "lm_head" not in quantized_names(model)
    assert not any("shared with" in n for n in ctx.notes)  # neither tied module was touched


def test_config_round_trip_and_registry():
    cfg = RTN(bits=4, group_size=64, symmetric=False, include=["re:.*proj"], ignore=["lm_head"], embeddings=True)
    assert cfg.include == ("re:.*proj",)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["type"] == "RTN" and RTN.family == "quantize"
    assert config_types()["RTN"] is RTN


def test_config_errors():
    with pytest.raises(ConfigError, match="'bits'"):
        Config.from_dict({"type": "RTN", "bit": 4})
    with pytest.raises(ConfigError, match="1, 2, 3, 4, 8, 16"):
        RTN(bits=5)
    with pytest.raises(ConfigError, match="default"):
        RTN(bits={"fc1": 4})
    with pytest.raises(ConfigError, match="binary"):
        RTN(bits=1, symmetric=False)
    with pytest.raises(ConfigError, match="group_size"):
        RTN(group_size=12)
    with pytest.raises(ConfigError, match="group_size"):
        RTN(group_size=0)
    with pytest.raises(ConfigError, match="list"):
        RTN(ignore="lm_head")
    with pytest.raises(ConfigError, match="regex"):
        RTN(include=("re:(",))
    with pytest.raises(ConfigError, match="symmetric"):
        RTN(symmetric="yes")


def test_int3_group_wise_llama():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ctx = run(model, RTN(bits=3, group_size=32, symmetric=False, ignore=("lm_head",)))
    q = model.model.layers[0].mlp.down_proj  # in_features 128
    assert isinstance(q, QuantLinear) and q.bits == 3
    assert q.qweight.shape == (64, 128 * 3 // 8)  # eight 3-bit codes in three bytes
    assert int(q.codes().max()) <= 7 and q.weight_bits_per_element() == pytest.approx(3 + (32 + 8) / 32)
    assert "int3" in ctx.notes[-1]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.5


def _weight_error(model, reference):
    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += float((m.dense_weight() - reference.get_submodule(name).weight.detach()).pow(2).sum())
    return total


@pytest.mark.parametrize("range_opt,symmetric", [("mse", True), ("mse", False), ("hqq", False)])
def test_range_opt_lowers_weight_error_and_reloads(range_opt, symmetric, tmp_path):
    import slimkit as sk

    reference = tiny_llama()
    plain, searched = tiny_llama(), tiny_llama()
    run(plain, RTN(bits=4, group_size=32, symmetric=symmetric, embeddings=True))
    ctx = run(searched, RTN(bits=4, group_size=32, symmetric=symmetric, range_opt=range_opt, embeddings=True))
    assert {"mse": "MSE clip search", "hqq": "HQQ range fit"}[range_opt] in ctx.notes[-1]
    assert _weight_error(searched, reference) < 0.97 * _weight_error(plain, reference)
    emb_ref = reference.model.embed_tokens.weight.detach()
    emb_err = lambda m: float((m.model.embed_tokens.dense_weight() - emb_ref).pow(2).sum())
    assert emb_err(searched) <= emb_err(plain)  # the embedding table is range-searched too
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = searched(input_ids=ids).logits
    again = sk.load(sk.save(searched, tmp_path / range_opt))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, out)
    assert torch.equal(again.model.layers[0].self_attn.q_proj.qweight, searched.model.layers[0].self_attn.q_proj.qweight)


def test_range_opt_config():
    cfg = RTN(bits={"re:.*mlp.*": 3, "default": 4}, group_size=32, symmetric=False, range_opt="hqq")
    assert Config.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["range_opt"] == "hqq"
    assert RTN().range_opt is None
    with pytest.raises(ConfigError, match="range_opt"):
        RTN(range_opt="percentile")
    with pytest.raises(ConfigError, match="symmetric: false"):
        RTN(bits=4, range_opt="hqq")
    with pytest.raises(ConfigError, match="16-bit"):
        RTN(bits=16, range_opt="mse")
    with pytest.raises(ConfigError, match="1-bit"):
        RTN(bits={"fc1": 1, "default": 4}, range_opt="mse")
