"""Student builders: layer dropping against a state-dict-renaming reference, width shrinking, zoo defaults."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.core.io import attach_info, model_info, tokenizer_of
from slimkit.distillation.students import (
    describe_student,
    drop_layers,
    evenly_spaced,
    make_student,
    shrink_width,
)
from slimkit.zoo import load_zoo, minilm
from slimkit.zoo.digits import DigitsCNN

torch.set_num_threads(1)

needs_minilm = pytest.mark.skipif(not minilm.is_available(), reason="optional extra minilm not installed")
TOKENIZER = object()  # a stand-in tokenizer: only its identity matters here


def tiny_llama(layers: int = 4, seed: int = 0, **extra) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None, **extra)
    model = LlamaForCausalLM(cfg).eval()
    return attach_info(model, kind="causal-lm", source="tiny-llama", tokenizer=TOKENIZER)


def tiny_bert(cls_name: str = "BertModel", seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = getattr(transformers, cls_name)(cfg).eval()
    return attach_info(model, kind="encoder", source="tiny-bert", tokenizer=TOKENIZER)


def tokens(n: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_dropped(model: nn.Module, keep: list[int], layer_prefix: str) -> nn.Module:
    """The slow, obvious student: a fresh model of len(keep) layers loaded with renamed teacher tensors."""
    import copy

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [model.config.layer_types[i] for i in keep]
    fresh = type(model)(cfg).eval()
    new_of = {old: new for new, old in enumerate(keep)}
    renamed = {}
    pattern = re.compile(rf"^{re.escape(layer_prefix)}\.(\d+)\.(.*)$")
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m is None:
            renamed[key] = value
        elif int(m.group(1)) in new_of:
            renamed[f"{layer_prefix}.{new_of[int(m.group(1))]}.{m.group(2)}"] = value
    fresh.load_state_dict(renamed, strict=True)
    return fresh


def layer_idxs(layers: nn.ModuleList) -> list[list[int]]:
    return [[m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for layer in layers]


# -- evenly_spaced ---------------------------------------------------------------------------
def test_evenly_spaced_examples():
    assert evenly_spaced(6, 3) == [0, 2, 5]
    assert evenly_spaced(6, 2) == [0, 5]
    assert evenly_spaced(6, 1) == [5]
    assert evenly_spaced(6, 6) == [0, 1, 2, 3, 4, 5]
    assert evenly_spaced(12, 6) == [0, 2, 4, 6, 8, 11]
    assert evenly_spaced(1, 1) == [0]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_evenly_spaced_properties(case):
    n, k = case
    idx = evenly_spaced(n, k)
    assert len(idx) == k
    assert idx == sorted(set(idx))  # sorted and unique
    assert all(0 <= i < n for i in idx)
    assert idx[-1] == n - 1
    if k >= 2:
        assert idx[0] == 0
    # Spread: consecutive gaps differ by at most one (no clustering).
    gaps = [b - a for a, b in zip(idx, idx[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1


@pytest.mark.parametrize("n, k, message", [(6, 7, r"k=7 .* 6; choose k in 1\.\.6"), (6, 0, "k must be"),
                                           (0, 1, "n_layers must be"), (6, True, "k must be")])
def test_evenly_spaced_errors(n, k, message):
    with pytest.raises(ConfigError, match=message):
        evenly_spaced(n, k)


# -- drop_layers: decoders -----------------------------------------------------------------------
def test_drop_layers_llama_copies_chosen_layers_and_reindexes():
    teacher = tiny_llama()
    before = state(teacher)
    student = drop_layers(teacher, [1, 3])
    t_layers, s_layers = teacher.model.layers, student.model.layers
    assert len(s_layers) == 2 and student.config.num_hidden_layers == 2
    for new, old in enumerate([1, 3]):
        s_sd, t_sd = s_layers[new].state_dict(), t_layers[old].state_dict()
        assert s_sd.keys() == t_sd.keys()
        assert all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)
        assert s_layers[new] is not t_layers[old]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    assert layer_idxs(s_layers) == [[0], [1]]
    # Tensors are copies, not shared with the teacher.
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()
    # The teacher is unchanged: weights, config, cache indices.
    assert teacher.config.num_hidden_layers == 4 and len(t_layers) == 4
    assert layer_idxs(t_layers) == [[0], [1], [2], [3]]
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Kind, tokenizer (the same object) and a naming source.
    info = model_info(student)
    assert info["kind"] == "causal-lm" and info["source"] == "tiny-llama-2layer"
    assert tokenizer_of(student) is TOKENIZER
    assert not student.training
    assert all(p.requires_grad for p in student.parameters())


def test_drop_layers_llama_matches_renamed_state_dict_reference_and_generates():
    teacher = tiny_llama()
    student = drop_layers(teacher, [0, 2])
    reference = reference_dropped(teacher, [0, 2], "model.layers")
    x = tokens()
    with torch.no_grad():
        logits = student(input_ids=x).logits
        assert logits.shape == (2, 7, 64)
        torch.testing.assert_close(logits, reference(input_ids=x).logits, rtol=0, atol=0)
        # Dropping layers changes the function (else this test could not tell the layers apart).
        assert not torch.allclose(logits, teacher(input_ids=x).logits)
        # With the KV cache (indexed by layer_idx) generation matches the cache-free recomputation.
        cached = student.generate(x[:1], max_new_tokens=3, do_sample=False, use_cache=True)
        plain = student.generate(x[:1], max_new_tokens=3, do_sample=False, use_cache=False)
    assert cached.shape == (1, 10)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, reference.generate(x[:1], max_new_tokens=3, do_sample=False))


def test_drop_layers_keeping_all_layers_is_the_teacher():
    teacher = tiny_llama()
    student = drop_layers(teacher, [0, 1, 2, 3])
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=x).logits, teacher(input_ids=x).logits, rtol=0, atol=0)


def test_drop_layers_tied_embeddings_stay_tied_in_the_student():
    teacher = tiny_llama(tie_word_embeddings=True)
    student = drop_layers(teacher, [3])
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert student.lm_head.weight is not teacher.lm_head.weight


def test_drop_layers_qwen2_layer_types_follow_their_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, layer_types=types, use_sliding_window=True,
        sliding_window=4)).eval()
    student = drop_layers(teacher, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert teacher.config.layer_types == types
    assert [layer.self_attn.layer_type for layer in student.model.layers] == ["sliding_attention", "full_attention"]
    assert layer_idxs(student.model.layers) == [[0], [1]]
    reference = reference_dropped(teacher, [1, 2], "model.layers")
    x = tokens(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=x).logits, reference(input_ids=x).logits, rtol=0, atol=0)
        cached = student.generate(x, max_new_tokens=3, do_sample=False, use_cache=True)
        plain = student.generate(x, max_new_tokens=3, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12) and torch.equal(cached, plain)
    # Source falls back to the class name when the teacher has none.
    assert model_info(student)["source"] == "Qwen2ForCausalLM-2layer"


def test_drop_layers_renumbers_structured_pruning_records():
    from slimkit.pruning.resize import record_attributes, structure_of

    teacher = tiny_llama()
    record_attributes(teacher, "model.layers.1.self_attn", {"num_heads": 2})
    record_attributes(teacher, "model.layers.2.self_attn", {"num_heads": 3})
    record_attributes(teacher, "model.layers.3.mlp", {"intermediate_size": 5})
    student = drop_layers(teacher, [1, 3])
    assert structure_of(student) == {"model.layers.0.self_attn": {"num_heads": 2}, "model.layers.1.mlp": {"intermediate_size": 5}}
    assert "model.layers.2.self_attn" in structure_of(teacher)


# -- drop_layers: encoders -------------------------------------------------------------------------
def test_drop_layers_bert():
    teacher = tiny_bert()
    before = state(teacher)
    student = drop_layers(teacher, [0, 3])
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    for new, old in enumerate([0, 3]):
        s_sd, t_sd = student.encoder.layer[new].state_dict(), teacher.encoder.layer[old].state_dict()
        assert all(torch.equal(s_sd[k], t_sd[k]) for k in t_sd)
    assert torch.equal(student.pooler.dense.weight, teacher.pooler.dense.weight)
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert layer_idxs(student.encoder.layer) == [[0], [1]]
    assert layer_idxs(teacher.encoder.layer) == [[0], [1], [2], [3]]
    reference = reference_dropped(teacher, [0, 3], "encoder.layer")
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 5:] = 0  # padding on one row exercises the attention mask path
    with torch.no_grad():
        out = student(input_ids=x, attention_mask=mask)
        assert out.last_hidden_state.shape == (2, 7, 32)
        torch.testing.assert_close(out.last_hidden_state, reference(input_ids=x, attention_mask=mask)
                                   .last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(out.pooler_output, reference(input_ids=x, attention_mask=mask).pooler_output,
                                   rtol=0, atol=0)
        full = drop_layers(teacher, [0, 1, 2, 3])
        torch.testing.assert_close(full(input_ids=x).last_hidden_state, teacher(input_ids=x).last_hidden_state,
                                   rtol=0, atol=0)
    after = teacher.state_dict()
    assert teacher.config.num_hidden_layers == 4 and all(torch.equal(before[k], after[k]) for k in before)
    assert model_info(student)["kind"] == "encoder" and tokenizer_of(student) is TOKENIZER


def test_drop_layers_bert_through_a_wrapper():
    teacher = tiny_bert("BertForSequenceClassification")
    student = drop_layers(teacher, [1, 2])
    assert type(student).__name__ == "BertForSequenceClassification"
    assert len(student.bert.encoder.layer) == 2 and len(teacher.bert.encoder.layer) == 4
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.bert.encoder.layer[0].output.dense.weight,
                       teacher.bert.encoder.layer[1].output.dense.weight)
    reference = reference_dropped(teacher, [1, 2], "bert.encoder.layer")
    x = tokens()
    with torch.no_grad():
        logits = student(input_ids=x).logits
        assert logits.shape == (2, 3)
        torch.testing.assert_close(logits, reference(input_ids=x).logits, rtol=0, atol=0)


# -- drop_layers: errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("keep, message", [
    ([], r"keep is empty; list at least one layer index in 0\.\.3"),
    ([1, 1], "lists layer 1 more than once"),
    ([0, 4], r"layer index 4 is out of range; the model has 4 layers, valid indices are 0\.\.3"),
    ([-1], r"valid indices are 0\.\.3"),
    ([2, 1], r"increasing order .* use \[1, 2\]"),
    ([0, 1.0], "int layer indices"),
    ("01", "list of layer indices"),
])
def test_drop_layers_bad_keep(keep, message):
    teacher = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        drop_layers(teacher, keep)
    assert len(teacher.model.layers) == 4


def test_drop_layers_unknown_model():
    with pytest.raises(UnsupportedError, match=r"does not know Sequential; supported: .*Llama.*BERT.*DigitsCNN"):
        drop_layers(nn.Sequential(nn.Linear(2, 2)), [0])
    from tests.llm_archs import tiny_causal_lm

    with pytest.raises(UnsupportedError, match="OPTForCausalLM"):  # layers at model.decoder.layers
        drop_layers(tiny_causal_lm("opt"), [0])


# -- drop_layers: DigitsCNN -----------------------------------------------------------------------------
def test_drop_layers_digits_copies_where_shapes_match():
    torch.manual_seed(3)
    teacher = attach_info(DigitsCNN({"channels": [4, 6, 8], "pool_after": [0, 1], "num_classes": 5}).eval(),
                          kind="classifier", source="toy-cnn")
    with torch.no_grad():  # non-default BN statistics, so copying them is observable
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    before = state(teacher)
    t_convs = [m for m in teacher.features if isinstance(m, nn.Conv2d)]
    t_bns = [m for m in teacher.features if isinstance(m, nn.BatchNorm2d)]

    student = drop_layers(teacher, [0, 2])
    assert student.arch_config() == {"channels": [4, 8], "pool_after": [0], "num_classes": 5}
    s_convs = [m for m in student.features if isinstance(m, nn.Conv2d)]
    s_bns = [m for m in student.features if isinstance(m, nn.BatchNorm2d)]
    assert torch.equal(s_convs[0].weight, t_convs[0].weight)  # first block: same input width
    assert s_convs[1].weight.shape == (8, 4, 3, 3)  # its input is 4 channels now, not 6: fresh init
    for s, t in zip(s_bns, [t_bns[0], t_bns[2]]):
        assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values()))
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)  # last block kept
    assert student(torch.rand(3, 1, 8, 8)).shape == (3, 5)
    assert model_info(student) == {"kind": "classifier", "source": "toy-cnn-2block", "steps": [],
                                   "defaults": {"corpus": "digits", "input_shape": [1, 8, 8]}}

    consecutive = drop_layers(teacher, [1, 2])
    c_convs = [m for m in consecutive.features if isinstance(m, nn.Conv2d)]
    assert c_convs[0].weight.shape == (6, 1, 3, 3)  # block 1 now reads the image: fresh
    assert torch.equal(c_convs[1].weight, t_convs[2].weight)  # predecessor kept: copied
    head_dropped = drop_layers(teacher, [0, 1])
    assert head_dropped.classifier.weight.shape == (5, 6)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match=r"block index 3 is out of range; the model has 3 blocks"):
        drop_layers(teacher, [3])


# -- shrink_width -------------------------------------------------------------------------------------------
def test_shrink_width_llama():
    teacher = tiny_llama()
    student = shrink_width(teacher, 0.5, seed=3)
    cfg = student.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 32, 2, 1)
    assert cfg.head_dim == teacher.config.head_dim == 8
    assert cfg.vocab_size == 64 and cfg.num_hidden_layers == 4
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (16, 16)
    assert student.model.layers[0].self_attn.k_proj.weight.shape == (8, 16)
    assert student.lm_head.weight.shape == (64, 16)
    with torch.no_grad():
        assert student(input_ids=tokens()).logits.shape == (2, 7, 64)
    assert teacher.config.hidden_size == 32  # the teacher's config is not touched
    # Seeded: same seed -> same weights, another seed -> different ones; the global RNG is left alone.
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = shrink_width(teacher, 0.5, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    other = shrink_width(teacher, 0.5, seed=4)
    assert not torch.equal(other.lm_head.weight, student.lm_head.weight)
    info = model_info(student)
    assert info["kind"] == "causal-lm" and info["source"] == "tiny-llama-w0.5" and info["steps"] == []
    assert tokenizer_of(student) is TOKENIZER


def test_shrink_width_bert():
    teacher = tiny_bert()
    student = shrink_width(teacher, 0.5)
    cfg = student.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (16, 32, 2)
    assert student.encoder.layer[0].attention.self.attention_head_size == 8  # head_dim kept
    assert cfg.vocab_size == 64
    with torch.no_grad():
        assert student(input_ids=tokens()).last_hidden_state.shape == (2, 7, 16)
    assert model_info(student)["kind"] == "encoder" and tokenizer_of(student) is TOKENIZER


def test_shrink_width_full_ratio_keeps_sizes_and_reinitialises():
    teacher = tiny_llama(seed=0)
    student = shrink_width(teacher, 1.0, seed=7)
    assert student.config.hidden_size == 32 and student.config.num_key_value_heads == 2
    assert student.state_dict().keys() == teacher.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert not torch.equal(student.lm_head.weight, teacher.lm_head.weight)


@settings(max_examples=25, deadline=None)
@given(heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3), (8, 2), (8, 4), (12, 4)]),
       head_dim=st.sampled_from([2, 4]), ratio=st.floats(0.05, 1.0))
def test_shrink_width_head_counts_property(heads_kv, head_dim, ratio):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv = heads_kv
    with torch.device("meta"):  # shapes only: no memory, no init cost
        teacher = LlamaForCausalLM(LlamaConfig(
            vocab_size=16, hidden_size=heads * head_dim, intermediate_size=3 * heads, num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim))
    cfg = _shrink_meta(teacher, ratio).config
    want_heads = max(1, int(heads * ratio + 0.5))
    assert cfg.num_attention_heads == want_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert 1 <= cfg.num_key_value_heads <= cfg.num_attention_heads
    assert abs(cfg.num_key_value_heads - max(1, int(kv * ratio + 0.5))) <= max(1, cfg.num_attention_heads // 2)
    assert cfg.head_dim == head_dim and cfg.hidden_size == want_heads * head_dim
    assert cfg.intermediate_size == max(1, int(3 * heads * ratio + 0.5))
    assert cfg.vocab_size == 16


def _shrink_meta(teacher: nn.Module, ratio: float) -> nn.Module:
    with torch.device("meta"):
        return shrink_width(teacher, ratio)


def test_shrink_width_digits():
    teacher = load_zoo("digits-cnn")
    student = shrink_width(teacher, 0.3, seed=1)
    assert student.arch_config() == {"channels": [10, 19, 38], "pool_after": [0, 1], "num_classes": 10}
    assert [m.out_channels for m in student.features if isinstance(m, nn.Conv2d)] == [10, 19, 38]
    assert student(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    tiny = shrink_width(teacher, 0.01)
    assert tiny.arch_config()["channels"] == [1, 1, 1]  # at least one channel each
    assert model_info(student)["source"] == "digits-cnn-w0.3" and model_info(student)["kind"] == "classifier"
    again = shrink_width(teacher, 0.3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, True, "0.5", None])
def test_shrink_width_bad_ratio(ratio):
    with pytest.raises(ConfigError, match=r"0 < ratio <= 1"):
        shrink_width(tiny_llama(layers=1), ratio)


def test_shrink_width_unknown_model():
    with pytest.raises(UnsupportedError, match="does not know Linear"):
        shrink_width(nn.Linear(3, 3), 0.5)


# -- make_student -------------------------------------------------------------------------------------------
def test_make_student_layers_and_width():
    teacher = tiny_llama()
    by_count = make_student(teacher, layers=2)  # evenly_spaced(4, 2) = [0, 3]
    assert torch.equal(by_count.model.layers[1].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(by_count.model.layers[0].mlp.down_proj.weight, teacher.model.layers[0].mlp.down_proj.weight)
    by_list = make_student(teacher, layers=[1, 2])
    assert torch.equal(by_list.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    narrow = make_student(teacher, width=0.5, seed=5)
    assert narrow.config.hidden_size == 16 and narrow.config.num_hidden_layers == 4
    assert torch.equal(narrow.lm_head.weight, shrink_width(teacher, 0.5, seed=5).lm_head.weight)
    both = make_student(teacher, layers=2, width=0.5)
    assert both.config.num_hidden_layers == 2 and len(both.model.layers) == 2 and both.config.hidden_size == 16
    assert model_info(both)["source"] == "tiny-llama-w0.5-2layer"
    with torch.no_grad():
        assert both(input_ids=tokens()).logits.shape == (2, 7, 64)
    with pytest.raises(ConfigError, match="layers= must be a layer count"):
        make_student(teacher, layers=[0, 1], width=0.5)
    with pytest.raises(ConfigError, match=r"k=5 .* choose k in 1\.\.4"):
        make_student(teacher, layers=5)
    with pytest.raises(ConfigError, match=r"0 < ratio <= 1"):
        make_student(teacher, width=2)


def test_make_student_default_unknown_source():
    with pytest.raises(ConfigError, match=r"no default student for a model from 'tiny-llama'.*pass layers=.*width="):
        make_student(tiny_llama())


def test_make_student_default_digits():
    teacher = load_zoo("digits-cnn")
    student = make_student(teacher, seed=2)
    assert isinstance(student, DigitsCNN)
    assert student.arch_config() == {"channels": [8, 16, 32], "pool_after": [0, 1], "num_classes": 10}
    assert [m.out_channels for m in student.features if isinstance(m, nn.Conv2d)] == [8, 16, 32]
    assert model_info(student) == {"kind": "classifier", "source": "digits-cnn-small", "steps": [],
                                   "defaults": {"corpus": "digits", "input_shape": [1, 8, 8]}}
    assert student(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    again = make_student(teacher, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    assert describe_student(teacher, student) == \
        f"3 of 3 blocks, channels [8, 16, 32], {_k(student)} of {_k(teacher)} params"
    # Layer dropping works on the real model too.
    two = make_student(teacher, layers=2)
    assert two.arch_config()["channels"] == [32, 128]


def _k(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e3:.1f}K"


def test_make_student_default_stdlib_coder():
    from slimkit.zoo.stdlib_coder import coder_config

    teacher = load_zoo("stdlib-coder")
    student = make_student(teacher)
    want = coder_config(student=True).to_dict()
    got = student.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert got[key] == want[key], key
    assert type(student).__name__ == "LlamaForCausalLM"
    assert tokenizer_of(student) is tokenizer_of(teacher)
    assert model_info(student)["kind"] == "causal-lm" and model_info(student)["source"] == "stdlib-coder-student"
    # Seed 0 gives exactly the zoo's stdlib-coder-student weights.
    zoo_student = load_zoo("stdlib-coder-student")
    zs = zoo_student.state_dict()
    assert all(torch.equal(v, zs[k]) for k, v in student.state_dict().items())
    assert not torch.equal(make_student(teacher, seed=1).lm_head.weight, student.lm_head.weight)
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    assert describe_student(teacher, student) == \
        f"2 of 6 layers, hidden 192, {n_s / 1e6:.1f}M of {n_t / 1e6:.1f}M params"
    assert describe_student(teacher, student).endswith("of 6.2M params")


@needs_minilm
def test_make_student_default_minilm():
    teacher = load_zoo("minilm")
    student = make_student(teacher)
    assert len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    for new, old in enumerate([0, 2, 5]):
        assert torch.equal(student.encoder.layer[new].attention.self.query.weight,
                           teacher.encoder.layer[old].attention.self.query.weight)
    assert len(teacher.encoder.layer) == 6
    assert model_info(student)["source"] == "minilm-3layer" and model_info(student)["kind"] == "encoder"
    assert tokenizer_of(student) is tokenizer_of(teacher)
    emb = minilm.embed(student, tokenizer_of(student), ["def open a file", "a sunny day"])
    assert emb.shape == (2, 384)


def test_describe_student_tiny():
    teacher = tiny_llama()
    student = drop_layers(teacher, [0, 3])
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert describe_student(teacher, student) == \
        f"2 of 4 layers, hidden 32, {n_s / 1e3:.1f}K of {n_t / 1e3:.1f}K params"
    assert describe_student(nn.Linear(10, 10), nn.Linear(2, 2)) == "6 of 110 params"
