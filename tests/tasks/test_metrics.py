import math
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.core.errors import DataError
from slimkit.tasks.metrics import (
    accuracy,
    embedding_fidelity,
    encode_sentences,
    mean_pool,
    perplexity,
)

torch.set_num_threads(1)
VOCAB = 13


class MeanPrefixLM(nn.Module):
    """Causal toy LM: logits at t come from the mean embedding of tokens 0..t.

    Every prediction depends on the whole prefix it is given, so a token scored with the
    wrong history gets a different NLL.
    """

    def __init__(self, output="tensor", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(VOCAB, 8, generator=g) * 2)
            self.head.weight.copy_(torch.randn(VOCAB, 8, generator=g))
            self.head.bias.copy_(torch.randn(VOCAB, generator=g))
        self.output = output

    def forward(self, input_ids):
        h = self.emb(input_ids).cumsum(dim=1)
        h = h / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        logits = self.head(h)
        if self.output == "object":
            return types.SimpleNamespace(logits=logits)
        if self.output == "tuple":
            return (logits, None)
        return logits


def _ids(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _reference_nll(model, ids, context, stride):
    """Slow reference: score each token alone, with the history the window scheme gives it.

    Windows hold L = min(context, n) tokens; they start at 0, stride, 2*stride, ... (a stride
    of `context` moves by context - 1 so a window's first token is covered by the one
    before), and the last one is moved back to end at n. A token is scored by the first
    window in which it has history, using the tokens of that window before it.
    """
    n = len(ids)
    length = min(context, n)
    step = min(stride, context - 1)
    starts = [0]
    while starts[-1] + length < n:
        starts.append(min(starts[-1] + step, n - length))
    nlls = []
    for p in range(1, n):
        s = next(s for s in starts if s < p < s + length)
        history = ids[s:p]
        assert 1 <= len(history) <= context - 1
        logits = model(input_ids=history.unsqueeze(0))[0, -1].to(torch.float64)
        nlls.append(-torch.log_softmax(logits, -1)[ids[p]].item())
    return sum(nlls) / len(nlls), len(nlls)


CASES = [(40, 8, 4), (41, 8, 3), (40, 8, 7), (40, 8, 8), (37, 8, 1), (9, 8, 5), (8, 8, 8), (5, 8, 2), (2, 4, 4)]


@pytest.mark.parametrize("n,context,stride", CASES)
def test_perplexity_matches_token_by_token_reference(n, context, stride):
    model, ids = MeanPrefixLM(), _ids(n)
    result = perplexity(model, ids, context=context, stride=stride, batch_size=3)
    ref_nll, ref_count = _reference_nll(model, ids, context, stride)
    assert result.tokens == ref_count == n - 1  # every token from 1 on, once
    assert result.nll == pytest.approx(ref_nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-6)
    assert (result.context, result.stride) == (context, min(stride, context - 1))


def test_reference_is_sensitive_to_history():
    # Guards the test above: scoring with the full history instead gives another number.
    model, ids = MeanPrefixLM(), _ids(40)
    windowed, _ = _reference_nll(model, ids, 8, 4)
    full, _ = _reference_nll(model, ids, 1000, 4)
    assert abs(windowed - full) > 1e-3


@pytest.mark.parametrize("n", [2, 10, 31])
def test_context_covering_text_gives_full_sequence_loss(n):
    model, ids = MeanPrefixLM(), _ids(n, seed=n)
    logits = model(input_ids=ids.unsqueeze(0))[0].to(torch.float64)
    full = F.cross_entropy(logits[:-1], ids[1:]).item()
    result = perplexity(model, ids, context=32, stride=16)
    assert result.tokens == n - 1
    assert result.nll == pytest.approx(full, rel=1e-9)


@pytest.mark.parametrize("stride", [1, 5, 6, 7])
def test_every_stride_predicts_len_minus_one_tokens(stride):
    assert perplexity(MeanPrefixLM(), _ids(50), context=7, stride=stride).tokens == 49


def test_batch_size_and_output_type_do_not_change_result():
    ids = _ids(60)
    results = [
        perplexity(MeanPrefixLM(output=out), ids, context=10, stride=4, batch_size=bs).nll
        for out in ("tensor", "object", "tuple")
        for bs in (1, 4, 100)
    ]
    assert max(results) - min(results) < 1e-6 * results[0]


def test_perplexity_uses_eval_mode_and_restores_it():
    class Dropped(MeanPrefixLM):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.9)

        def forward(self, input_ids):
            return self.drop(super().forward(input_ids))

    model, ids = Dropped(), _ids(30)
    model.train()
    first = perplexity(model, ids, context=8, stride=4).nll
    assert model.training and model.drop.training
    model.eval()
    assert perplexity(model, ids, context=8, stride=4).nll == first


@pytest.mark.parametrize(
    "ids,kw",
    [
        (torch.tensor([3]), {}),
        (torch.tensor([], dtype=torch.long), {}),
        (torch.zeros(2, 5, dtype=torch.long), {}),
        (torch.arange(10), {"context": 8, "stride": 0}),
        (torch.arange(10), {"context": 8, "stride": 9}),
        (torch.arange(10), {"context": 1, "stride": 1}),
    ],
)
def test_perplexity_refuses_bad_input(ids, kw):
    with pytest.raises(DataError):
        perplexity(MeanPrefixLM(), ids, **kw)


# --- accuracy --------------------------------------------------------------------------


def test_accuracy_by_hand():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))  # prediction = argmax of the input itself
    inputs = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [5, 1, 0], [0, 1, 9]])
    labels = torch.tensor([0, 1, 0, 0, 1])  # right, right, wrong, right, wrong
    model.train()
    assert accuracy(model, inputs, labels, batch_size=2) == pytest.approx(3 / 5)
    assert model.training
    with pytest.raises(DataError):
        accuracy(model, inputs, labels[:4])


# --- sentence embeddings ---------------------------------------------------------------


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [100.0, 100.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))
    assert torch.equal(mean_pool(hidden, torch.zeros(2, 3)), torch.zeros(2, 2))  # no NaN


class WordTokenizer:
    """Whitespace tokenizer with the call signature of a transformers tokenizer (pad id 0)."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding and truncation and return_tensors == "pt"
        rows = [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


class TokenEncoder(nn.Module):
    def __init__(self, tuple_output=False):
        super().__init__()
        self.emb = nn.Embedding(32, 4)
        self.tuple_output = tuple_output

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        return (h,) if self.tuple_output else types.SimpleNamespace(last_hidden_state=h)


def test_encode_sentences_means_over_real_tokens():
    torch.manual_seed(0)
    model, tok = TokenEncoder(), WordTokenizer()
    texts = ["a b", "c d e f g", "a", "b a c"]
    emb = encode_sentences(model, tok, texts, batch_size=2)
    w = model.emb.weight.detach()
    a, b, c = (w[tok.vocab[x]] for x in "abc")
    assert emb.shape == (4, 4)
    torch.testing.assert_close(emb[0], (a + b) / 2)
    torch.testing.assert_close(emb[2], a)
    torch.testing.assert_close(emb[3], (a + b + c) / 3)
    # Padding must not leak in: encoding alone or next to a long text gives the same row.
    alone = torch.cat([encode_sentences(model, tok, [t], batch_size=1) for t in texts])
    torch.testing.assert_close(alone, emb)
    model.tuple_output = True  # a (hidden,) tuple output is read the same way
    torch.testing.assert_close(encode_sentences(model, tok, texts), emb)


def test_encode_sentences_truncates_and_normalizes():
    torch.manual_seed(0)
    model, tok = TokenEncoder(tuple_output=True), WordTokenizer()
    emb = encode_sentences(model, tok, ["a b c d", "a b"], max_length=2, normalize=True)
    torch.testing.assert_close(emb[0], emb[1])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    with pytest.raises(DataError):
        encode_sentences(model, tok, [])


# --- embedding fidelity ----------------------------------------------------------------


def test_embedding_fidelity_by_hand():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    fid = embedding_fidelity(emb, ref)
    # cosines: 1, 1/sqrt2, 3/sqrt10
    assert fid.mean_cosine == pytest.approx((1 + 2**-0.5 + 3 / 10**0.5) / 3, rel=1e-12)
    assert fid.min_cosine == pytest.approx(2**-0.5, rel=1e-12)
    # nearest under emb: 0->1, 1->2, 2->1; under ref: 0->2, 1->2, 2->{0,1} (tie)
    assert fid.top1_agreement == pytest.approx(2 / 3)
    assert fid.n == 3
    assert fid.to_dict() == {"mean_cosine": fid.mean_cosine, "min_cosine": fid.min_cosine, "top1_agreement": 2 / 3, "n": 3}


def test_embedding_fidelity_refuses_bad_shapes():
    with pytest.raises(DataError):
        embedding_fidelity(torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(DataError):
        embedding_fidelity(torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(DataError):
        embedding_fidelity(torch.tensor([[1.0, float("nan")], [1, 1]]), torch.ones(2, 2))


_coord = st.floats(-100, 100, allow_nan=False, allow_subnormal=False)


@st.composite
def _matrices(draw, count=1):
    n, d = draw(st.integers(2, 6)), draw(st.integers(1, 4))
    rows = st.lists(_coord, min_size=d, max_size=d).filter(lambda r: sum(x * x for x in r) > 1e-4)
    return [torch.tensor(draw(st.lists(rows, min_size=n, max_size=n)), dtype=torch.float64) for _ in range(count)]


@settings(max_examples=40, deadline=None)
@given(_matrices())
def test_fidelity_of_identical_embeddings_is_perfect(mats):
    (x,) = mats
    fid = embedding_fidelity(x, x.clone())
    assert fid.mean_cosine == pytest.approx(1.0, abs=1e-12)
    assert fid.min_cosine == pytest.approx(1.0, abs=1e-12)
    assert fid.top1_agreement == 1.0


@settings(max_examples=40, deadline=None)
@given(_matrices(count=2), st.data())
def test_fidelity_ignores_positive_row_scaling(mats, data):
    x, y = mats
    scale = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=len(x), max_size=len(x))), dtype=torch.float64)
    before, after = embedding_fidelity(x, y), embedding_fidelity(x * scale[:, None], y)
    assert after.mean_cosine == pytest.approx(before.mean_cosine, abs=1e-12)
    assert after.min_cosine == pytest.approx(before.min_cosine, abs=1e-12)
    assert after.top1_agreement == before.top1_agreement
    same = embedding_fidelity(x * scale[:, None], x)
    assert same.top1_agreement == 1.0 and same.min_cosine == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(_matrices(count=2))
def test_cosines_stay_within_bounds(mats):
    x, y = mats
    fid = embedding_fidelity(x, y)
    assert -1.0 <= fid.min_cosine <= fid.mean_cosine <= 1.0
    assert 0.0 <= fid.top1_agreement <= 1.0
