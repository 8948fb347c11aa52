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
