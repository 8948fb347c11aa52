"""Heads and neurons of transformers models as Groups: pruning equals removing their contribution.

The reference for every pruning is the unpruned model with the removed units' input columns
of the consuming layer (o_proj / attention output dense / down_proj / fc2) set to zero:
that removes exactly their contribution, so outputs must agree to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.pruning.group import IN
from slimkit.pruning.transformer_groups import find_groups, sync_config
from tests.llm_archs import tiny_causal_lm, token_batches

ARCHS = ("bert", "llama", "qwen2", "mistral", "opt")


def tiny_bert(seed: int = 0, layers: int = 2) -> nn.Module:
    """A seeded random-init BertModel: hidden 64, 4 heads of 16, intermediate 128."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()


def tiny(arch: str, seed: int = 0) -> nn.Module:
    return tiny_bert(seed) if arch == "bert" else tiny_causal_lm(arch, seed)


def batch(arch: str) -> dict[str, torch.Tensor]:
    """Two sequences of 12 tokens; the second padded by 4 (right for BERT, left for the causal LMs)."""
    ids = token_batches(2, 12, vocab=100)
    mask = torch.ones_like(ids)
    if arch == "bert":
        mask[1, -4:] = 0
    else:
        mask[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return out * inputs["attention_mask"].unsqueeze(-1)  # padding positions carry no meaning


def zero_removed(reference: nn.Module, group, removed: torch.Tensor) -> None:
    """In ``reference`` (an unpruned copy), zero the consumer's input columns of ``removed`` units."""
    with torch.no_grad():
        for m in group.members:
            if m.dim == IN:
                reference.get_submodule(m.name).weight[:, m.channels(removed)] = 0


def prune_and_reference(model: nn.Module, targets, removed_for) -> nn.Module:
    """Prune every group of ``model`` (layer i loses ``removed_for(i, group)``) and return the zeroed reference."""
    reference = copy.deepcopy(model)
    groups = find_groups(model, targets)
    seen: dict[str, int] = {}
    for group in groups:
        i = seen[group.unit] = seen.get(group.unit, -1) + 1  # the layer index (groups come in layer order)
        removed = torch.as_tensor(removed_for(i, group), dtype=torch.long)
        zero_removed(reference, group, removed)
        keep = torch.tensor([u for u in range(group.units) if u not in set(removed.tolist())])
        group.prune(keep)
    return reference


def set_attention(model: nn.Module, impl: str) -> None:
    model.set_attn_implementation(impl)


# -- structure ------------------------------------------------------------------------------
def test_groups_of_bert_and_llama_name_their_blocks_and_slices():
    bert = find_groups(tiny_bert())
    assert [g.root for g in bert] == ["encoder.layer.0.attention", "encoder.layer.0.intermediate",
                                      "encoder.layer.1.attention", "encoder.layer.1.intermediate"]
    heads, neurons = bert[0], bert[1]
    assert (heads.unit, heads.units, neurons.unit, neurons.units) == ("head", 4, "neuron", 128)
    assert [m.name.rsplit(".", 2)[-2:] for m in heads.members] == [
        ["self", "query"], ["self", "key"], ["self", "value"], ["output", "dense"]]
    assert heads.members[0].index[1].tolist() == list(range(16, 32))  # head 1 owns channels 16..31
    assert [m.name for m in neurons.members] == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]

    llama = find_groups(tiny_causal_lm("llama"), ("heads",))
    assert [g.root for g in llama] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    g = llama[0]
    assert g.units == 2  # 2 key/value heads, each with its 2 query heads (4 heads of 16, GQA n_rep = 2)
    q, k, _, o = g.members
    assert q.index.shape == (2, 32) and q.index[1].tolist() == list(range(32, 64))  # query heads 2 and 3
    assert k.index.shape == (2, 16) and k.index[1].tolist() == list(range(16, 32))
    assert o.dim == IN and torch.equal(o.index, q.index)
    assert any("grouped-query" in n for n in g.notes)
    assert "kv head" in g.details() and "o_proj" in g.details()

    mlp = find_groups(tiny_causal_lm("llama"), ("neurons",))[0]
    assert [m.name.rsplit(".", 1)[-1] for m in mlp.members] == ["gate_proj", "up_proj", "down_proj"]


def test_unknown_layouts_are_named_in_notes_not_pruned():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0,
                                            eos_token_id=0))
    groups = find_groups(gpt2)
    assert list(groups) == []
    text = "\n".join(groups.notes)
    assert "transformer.h.0.attn (GPT2Attention)" in text and "transformer.h.1.mlp (GPT2MLP)" in text

    class MyLinear(nn.Linear):
        pass

    model = tiny_causal_lm("llama")
    old = model.model.layers[1].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj = MyLinear(old.in_features, old.out_features, bias=False)
    groups = find_groups(model, ("heads",))
    assert [g.root for g in groups] == ["model.layers.0.self_attn"]
    assert any("model.layers.1.self_attn" in n and "q_proj (MyLinear)" in n for n in groups.notes)


def test_bad_targets_and_removing_everything_are_refused():
    with pytest.raises(ConfigError, match="targets"):
        find_groups(tiny_bert(), ("heads", "channels"))
    group = find_groups(tiny_bert(), ("heads",))[0]
    with pytest.raises(UnsupportedError, match="every head"):
        group.prune(torch.tensor([], dtype=torch.long))


# -- pruning equals removing the contribution --------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_heads_and_neurons_equals_zeroing_their_output_columns(arch, impl):
    model = tiny(arch)
    set_attention(model, impl)
    inputs = batch(arch)
    # Layer i loses head i and neurons i, i+3, i+6, ... (a third of them): different units per layer.
    reference = prune_and_reference(
        model, ("heads", "neurons"),
        lambda i, g: [i % g.units] if g.unit == "head" else list(range(i, g.units, 3)))
    assert torch.allclose(main_output(model, inputs), main_output(reference, inputs), atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(removed=st.sets(st.integers(0, 3), min_size=1, max_size=3), arch=st.sampled_from(["bert", "opt", "mistral"]))
def test_any_subset_of_heads_removed_matches_reference(removed, arch):
    model = tiny(arch)
    inputs = batch(arch)
    reference = prune_and_reference(model, ("heads",), lambda i, g: sorted(removed))
    assert torch.allclose(main_output(model, inputs), main_output(reference, inputs), atol=1e-5)


def test_gqa_pruning_keeps_query_groups_and_updates_shapes():
    model = tiny_causal_lm("llama")
    prune_and_reference(model, ("heads",), lambda i, g: [i])  # layer 0 drops kv head 0, layer 1 kv head 1
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.num_key_value_groups == 2 and attn.head_dim == 16  # n_rep unchanged
        assert attn.q_proj.weight.shape == (32, 64)  # 1 kv head x 2 query heads x 16
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 64)
        assert attn.o_proj.weight.shape == (64, 32)


def test_head_count_attributes_follow_and_are_recorded():
    bert = tiny_bert()
    prune_and_reference(bert, ("heads",), lambda i, g: [0, 2])
    sa = bert.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.attention_head_size) == (2, 32, 16)
    opt = tiny_causal_lm("opt")
    prune_and_reference(opt, ("heads",), lambda i, g: [1])
    assert opt.model.decoder.layers[1].self_attn.num_heads == 3
    from slimkit.pruning.resize import structure_of

    text = repr(structure_of(bert))
    assert "encoder.layer.1.attention.self" in text and "all_head_size" in text
    assert "num_heads" in repr(structure_of(opt))


def test_parameter_counts_by_hand():
    model = tiny_causal_lm("qwen2")  # q/k/v with bias, o without; 2 kv heads x 2 query heads of 16; hidden 64
    before = sum(p.numel() for p in model.parameters())
    prune_and_reference(model, ("heads", "neurons"), lambda i, g: [0] if g.unit == "head" else list(range(32)))
    after = sum(p.numel() for p in model.parameters())
    hidden, hd, n_rep, layers = 64, 16, 2, 2
    per_layer_heads = (n_rep * hd * (hidden + 1)  # q rows + bias
                       + 2 * hd * (hidden + 1)  # k and v rows + bias
                       + hidden * n_rep * hd)  # o columns (no bias)
    per_layer_neurons = 32 * 3 * hidden  # gate rows, up rows, down columns (no biases)
    assert before - after == layers * (per_layer_heads + per_layer_neurons)


def test_generate_with_cache_after_pruning_matches_reference():
    model = tiny_causal_lm("llama")
    reference = prune_and_reference(model, ("heads", "neurons"),
                                    lambda i, g: [i] if g.unit == "head" else list(range(0, 128, 2 + i)))
    prompt = token_batches(1, 6)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **kw), reference.generate(prompt, **kw))


# -- config and reload -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_uniform_pruning_updates_config_and_from_pretrained_rebuilds(arch, tmp_path):
    import transformers as tf

    model = tiny_causal_lm(arch)
    prune_and_reference(model, ("heads", "neurons"),
                        lambda i, g: [i % g.units] if g.unit == "head" else list(range(i, 128, 2)))
    n_kv = model.model.layers[0].self_attn.k_proj.out_features // 16
    n_rep = 4 // {"llama": 2, "qwen2": 2, "mistral": 4}[arch]
    notes = sync_config(model)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        n_kv * n_rep, n_kv, 16, 64)
    assert notes and notes[0].startswith("config:")
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    inputs = batch(arch)
    assert torch.allclose(main_output(reloaded, inputs), main_output(model, inputs), atol=1e-6)


def test_bert_config_takes_the_mlp_width_but_not_heads():
    model = tiny_bert()
    prune_and_reference(model, ("heads", "neurons"), lambda i, g: [1] if g.unit == "head" else list(range(64)))
    notes = sync_config(model)
    assert model.config.intermediate_size == 64  # uniform MLP width: expressible
    assert model.config.num_attention_heads == 4  # head size would become hidden / heads: kept, noted
    assert any("cannot express the pruned head counts" in n for n in notes)


def test_non_uniform_pruning_keeps_dense_config():
    model = tiny_causal_lm("llama")
    prune_and_reference(model, ("heads", "neurons"),
                        lambda i, g: ([0] if i == 0 else []) if g.unit == "head" else list(range(10 * (i + 1))))
    notes = sync_config(model)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert any("different head counts" in n for n in notes) and any("different MLP widths" in n for n in notes)


def _rebuild_through_resize(model: nn.Module, tmp_path) -> nn.Module:
    """Save weights + structure, rebuild the class from the saved config, resize to the file's shapes, load strict."""
    import json

    import transformers as tf
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    from slimkit.pruning.resize import resize_to_checkpoint, structure_of

    model.config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "w.safetensors"))  # drops tied duplicates; load_model restores them
    (tmp_path / "structure.json").write_text(json.dumps(structure_of(model)))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    fresh = type(model)(tf.AutoConfig.from_pretrained(tmp_path)).eval()
    resize_to_checkpoint(fresh, shapes, json.loads((tmp_path / "structure.json").read_text()))
    load_model(fresh, str(tmp_path / "w.safetensors"), strict=True)
    return fresh


@pytest.mark.parametrize("arch", ["bert", "llama", "opt"])
def test_non_uniform_pruning_reloads_through_resize(arch, tmp_path):
    model = tiny(arch)
    prune_and_reference(model, ("heads", "neurons"),
                        lambda i, g: list(range(min(i + 1, g.units - 1))) if g.unit == "head"
                        else list(range(0, g.units, 2 + i)))
    sync_config(model)
    fresh = _rebuild_through_resize(model, tmp_path)
    inputs = batch(arch)
    assert torch.allclose(main_output(fresh, inputs), main_output(model, inputs), atol=1e-6)


# -- the zoo's real causal LM ----------------------------------------------------------------------
def test_stdlib_coder_half_heads_and_neurons_runs_saves_and_reloads(tmp_path):
    import slimkit as sk
    from slimkit.core.measure import count_macs
    from slimkit.tasks.metrics import perplexity

    dense = sk.load("stdlib-coder")  # Llama: 6 layers, 8 query / 4 kv heads of 32, MLP 640
    model = copy.deepcopy(dense)
    sk.prune_(model, sk.StructuredPrune(ratio=0.5, importance="l2"))  # transformers default: heads + neurons
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 32, 320)
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in model.model.layers)
    ids = token_batches(2, 64, vocab=cfg.vocab_size)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ratio = count_macs(model, inputs) / count_macs(dense, inputs)
    # every block Linear halves; the LM head (256 x vocab, ~1/3 of the dense MACs here) does not
    assert 0.55 < ratio < 0.7, ratio  # measured 0.60
    text = torch.tensor(sk.tokenizer_of(model)("def add(a, b):\n    return a + b\n" * 12)["input_ids"])
    ppl = perplexity(model, text, context=64, stride=32).perplexity
    assert torch.isfinite(torch.tensor(ppl)) and ppl > perplexity(dense, text, context=64, stride=32).perplexity
    assert model.generate(text[:8].unsqueeze(0), max_new_tokens=8, do_sample=False).shape == (1, 16)
    # uniform pruning: the config alone rebuilds the model, so slimkit's own checkpoint reloads it
    sk.save(model, tmp_path / "pruned")
    again = sk.load(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
