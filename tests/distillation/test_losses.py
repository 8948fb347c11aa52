"""slimkit.distillation.losses against slow float64 references written with explicit loops."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError, DataError
from slimkit.distillation.losses import (
    AttentionTransferLoss,
    CosineEmbeddingLoss,
    HintLoss,
    KDLoss,
    RKDLoss,
    SimilarityLoss,
    TokenKDLoss,
    angle_potential,
    at_loss,
    attention_map,
    kd_loss,
    pairwise_distance_potential,
    rkd_angle,
    rkd_distance,
    similarity_matrix,
    softmax_kl,
    token_divergence,
    token_kd_loss,
)

# --- slow references (python floats, explicit loops) ------------------------------------------


def log_softmax_ref(row: list[float], temperature: float = 1.0) -> list[float]:
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def kl_ref(target_row: list[float], input_row: list[float], temperature: float = 1.0) -> float:
    """KL(softmax(target/T) ‖ softmax(input/T))."""
    lp, lq = log_softmax_ref(target_row, temperature), log_softmax_ref(input_row, temperature)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def kd_reference(s, t, labels, mask, temperature, alpha):
    """Hinton KD over rows (leading axes flattened), mask excluding rows, -100 labels ignored in CE."""
    c = s.shape[-1]
    s_rows, t_rows = s.double().reshape(-1, c).tolist(), t.double().reshape(-1, c).tolist()
    keep = [True] * len(s_rows) if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
    kd_sum = kd_n = ce_sum = ce_n = 0.0
    for r in range(len(s_rows)):
        if not keep[r]:
            continue
        kd_sum += kl_ref(t_rows[r], s_rows[r], temperature)
        kd_n += 1
        if labels is not None:
            y = int(labels.reshape(-1)[r])
            if y != -100:
                ce_sum -= log_softmax_ref(s_rows[r])[y]
                ce_n += 1
    kd = temperature**2 * kd_sum / max(kd_n, 1)
    if labels is None:
        return kd
    return alpha * ce_sum / max(ce_n, 1) + (1 - alpha) * kd


def token_reference(s, t, labels, mask, divergence, temperature, alpha, beta):
    """Per-token loop: position i predicts token i+1; counted when both are real and the label is not -100."""
    b, length, _ = s.shape
    s, t = s.double().tolist(), t.double().tolist()
    d_sum = ce_sum = n = 0.0
    for bi in range(b):
        for i in range(length - 1):
            if mask is not None and not (mask[bi, i] and mask[bi, i + 1]):
                continue
            if labels is not None and int(labels[bi, i + 1]) == -100:
                continue
            fwd = kl_ref(t[bi][i], s[bi][i], temperature)
            rev = kl_ref(s[bi][i], t[bi][i], temperature)
            d_sum += {"forward": fwd, "reverse": rev, "mix": beta * fwd + (1 - beta) * rev}[divergence]
            if labels is not None:
                ce_sum -= log_softmax_ref(s[bi][i])[int(labels[bi, i + 1])]
            n += 1
    kd = temperature**2 * d_sum / max(n, 1)
    if labels is None:
        return kd
    return alpha * ce_sum / max(n, 1) + (1 - alpha) * kd


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def distance_potential_ref(x: torch.Tensor) -> list[list[float]]:
    rows = x.double().reshape(x.shape[0], -1).tolist()
    n = len(rows)
    d = [[dist(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    nonzero = [d[i][j] for i in range(n) for j in range(n) if i != j and d[i][j] > 0]
    mu = sum(nonzero) / len(nonzero)
    return [[d[i][j] / mu for j in range(n)] for i in range(n)]


def angle_potential_ref(x: torch.Tensor) -> list[list[list[float]]]:
    rows = x.double().reshape(x.shape[0], -1).tolist()
    n = len(rows)
    out = [[[0.0] * n for _ in range(n)] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if i == j or k == j:
                    continue
                u = [a - b for a, b in zip(rows[i], rows[j])]
                v = [a - b for a, b in zip(rows[k], rows[j])]
                dot = sum(a * b for a, b in zip(u, v))
                out[i][j][k] = dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))
    return out


def huber_ref(a: list[float], b: list[float]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        e = abs(x - y)
        total += 0.5 * e * e if e < 1 else e - 0.5
    return total / len(a)


def flat(nested) -> list[float]:
    if isinstance(nested, list):
        return [v for item in nested for v in flat(item)]
    return [nested]


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# --- KD ---------------------------------------------------------------------------------------


def test_kd_loss_matches_reference_for_rows():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4, -100, 2, 1, -100])
    for temperature, alpha in [(1.0, 0.5), (4.0, 0.3), (2.5, 0.0)]:
        got = kd_loss(s, t, labels, temperature=temperature, alpha=alpha)
        assert got.shape == ()
        assert got.item() == pytest.approx(kd_reference(s, t, labels, None, temperature, alpha), rel=1e-10)


def test_kd_loss_matches_reference_for_sequences_with_mask_and_ignored_labels():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 7, dtype=torch.float64), torch.randn(2, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[3, -100, 6, 0], [1, 2, -100, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = KDLoss(temperature=3.0, alpha=0.4)(s, t, labels, mask)
    want = kd_reference(s, t, labels, mask, 3.0, 0.4)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # the mask matters: without it the loss is different
    assert KDLoss(3.0, 0.4)(s, t, labels).item() != pytest.approx(want, rel=1e-6)
    # masked rows can hold garbage
    s2, t2 = s.clone(), t.clone()
    s2[0, 3], t2[1, 2:] = 1e4, -1e4
    assert KDLoss(3.0, 0.4)(s2, t2, labels, mask.bool()).item() == pytest.approx(want, rel=1e-10)


def test_kd_loss_without_labels_is_the_kd_term_alone():
    torch.manual_seed(2)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    want = 4.0**2 * sum(kl_ref(t[r].tolist(), s[r].tolist(), 4.0) for r in range(5)) / 5
    assert kd_loss(s, t, temperature=4.0, alpha=0.7).item() == pytest.approx(want, rel=1e-10)
    # and equals torch's documented batchmean form
    torch_form = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
    assert kd_loss(s, t, temperature=4.0).item() == pytest.approx(torch_form.item(), rel=1e-10)
    with pytest.raises(DataError, match="alpha=1.*needs labels"):
        kd_loss(s, t, temperature=4.0, alpha=1.0)


def test_kd_alpha_one_is_plain_cross_entropy():
    torch.manual_seed(3)
    s, t = torch.randn(8, 6), torch.randn(8, 6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, 2])
    got = KDLoss(temperature=7.0, alpha=1.0)(s, t, labels)
    assert torch.allclose(got, F.cross_entropy(s, labels), rtol=1e-6, atol=0)


def test_t_squared_keeps_the_gradient_size_independent_of_temperature():
    torch.manual_seed(4)
    s0, t = torch.randn(16, 10), torch.randn(16, 10)
    norms = []
    for temperature in (20.0, 100.0, 500.0):
        s = s0.clone().requires_grad_()
        kd_loss(s, t, temperature=temperature, alpha=0.0).backward()
        norms.append(s.grad.norm().item())
    assert norms[0] > 0
    # Without T² the gradient would fall as 1/T² (625× between T=20 and T=500); with it, it levels off.
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.02)
    assert norms[2] / norms[0] == pytest.approx(1.0, abs=0.02)
    # Its large-T limit is (z_s − z_t − row mean) / (C·N): Hinton's "matching logits" regime.
    centered = (s0 - t) - (s0 - t).mean(1, keepdim=True)
    assert norms[2] == pytest.approx((centered / (10 * 16)).norm().item(), rel=0.01)


def test_teacher_gets_no_gradient_and_identical_logits_have_zero_kd():
    torch.manual_seed(5)
    s = torch.randn(4, 3, 9, requires_grad=True)
    t = torch.randn(4, 3, 9, requires_grad=True)
    for loss_fn in (KDLoss(), TokenKDLoss(divergence="mix", alpha=0.0)):
        loss = loss_fn(s, t)
        loss.backward()
        assert t.grad is None
        assert s.grad is not None and s.grad.abs().sum() > 0
        s.grad = None
    same = s.detach().clone()
    assert KDLoss(temperature=2.0, alpha=0.0)(same, same.clone()).item() == 0.0
    assert TokenKDLoss(divergence="reverse")(same, same.clone()).item() == 0.0
    # with labels and identical logits only the CE term is left
    labels = torch.randint(0, 9, (4, 3))
    got = KDLoss(temperature=2.0, alpha=0.25)(same, same.clone(), labels)
    assert got.item() == pytest.approx(0.25 * F.cross_entropy(same.reshape(-1, 9), labels.reshape(-1)).item(),
                                       rel=1e-6)


def test_kd_shape_and_label_errors_name_the_shapes():
    with pytest.raises(DataError, match=r"\(4, 5\).*\(4, 6\)"):
        kd_loss(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(DataError, match="labels of shape"):
        kd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match=r"\[0, 5\)"):
        kd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 5, 2]))
    with pytest.raises(DataError, match="mask of shape"):
        kd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), mask=torch.ones(2, 4))


def test_kd_all_rows_masked_is_zero_and_still_backpropagates():
    s = torch.randn(2, 3, 4, requires_grad=True)
    loss = kd_loss(s, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), alpha=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_half_precision_inputs_give_a_float32_loss():
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    want = kd_loss(s, t)
    for dtype in (torch.bfloat16, torch.float16):
        got = kd_loss(s.to(dtype), t.to(dtype))
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(kd_loss(s.to(dtype).float(), t.to(dtype).float()).item(), rel=1e-6)
        assert got.item() == pytest.approx(want.item(), rel=0.05)
        assert TokenKDLoss()(s.to(dtype), t.to(dtype)).dtype == torch.float32
        assert HintLoss()(s.to(dtype), t.to(dtype)).dtype == torch.float32


@pytest.mark.parametrize("make, match", [
    (lambda: KDLoss(temperature=0), "temperature must be > 0"),
    (lambda: KDLoss(temperature=float("nan")), "temperature must be a finite number"),
    (lambda: KDLoss(alpha=1.5), "alpha must be in"),
    (lambda: KDLoss(alpha=True), "alpha must be a finite number"),
    (lambda: TokenKDLoss(beta=-0.1), "beta must be in"),
    (lambda: TokenKDLoss(divergence="revers"), "did you mean 'reverse'"),
    (lambda: TokenKDLoss(temperature=-1.0), "temperature"),
    (lambda: AttentionTransferLoss(beta=0), "beta must be > 0"),
    (lambda: AttentionTransferLoss(p=0.5), "p must be >= 1"),
    (lambda: RKDLoss(distance_weight=-1), "distance_weight must be >= 0"),
    (lambda: RKDLoss(distance_weight=0, angle_weight=0), "both 0"),
    (lambda: HintLoss(student_dim=8), "pass both student_dim and teacher_dim"),
    (lambda: HintLoss(student_dim=0, teacher_dim=4), "student_dim must be a positive integer"),
    (lambda: CosineEmbeddingLoss(student_dim=4, teacher_dim=2.5), "teacher_dim must be a positive integer"),
])
def test_bad_hyper_parameters_raise_config_error_naming_the_argument(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


# --- token-level KD ---------------------------------------------------------------------------


def token_batch(seed: int = 7, vocab: int = 6):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])  # right padding, then left padding
    labels = torch.tensor([[2, 5, -100, 1, -100], [-100, 0, 3, 4, 2]])
    return s, t, labels, mask


@pytest.mark.parametrize("divergence", ["forward", "reverse", "mix"])
def test_token_kd_matches_per_token_loop(divergence):
    s, t, labels, mask = token_batch()
    for temperature, alpha, beta in [(1.0, 0.0, 0.5), (2.0, 0.3, 0.2)]:
        loss = TokenKDLoss(divergence, temperature, alpha, beta)
        got = loss(s, t, labels, mask)
        want = token_reference(s, t, labels, mask, divergence, temperature, alpha, beta)
        assert got.item() == pytest.approx(want, rel=1e-10)
        got = loss(s, t, None, mask)
        want = token_reference(s, t, None, mask, divergence, temperature, alpha, beta)
        assert got.item() == pytest.approx(want, rel=1e-10)


def test_token_kd_ignores_padding_logits():
    s, t, labels, mask = token_batch()
    loss = TokenKDLoss("mix", temperature=2.0, alpha=0.5, beta=0.3)
    base = loss(s, t, labels, mask)
    s2, t2 = s.clone(), t.clone()
    # padding positions, and the last real position of the right-padded row (it predicts padding)
    s2[0, 3:], t2[0, 3:] = torch.randn(2, 6) * 1e3, -torch.randn(2, 6) * 1e3
    s2[1, 0], t2[1, 0] = 1e4, -1e4
    s2[:, -1], t2[:, -1] = 777.0, -777.0  # the last position predicts nothing
    assert loss(s2, t2, labels, mask).item() == pytest.approx(base.item(), rel=1e-12)


def test_reverse_kl_is_kl_of_student_to_teacher():
    s, t, _, _ = token_batch(vocab=4)
    got = token_divergence(s, t, "reverse", temperature=1.5)
    assert got.shape == (2, 5)
    for b in range(2):
        for i in range(5):
            assert got[b, i].item() == pytest.approx(kl_ref(s[b, i].tolist(), t[b, i].tolist(), 1.5), rel=1e-10)
            assert got[b, i].item() != pytest.approx(kl_ref(t[b, i].tolist(), s[b, i].tolist(), 1.5), rel=1e-4)


def test_mix_interpolates_forward_and_reverse():
    s, t, labels, mask = token_batch()
    fwd = TokenKDLoss("forward", 2.0)(s, t, labels, mask)
    rev = TokenKDLoss("reverse", 2.0)(s, t, labels, mask)
    assert TokenKDLoss("mix", 2.0, beta=1.0)(s, t, labels, mask).item() == pytest.approx(fwd.item(), rel=1e-12)
    assert TokenKDLoss("mix", 2.0, beta=0.0)(s, t, labels, mask).item() == pytest.approx(rev.item(), rel=1e-12)
    mid = TokenKDLoss("mix", 2.0, beta=0.25)(s, t, labels, mask)
    assert mid.item() == pytest.approx(0.25 * fwd.item() + 0.75 * rev.item(), rel=1e-12)


def test_token_alpha_one_is_the_transformers_shifted_cross_entropy():
    s, t, labels, _ = token_batch()
    # right padding with -100 labels on the padding, as transformers' collators produce
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = labels.clone()
    labels[1, 0] = 5  # position 0 is never predicted: its label must not matter
    got = TokenKDLoss(alpha=1.0)(s, t, labels, mask)
    want = F.cross_entropy(s[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert TokenKDLoss(alpha=1.0)(s, t, labels).item() == pytest.approx(want.item(), rel=1e-12)
    # left padding: a pad position does not predict the first real token (transformers would count it)
    _, _, labels, mask = token_batch()
    shifted = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    want = F.cross_entropy(s[:, :-1].reshape(-1, 6), shifted.reshape(-1), ignore_index=-100)
    assert TokenKDLoss(alpha=1.0)(s, t, labels, mask).item() == pytest.approx(want.item(), rel=1e-12)


def test_token_alpha_one_equals_llama_for_causal_lm_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(8)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100  # an unlabelled prompt
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    got = token_kd_loss(out.logits, out.logits, labels, alpha=1.0)
    assert got.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_token_kd_shape_errors():
    with pytest.raises(DataError, match=r"student vocabulary size 6 != teacher vocabulary size 8.*share a tokenizer"):
        TokenKDLoss()(torch.randn(2, 4, 6), torch.randn(2, 4, 8))
    with pytest.raises(DataError, match=r"\(2, 4, 6\).*\(2, 5, 6\)"):
        TokenKDLoss()(torch.randn(2, 4, 6), torch.randn(2, 5, 6))
    with pytest.raises(DataError, match=r"\(batch, seq_len, vocab\)"):
        TokenKDLoss()(torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(DataError, match="mask of shape"):
        TokenKDLoss()(torch.randn(2, 4, 6), torch.randn(2, 4, 6), mask=torch.ones(2, 3))


def test_token_kd_with_nothing_to_predict_is_zero():
    s = torch.randn(2, 1, 5, requires_grad=True)
    loss = TokenKDLoss(alpha=0.5)(s, torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


# --- hint (FitNets) ---------------------------------------------------------------------------


def test_hint_identity_is_mse():
    torch.manual_seed(9)
    for shape in [(4, 8), (2, 3, 8), (2, 8, 3, 3)]:
        s, t = torch.randn(shape), torch.randn(shape)
        loss = HintLoss()
        assert not loss.has_projector and loss.projector is None
        assert torch.allclose(loss(s, t), F.mse_loss(s, t), rtol=1e-6, atol=0)
        assert not HintLoss(student_dim=8, teacher_dim=8).has_projector


def test_hint_projector_is_a_1x1_conv_on_maps_and_a_linear_on_sequences():
    torch.manual_seed(10)
    loss = HintLoss(student_dim=3, teacher_dim=5)
    assert loss.has_projector and isinstance(loss.projector, torch.nn.Linear)
    conv = torch.nn.Conv2d(3, 5, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(loss.projector.weight[:, :, None, None])
        conv.bias.copy_(loss.projector.bias)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert torch.allclose(loss(s, t), F.mse_loss(conv(s), t), rtol=1e-5, atol=0)
    s, t = torch.randn(2, 6, 3), torch.randn(2, 6, 5)
    assert torch.allclose(loss(s, t), F.mse_loss(loss.projector(s), t), rtol=1e-6, atol=0)


def test_hint_projector_trains():
    torch.manual_seed(11)
    loss = HintLoss(student_dim=4, teacher_dim=6)
    params = list(loss.parameters())
    assert params and all(p.requires_grad for p in params)
    s = torch.randn(32, 4)
    t = s @ torch.randn(4, 6)  # reachable by a linear map
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    first = loss(s, t).item()
    for _ in range(30):
        opt.zero_grad()
        value = loss(s, t)
        value.backward()
        opt.step()
    assert loss(s, t).item() < 0.5 * first


def test_hint_mismatch_errors():
    with pytest.raises(DataError, match=r"pass HintLoss\(student_dim=4, teacher_dim=6\)"):
        HintLoss()(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3))
    with pytest.raises(DataError, match="not resized"):
        HintLoss()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 5, 5))
    with pytest.raises(DataError, match="not resized"):
        HintLoss(student_dim=4, teacher_dim=6)(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 5, 5))
    with pytest.raises(DataError, match="student_dim=4; pass student_dim=5"):
        HintLoss(student_dim=4, teacher_dim=6)(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(DataError, match="teacher_dim=6; pass teacher_dim=7"):
        HintLoss(student_dim=4, teacher_dim=6)(torch.randn(2, 4), torch.randn(2, 7))


def test_hint_teacher_detached():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 6, requires_grad=True)
    HintLoss(4, 6)(s, t).backward()
    assert t.grad is None and s.grad is not None


# --- attention transfer -----------------------------------------------------------------------


def test_attention_map_by_hand():
    # (N=1, C=2, H=1, W=2): Σ_c F² = [1 + 9, 4 + 0] = [10, 4], normalized by √116
    feat = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    got = attention_map(feat)
    assert got.shape == (1, 2)
    assert torch.allclose(got, torch.tensor([[10.0, 4.0]]) / math.sqrt(116.0))
    # p = 1: Σ_c |F| = [4, 2]
    assert torch.allclose(attention_map(feat, p=1.0), torch.tensor([[4.0, 2.0]]) / math.sqrt(20.0))
    # (N, T, D): channels are D, positions T
    seq = torch.tensor([[[1.0, 3.0], [-2.0, 0.0]]])  # T=2, D=2
    assert torch.allclose(attention_map(seq), torch.tensor([[10.0, 4.0]]) / math.sqrt(116.0))


def test_at_loss_reference_and_invariances():
    torch.manual_seed(12)
    s, t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 7, 5, 5, dtype=torch.float64)
    # reference: loops over samples and positions
    total = 0.0
    for n in range(3):
        a_s = [sum(s[n, c].reshape(-1)[q].item() ** 2 for c in range(4)) for q in range(25)]
        a_t = [sum(t[n, c].reshape(-1)[q].item() ** 2 for c in range(7)) for q in range(25)]
        ns, nt = math.sqrt(sum(v * v for v in a_s)), math.sqrt(sum(v * v for v in a_t))
        total += sum((x / ns - y / nt) ** 2 for x, y in zip(a_s, a_t))
    want = 1000.0 / 2 * total / (3 * 25)
    loss = AttentionTransferLoss()
    assert loss(s, t).item() == pytest.approx(want, rel=1e-10)
    assert at_loss(s, t, beta=10.0).item() == pytest.approx(want / 100, rel=1e-10)
    assert loss(3.5 * s, t).item() == pytest.approx(want, rel=1e-10)
    assert loss(s, 0.01 * t).item() == pytest.approx(want, rel=1e-10)
    # proportional maps with different channel counts: the teacher repeats the student's channels
    assert loss(s, torch.cat([s, -s, 2 * s], dim=1)).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(s, t).item() > 0


def test_at_shape_errors():
    with pytest.raises(DataError, match="only channels may differ"):
        AttentionTransferLoss()(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 4, 4))
    with pytest.raises(DataError, match="only channels may differ"):
        AttentionTransferLoss()(torch.randn(2, 6, 8), torch.randn(2, 5, 16))
    with pytest.raises(DataError, match="no spatial axis|must both be"):
        AttentionTransferLoss()(torch.randn(2, 8), torch.randn(2, 8))
    # (N, T, D) with different D is fine
    assert AttentionTransferLoss()(torch.randn(2, 6, 8), torch.randn(2, 6, 16)).item() > 0


# --- RKD --------------------------------------------------------------------------------------


def test_rkd_potentials_match_loops():
    torch.manual_seed(13)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    d = pairwise_distance_potential(x)
    assert d.shape == (5, 5)
    assert torch.allclose(d, torch.tensor(distance_potential_ref(x), dtype=torch.float64), rtol=1e-10, atol=1e-12)
    a = angle_potential(x)
    assert a.shape == (5, 5, 5)
    assert torch.allclose(a, torch.tensor(angle_potential_ref(x), dtype=torch.float64), rtol=1e-9, atol=1e-10)


def test_rkd_loss_matches_reference():
    torch.manual_seed(14)
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    d_ref = huber_ref(flat(distance_potential_ref(s)), flat(distance_potential_ref(t)))
    a_ref = huber_ref(flat(angle_potential_ref(s)), flat(angle_potential_ref(t)))
    assert rkd_distance(s, t).item() == pytest.approx(d_ref, rel=1e-9)
    assert rkd_angle(s, t).item() == pytest.approx(a_ref, rel=1e-9)
    assert RKDLoss()(s, t).item() == pytest.approx(25 * d_ref + 50 * a_ref, rel=1e-9)
    assert RKDLoss(distance_weight=0.0, angle_weight=2.0)(s, t).item() == pytest.approx(2 * a_ref, rel=1e-9)


def test_rkd_invariances():
    torch.manual_seed(15)
    s, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    loss = RKDLoss()
    base = loss(s, t).item()
    assert base > 0
    assert rkd_distance(s, 7.0 * t).item() == pytest.approx(rkd_distance(s, t).item(), rel=1e-10)
    assert loss(s, 0.1 * t).item() == pytest.approx(base, rel=1e-10)
    assert loss(s @ random_orthogonal(4, 0), t @ random_orthogonal(5, 1)).item() == pytest.approx(base, rel=1e-9)
    assert loss(s + 3.0, t - 2.0).item() == pytest.approx(base, rel=1e-9)  # translation
    assert loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_gradients_are_finite_with_duplicate_and_collapsed_samples():
    s = torch.randn(4, 3)
    s[1] = s[0]
    s.requires_grad_()
    RKDLoss()(s, torch.randn(4, 5)).backward()
    assert torch.isfinite(s.grad).all()
    collapsed = torch.ones(4, 3, requires_grad=True)
    loss = RKDLoss()(collapsed, torch.randn(4, 5))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(collapsed.grad).all()


def test_rkd_batch_errors():
    with pytest.raises(DataError, match="at least 2"):
        RKDLoss(angle_weight=0)(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(DataError, match="at least 3"):
        RKDLoss()(torch.randn(2, 3), torch.randn(2, 3))
    assert torch.isfinite(RKDLoss(angle_weight=0)(torch.randn(2, 3), torch.randn(2, 4)))
    with pytest.raises(DataError, match="same batch size"):
        RKDLoss()(torch.randn(4, 3), torch.randn(5, 3))


# --- similarity-preserving --------------------------------------------------------------------


def similarity_ref(x: torch.Tensor) -> list[list[float]]:
    rows = x.double().reshape(x.shape[0], -1).tolist()
    n = len(rows)
    g = [[sum(a * b for a, b in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]
    return [[g[i][j] / math.sqrt(sum(v * v for v in g[i])) for j in range(n)] for i in range(n)]


def test_similarity_matches_loops_and_is_rotation_invariant():
    torch.manual_seed(16)
    s, t = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    assert torch.allclose(similarity_matrix(s), torch.tensor(similarity_ref(s), dtype=torch.float64))
    gs, gt = similarity_ref(s), similarity_ref(t)
    want = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    loss = SimilarityLoss()
    assert loss(s, t).item() == pytest.approx(want, rel=1e-10)
    assert loss(s.reshape(4, 6) @ random_orthogonal(6, 2), t @ random_orthogonal(9, 3)).item() == pytest.approx(
        want, rel=1e-9)
    assert loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(DataError, match="same batch size"):
        loss(torch.randn(3, 2), torch.randn(4, 2))


# --- cosine -----------------------------------------------------------------------------------


def test_cosine_loss_and_mask():
    torch.manual_seed(17)
    s, t = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    loss = CosineEmbeddingLoss()
    assert torch.allclose(loss(s, t), (1 - F.cosine_similarity(s, t, dim=-1)).mean(), rtol=1e-6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    keep = mask.bool()
    want = (1 - F.cosine_similarity(s[keep], t[keep], dim=-1)).mean()
    assert torch.allclose(loss(s, t, mask), want, rtol=1e-6)
    s2 = s.clone()
    s2[~keep] = 1e3 * torch.randn(int((~keep).sum()), 8)
    assert torch.allclose(loss(s2, t, mask), want, rtol=1e-6)
    with pytest.raises(DataError, match="mask of shape"):
        loss(s, t, torch.ones(3, 5))


def test_cosine_projector():
    torch.manual_seed(18)
    loss = CosineEmbeddingLoss(student_dim=4, teacher_dim=8)
    assert loss.has_projector and loss.projector.weight.shape == (8, 4)
    s, t = torch.randn(5, 4), torch.randn(5, 8)
    assert torch.allclose(loss(s, t), (1 - F.cosine_similarity(loss.projector(s), t, dim=-1)).mean(), rtol=1e-6)
    with pytest.raises(DataError, match=r"pass CosineEmbeddingLoss\(student_dim=4, teacher_dim=8\)"):
        CosineEmbeddingLoss()(s, t)


# --- properties -------------------------------------------------------------------------------

logit_rows = st.integers(1, 4).flatmap(
    lambda rows: st.integers(2, 6).flatmap(
        lambda classes: st.tuples(
            st.lists(st.floats(-30, 30), min_size=rows * classes, max_size=rows * classes),
            st.lists(st.floats(-30, 30), min_size=rows * classes, max_size=rows * classes),
            st.just((rows, classes)))))


@settings(max_examples=40, deadline=None)
@given(logit_rows, st.floats(0.1, 20.0))
def test_kl_terms_are_non_negative(case, temperature):
    a, b, shape = case
    s, t = torch.tensor(a).reshape(shape), torch.tensor(b).reshape(shape)
    assert kd_loss(s, t, temperature=temperature, alpha=0.0).item() >= 0.0
    assert (softmax_kl(t, s, temperature) >= 0).all()
    for divergence in ("forward", "reverse", "mix"):
        assert (token_divergence(s, t, divergence, temperature) >= 0).all()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([-1e4, 1e4, 0.0, 3.0]), min_size=12, max_size=12),
       st.lists(st.sampled_from([-1e4, 1e4, 0.0, -5.0]), min_size=12, max_size=12),
       st.sampled_from([1.0, 4.0]))
def test_large_logits_stay_finite(a, b, temperature):
    s = torch.tensor(a).reshape(1, 3, 4).requires_grad_()
    t = torch.tensor(b).reshape(1, 3, 4)
    labels = torch.tensor([[0, 1, 3]])
    losses = [kd_loss(s, t, labels, temperature=temperature),
              TokenKDLoss("mix", temperature, alpha=0.5)(s, t, labels)]
    for loss in losses:
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()


def test_softmax_kl_with_minus_inf_teacher_logits_skips_those_classes():
    """A masked class (teacher logit -inf, probability 0) adds nothing; both code paths agree elsewhere."""
    from slimkit.distillation.losses import softmax_kl

    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g, requires_grad=True)
    masked = t.clone()
    masked[:, 4:] = float("-inf")
    got = softmax_kl(masked, s)
    p = torch.softmax(t[:, :4].double(), -1)
    log_q = torch.log_softmax(s.double(), -1)[:, :4]
    expected = (p * (p.log() - log_q)).sum(-1)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(s.grad).all()
    # Finite logits take the fused path: the same values as the explicit formula.
    fused = softmax_kl(t, s)
    p_all = torch.softmax(t.double(), -1)
    explicit = (p_all * (p_all.log() - torch.log_softmax(s.double(), -1))).sum(-1)
    assert torch.allclose(fused.double(), explicit, atol=1e-6)
