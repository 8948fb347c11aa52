"""The shipped stdlib-coder: its files, its tokenizer, and its perplexity on a fixed held-out slice."""

import json
import math

import pytest
import torch

import slimkit
from slimkit.zoo import DATA_DIR, corpus
from slimkit.zoo.stdlib_coder import VOCAB_SIZE, coder_config, encode_corpus, unigram_perplexity

CODER_DIR = DATA_DIR / "stdlib-coder"
SLICE_TOKENS = 8192  # the first tokens of the eval split (files in path order)


@pytest.fixture(scope="module")
def coder():
    return slimkit.load("stdlib-coder")


def test_shipped_files_and_size():
    weights = CODER_DIR / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    for name in ("config.json", "tokenizer.json", "training.json", "eval.json"):
        assert (CODER_DIR / name).exists(), name


def test_architecture(coder):
    cfg = coder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (6, 256, 8, 4)
    n = sum(p.numel() for p in coder.parameters())
    assert 5_000_000 <= n <= 10_000_000
    assert coder.config.to_dict()["vocab_size"] == coder_config().vocab_size == VOCAB_SIZE


def test_tokenizer_round_trips_source_exactly(coder):
    tok = slimkit.tokenizer_of(coder)
    assert len(tok) == VOCAB_SIZE
    text = corpus.load_split("eval")[0][:2000]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_perplexity_on_fixed_slice_is_far_below_unigram(coder):
    from slimkit.tasks.metrics import perplexity

    tok = slimkit.tokenizer_of(coder)
    eval_ids = encode_corpus(tok, corpus.load_split("eval")[:10])[:SLICE_TOKENS]
    assert len(eval_ids) == SLICE_TOKENS
    ppl = perplexity(coder, eval_ids, context=256, stride=128).perplexity
    train_ids = encode_corpus(tok, corpus.load_split("train")[:200])
    unigram = unigram_perplexity(train_ids, eval_ids)
    documented = json.loads((CODER_DIR / "eval.json").read_text())
    assert ppl < unigram / 5, (ppl, unigram)
    # The slice is close to the whole eval split's documented figure (same model, same scheme).
    assert ppl < 2.0 * documented["perplexity"], (ppl, documented)
    assert math.isfinite(ppl) and ppl > 1.0


def test_student_is_smaller_and_shares_the_tokenizer(coder):
    student = slimkit.load("stdlib-coder-student")
    assert student.config.num_hidden_layers == 2
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in coder.parameters()) / 2
    assert slimkit.tokenizer_of(student).get_vocab() == slimkit.tokenizer_of(coder).get_vocab()
    a, b = slimkit.load("stdlib-coder-student"), student
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # seeded init


def test_unigram_perplexity_reference():
    train = torch.tensor([0, 0, 1, 2])
    ev = torch.tensor([2, 0, 1])
    p = (torch.tensor([2, 1, 1, 0]) + 1.0) / 8.0  # add-one counts over a vocabulary of 4
    expected = math.exp(-(math.log(p[0]) + math.log(p[1])) / 2)
    assert unigram_perplexity(train, ev, vocab_size=4) == pytest.approx(expected)
