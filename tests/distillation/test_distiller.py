"""Distiller, MutualDistiller, SelfDistiller: what reaches each loss, gradients, hooks, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.io import attach_info
from slimkit.distillation.distiller import Distiller, MutualDistiller, SelfDistiller
from slimkit.distillation.losses import CosineEmbeddingLoss, HintLoss, KDLoss, TokenKDLoss, kd_loss


def mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def batch(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_output_loss_is_kd_of_both_models_and_only_the_student_learns():
    teacher, student = mlp(16, 0), mlp(8, 1)
    x, y = batch()
    d = Distiller(teacher, student, KDLoss(temperature=3.0, alpha=0.4))
    out = d((x, y))
    expected = kd_loss(student(x), teacher(x), y, temperature=3.0, alpha=0.4)
    assert torch.allclose(out.loss, expected)
    assert set(out.parts) == {"KDLoss"} and torch.allclose(out.parts["KDLoss"], expected)
    out.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # The teacher is neither trained nor saved with the distiller.
    assert not any(k.startswith("teacher") for k in d.state_dict())
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in student.parameters()}


def test_teacher_stays_in_eval_mode_and_follows_dtype_moves():
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    d = Distiller(teacher, mlp(8, 1), KDLoss())
    d.train()
    assert d.student.training and not teacher.training
    d.double()
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    x, y = batch()
    # Dropout off in the teacher: two calls give the same teacher logits, hence the same loss.
    assert torch.equal(d((x.double(), y)).loss, d((x.double(), y)).loss)


def test_feature_pairs_add_a_projected_hint_term():
    teacher, student = mlp(16, 0), mlp(8, 1)
    x, y = batch()
    d = Distiller(teacher, student, KDLoss(), features={"1": ("1", HintLoss(student_dim=8, teacher_dim=16))})
    out = d((x, y))
    proj = d.feature_losses[0][0].projector
    hint = F.mse_loss(proj(F.relu(student[0](x))), F.relu(teacher[0](x)))
    assert torch.allclose(out.parts["HintLoss[1]"], hint)
    assert torch.allclose(out.loss, out.parts["KDLoss"] + hint)
    assert {id(p) for p in proj.parameters()} <= {id(p) for p in d.trainable_parameters()}


def test_each_pair_gets_its_own_copy_of_the_default_feature_loss():
    teacher, student = mlp(8, 0), mlp(8, 1)
    shared = HintLoss(student_dim=8, teacher_dim=4)
    d = Distiller(teacher, student, None, features={"0": "2", "1": "2"}, feature_loss=shared)
    a, b = d.feature_losses[0][0], d.feature_losses[1][0]
    assert a is not shared and b is not shared and a.projector is not b.projector
    out = d(batch())
    assert set(out.parts) == {"HintLoss[0]", "HintLoss[1]"}


def test_unknown_feature_name_lists_the_closest_names():
    with pytest.raises(ConfigError, match=r"student has no module named 'features\.7'.*did you mean 'features\.6'"):
        Distiller(small_cnn(), small_cnn(), KDLoss(), features={"features.7": "features.2"}, feature_loss=HintLoss())
    with pytest.raises(ConfigError, match="teacher has no module named 'nope'"):
        Distiller(mlp(8, 0), mlp(8, 1), KDLoss(), features={"0": "nope"}, feature_loss=HintLoss())


def test_width_mismatch_without_projector_names_the_pair():
    d = Distiller(mlp(16, 0), mlp(8, 1), KDLoss(), features={"1": "1"}, feature_loss=HintLoss())
    with pytest.raises(DataError, match=r"feature pair '1' -> '1'.*student_dim"):
        d(batch())


def test_same_module_as_teacher_and_student_is_refused():
    m = mlp(8, 0)
    with pytest.raises(ConfigError, match="same module"):
        Distiller(m, m, KDLoss())
    with pytest.raises(ConfigError, match="output loss"):
        Distiller(mlp(8, 0), mlp(8, 1))


def tiny_llama(vocab: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return attach_info(LlamaForCausalLM(cfg).eval(), kind="causal-lm")


def test_causal_lm_labels_default_to_the_input_ids_with_padding_ignored():
    teacher, student = tiny_llama(50, 2, 0), tiny_llama(50, 1, 1)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    d = Distiller(teacher, student, TokenKDLoss(alpha=1.0))
    out = d({"input_ids": ids, "attention_mask": mask})
    # alpha=1 is the plain next-token loss transformers computes from labels (padding as -100).
    labels = ids.masked_fill(mask == 0, -100)
    reference = student(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(out.loss, reference, atol=1e-5)


def test_vocabulary_mismatch_is_refused():
    with pytest.raises(DataError, match="vocabularies differ"):
        Distiller(tiny_llama(50, 2, 0), tiny_llama(60, 1, 1), TokenKDLoss())


def test_encoder_output_is_the_mean_pooled_embedding():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    teacher = attach_info(BertModel(cfg).eval(), kind="encoder")
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    d = Distiller(teacher, student, CosineEmbeddingLoss())
    assert d({"input_ids": ids, "attention_mask": mask}).loss.abs().item() < 1e-6  # same weights
    with torch.no_grad():
        student.encoder.layer[1].output.dense.weight.mul_(0.3)
    loss = d({"input_ids": ids, "attention_mask": mask}).loss
    hidden_s = student(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden_t = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled_s, pooled_t = (hidden_s * m).sum(1) / m.sum(1), (hidden_t * m).sum(1) / m.sum(1)
    assert torch.allclose(loss, (1 - F.cosine_similarity(pooled_s, pooled_t)).mean(), atol=1e-6)


def test_mutual_learning_trains_each_student_on_its_own_objective():
    students = [mlp(8, 0), mlp(8, 1), mlp(8, 2)]
    x, y = batch()
    loss = KDLoss(temperature=1.0, alpha=0.5)
    out = MutualDistiller(students, loss)((x, y))
    out.backward()
    # Student 0's objective alone: its KD against each (fixed) peer, averaged.
    ref = [mlp(8, i) for i in range(3)]
    z = [m(x) for m in ref]
    own = torch.stack([kd_loss(z[0], z[j].detach(), y, temperature=1.0, alpha=0.5) for j in (1, 2)]).mean()
    own.backward()
    for p, q in zip(students[0].parameters(), ref[0].parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert set(out.parts) == {"student0", "student1", "student2"}
    assert torch.allclose(out.loss, sum(out.parts.values()))


def test_mutual_learning_needs_two_distinct_students_and_labels():
    m = mlp(8, 0)
    with pytest.raises(ConfigError, match="at least 2"):
        MutualDistiller([m])
    with pytest.raises(ConfigError, match="separate"):
        MutualDistiller([m, m])
    with pytest.raises(DataError, match="labels"):
        MutualDistiller([mlp(8, 0), mlp(8, 1)])(batch()[0])


def small_cnn():
    from slimkit.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN({"channels": [4, 8], "pool_after": [0], "num_classes": 10})


def test_self_distillation_heads_learn_from_the_deepest_output_and_leave_the_model_alone():
    model = small_cnn()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    before = model(x).detach()
    sd = SelfDistiller(model, ["features.2"], KDLoss(temperature=3.0, alpha=0.3))
    with pytest.raises(ConfigError, match="prepare"):
        sd.trainable_parameters()
    sd.prepare((x, y))
    assert sd.heads["0"].fc.in_features == 4  # pooled width of block 0
    out = sd((x, y))
    logits = model(x)
    feat = model.features[:3](x)
    head = sd.heads["0"](feat)
    expected = F.cross_entropy(logits, y) + kd_loss(head, logits.detach(), y, temperature=3.0, alpha=0.3)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(model(x), before)  # wrapping does not change the deployed forward
    opt = torch.optim.SGD(sd.trainable_parameters(), lr=0.1)
    first = out.loss.item()
    for _ in range(20):
        opt.zero_grad()
        sd((x, y)).backward()
        opt.step()
    assert sd((x, y)).loss.item() < first
