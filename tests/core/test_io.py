import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.atomic import atomic_dir
from slimkit.core.errors import ModelLoadError
from slimkit.core.io import load, model_info, save


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_import_slimkit_is_lean():
    code = "import sys, slimkit; bad = [m for m in ('transformers', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_quantized_checkpoint_reloads_with_identical_logits(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (2, 12))
    slimkit.quantize_(tiny_llama, slimkit.RTN(bits=8, embeddings=True))
    before = _logits(tiny_llama, ids)
    save(tiny_llama, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "slimkit.json").read_text())
    assert meta["architecture"] == {"kind": "transformers", "class": "LlamaForCausalLM"}
    assert meta["modules"]["lm_head"]["type"] == "QuantLinear"
    assert meta["modules"]["model.embed_tokens"]["type"] == "QuantEmbedding"
    assert meta["steps"][0]["type"] == "RTN"
    reloaded = load(tmp_path / "ck")
    assert type(reloaded.lm_head).__name__ == "QuantLinear"
    assert torch.equal(_logits(reloaded, ids), before)
    assert model_info(reloaded)["steps"] == meta["steps"]


def test_hf_folder_loads(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(_logits(load(tmp_path / "hf"), ids), _logits(tiny_llama, ids))


def test_pickle_only_hf_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load(tmp_path)


def test_truncated_weights_are_named(tiny_llama, tmp_path):
    save(tiny_llama, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is corrupt or truncated"):
        load(tmp_path / "ck")


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load(tmp_path / "f.txt")
    with pytest.raises(ModelLoadError, match="neither"):
        load(tmp_path)
    with pytest.raises(ModelLoadError, match="did you mean 'stdlib-coder'"):
        from slimkit.zoo import load_zoo

        load_zoo("stdlib-codr")


def test_custom_module_needs_a_skeleton(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    slimkit.quantize_(model, slimkit.RTN(bits=8))
    save(model, tmp_path / "ck")
    with pytest.raises(ModelLoadError, match="skeleton"):
        load(tmp_path / "ck")
    skeleton = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    reloaded = load(tmp_path / "ck", skeleton=skeleton)
    x = torch.randn(5, 4)
    assert torch.equal(reloaded(x), model(x))


def test_wrong_architecture_is_named(tiny_llama, tmp_path):
    save(tiny_llama, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match the architecture"):
        load(tmp_path / "ck")


def test_failed_save_leaves_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


# -- sentence-transformers folders ------------------------------------------------------
def _st_folder(root, transformer_path=""):
    """A tiny sentence-transformers folder written by hand (no sentence-transformers import): a random
    BertModel with a tokenizer at ``transformer_path``, mean Pooling, Normalize (listed, no folder)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    tf_dir = root / transformer_path
    tf_dir.mkdir(parents=True, exist_ok=True)
    BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)).save_pretrained(tf_dir)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))
    BertTokenizer(vocab_file=str(root / "vocab.txt")).save_pretrained(tf_dir)
    (root / "vocab.txt").unlink()
    (tf_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": "mean"}))
    (root / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "default_prompt_name": None}))
    modules = [{"idx": 0, "name": "0", "path": transformer_path, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (root / "modules.json").write_text(json.dumps(modules))
    return modules


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("transformer_path", ["", "0_Transformer"])
def test_sentence_transformers_folder_records_its_pipeline_and_writes_it_again(tmp_path, transformer_path):
    modules = _st_folder(tmp_path / "st", transformer_path)
    model = load(tmp_path / "st")
    ids = torch.randint(0, 8, (2, 5))
    assert torch.equal(_hidden(model, ids), _hidden(_plain_bert(tmp_path / "st" / transformer_path), ids))
    st = model_info(model)["defaults"]["sentence_transformers"]
    assert st["modules"] == modules
    assert st["sentence_bert_config"] == {"max_seq_length": 24, "do_lower_case": False}
    assert st["files"] == {"1_Pooling": {"config.json": {"embedding_dimension": 8, "pooling_mode": "mean"}},
                           "2_Normalize": {}}
    assert model_info(model)["source"] == str(tmp_path / "st")

    save(model, tmp_path / "out")
    out = tmp_path / "out"
    written = json.loads((out / "modules.json").read_text())
    assert written == [{**modules[0], "path": "0_SlimkitEncoder"}, *modules[1:]]
    encoder = json.loads((out / "0_SlimkitEncoder" / "config.json").read_text())
    assert encoder["model_type"] == "slimkit_encoder" and encoder["checkpoint"] == ".."
    assert encoder["hidden_size"] == 8 and encoder["max_position_embeddings"] == 32
    assert json.loads((out / "0_SlimkitEncoder" / "sentence_bert_config.json").read_text())["max_seq_length"] == 24
    assert (out / "0_SlimkitEncoder" / "tokenizer.json").exists()  # ST's Transformer reads its tokenizer there
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "mean"
    assert (out / "2_Normalize").is_dir()
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == {}

    reloaded = load(out)  # the slimkit checkpoint: pipeline restored from slimkit.json, written again as it was
    assert model_info(reloaded)["defaults"]["sentence_transformers"] == st
    assert torch.equal(_hidden(reloaded, ids), _hidden(model, ids))
    save(reloaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "modules.json").read_text()) == written


def _plain_bert(folder):
    from transformers import BertModel

    return BertModel.from_pretrained(folder).eval()


def test_sentence_transformers_folders_slimkit_cannot_read_are_named(tmp_path):
    modules = _st_folder(tmp_path / "st")
    bad = tmp_path / "st" / "modules.json"
    bad.write_text(json.dumps([modules[0], {**modules[1], "path": "../elsewhere"}]))
    with pytest.raises(ModelLoadError, match="must be a folder inside"):
        load(tmp_path / "st")
    bad.write_text(json.dumps([{**modules[0], "type": "sentence_transformers.models.StaticEmbedding"}]))
    with pytest.raises(ModelLoadError, match="first module is a Transformer"):
        load(tmp_path / "st")
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ModelLoadError, match="module list"):
        load(tmp_path / "st")


def test_a_pipeline_with_weights_is_not_written_half(tmp_path):
    modules = _st_folder(tmp_path / "st")
    (tmp_path / "st" / "2_Dense").mkdir()
    (tmp_path / "st" / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 8, "out_features": 4}))
    (tmp_path / "st" / "2_Dense" / "model.safetensors").write_bytes(b"weights slimkit does not record")
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (tmp_path / "st" / "modules.json").write_text(json.dumps([*modules[:2], dense]))
    model = load(tmp_path / "st")
    with pytest.warns(UserWarning, match=r"no sentence-transformers files.*2_Dense/model\.safetensors"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "modules.json").exists()
    assert (tmp_path / "out" / "slimkit.json").exists()  # the checkpoint itself is complete


def test_a_slimkit_encoder_config_must_point_inside_its_folder(tmp_path):
    _st_folder(tmp_path / "st")
    save(load(tmp_path / "st"), tmp_path / "out")
    save(load(tmp_path / "st"), tmp_path / "other")  # a valid checkpoint, but outside the folder
    config = tmp_path / "out" / "0_SlimkitEncoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "checkpoint": "../../other"}))
    (tmp_path / "out" / "slimkit.json").rename(tmp_path / "out" / "moved.json")  # so it loads as an ST folder
    with pytest.raises(ModelLoadError, match="not a slimkit checkpoint inside"):
        load(tmp_path / "out")
