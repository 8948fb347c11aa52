"""Hostile model folders: each attack is built here from a tiny real checkpoint and must end in one ModelLoadError.

A checkpoint is saved with ``slimkit.save`` (or ``save_pretrained`` for a plain Hugging Face
folder) from a tiny random model, copied, then tampered with: code pointers (``auto_map``),
classes that are not models, integer codes replaced by floats, NaN weights, attributes
smuggled in through ``structure``, malformed ``slimkit.json`` / ``config.json``, configs far
larger than the weights, and files that are links or devices. The last part fuzzes the
``slimkit.json`` loader with random JSON: one SlimkitError or a loaded model, never another
exception.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import slimkit
from slimkit.core.errors import ModelLoadError, SlimkitError, UnsupportedError
from slimkit.core.io import META_KEYS, load, save

torch.set_num_threads(1)

# transformers copies a folder's module into its modules cache and imports the copy, so the marker path
# is written into the module as an absolute path (see _evil_hf_folder).
_EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("code from the model folder ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Clean checkpoints to copy: plain, int8-quantized, structurally pruned, magnitude-pruned (compact
    storage), a Hugging Face folder, and a user's own nn.Module."""
    root = tmp_path_factory.mktemp("clean")
    save(_tiny_llama(), root / "plain")
    quantized = _tiny_llama()
    slimkit.quantize_(quantized, slimkit.RTN(bits=8))
    save(quantized, root / "quantized")
    pruned = _tiny_llama()
    slimkit.prune_(pruned, slimkit.StructuredPrune(ratio=0.5, importance="l2", targets=("heads", "neurons")))
    save(pruned, root / "pruned")
    sparse = _tiny_llama()
    slimkit.prune_(sparse, slimkit.Magnitude(sparsity=0.75))
    save(sparse, root / "sparse")
    _tiny_llama().save_pretrained(root / "hf")
    torch.manual_seed(0)
    save(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), root / "module")
    return root


def _copy(made: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(made / name, target)
    return target


def _edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    result = change(data)
    file.write_text(json.dumps(data if result is None else result))


def _refused(folder: Path, *words: str, skeleton: nn.Module | None = None) -> str:
    """Load ``folder``, expect exactly a ModelLoadError whose message holds every one of ``words``."""
    with pytest.raises(ModelLoadError) as info:
        load(folder, skeleton=skeleton)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def _rewrite_weights(folder: Path, change, file: str = "model.safetensors") -> None:
    path = folder / file
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


# -- 1. code from the folder never runs ---------------------------------------------------------------
def _evil_hf_folder(made: Path, tmp_path: Path, name: str = "hf") -> Path:
    """A Hugging Face folder whose config sends transformers to ``evil.py`` (which writes MARKER on import)."""
    folder = _copy(made, name, tmp_path)
    (folder / "evil.py").write_text(_EVIL.format(marker=str(folder / "MARKER")))

    def point_at_code(cfg):
        cfg.pop("architectures", None)
        cfg["model_type"] = "evil"
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                           "AutoModelForCausalLM": "evil.EvilModel"}

    _edit_json(folder / "config.json", point_at_code)
    return folder


def test_the_marker_module_would_run(made, tmp_path):
    """Control: importing the planted module does write the marker, so its absence below means it never ran."""
    folder = _evil_hf_folder(made, tmp_path)
    runpy.run_path(str(folder / "evil.py"))
    assert (folder / "MARKER").exists()


def test_auto_map_in_a_hf_folder_is_refused_without_importing_it(made, tmp_path):
    folder = _evil_hf_folder(made, tmp_path)
    _refused(folder, "config.json", "auto_map", "slimkit never runs code from a model folder")
    assert not (folder / "MARKER").exists()


def test_auto_map_in_a_slimkit_checkpoint_and_a_streamed_source_is_refused(made, tmp_path):
    from slimkit.core.streaming import lazy_model

    folder = _copy(made, "plain", tmp_path)
    (folder / "evil.py").write_text(_EVIL.format(marker=str(folder / "MARKER")))
    _edit_json(folder / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    _refused(folder, "config.json", "auto_map", "never runs code")
    hf = _evil_hf_folder(made, tmp_path)
    _edit_json(hf / "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ModelLoadError, match="auto_map"):
        lazy_model(hf)
    assert not (folder / "MARKER").exists() and not (hf / "MARKER").exists()


def test_auto_map_in_tokenizer_config_is_refused(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    (folder / "evil.py").write_text(_EVIL.format(marker=str(folder / "MARKER")))
    _refused(folder, "tokenizer_config.json", "auto_map", "never runs code")
    assert not (folder / "MARKER").exists()


def test_answering_yes_on_stdin_runs_nothing(made, tmp_path):
    """transformers asks "[y/N]" before running a folder's code when trust_remote_code is not given (once per
    Auto class: config, then model): slimkit never lets it ask, so answers waiting on stdin change nothing."""
    folder = _evil_hf_folder(made, tmp_path)
    code = "import sys, slimkit\nslimkit.load(sys.argv[1])\n"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # a regression must not touch ~/.cache
    done = subprocess.run([sys.executable, "-c", code, str(folder)], input="y\n" * 3, capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert done.returncode != 0
    assert "ModelLoadError" in done.stderr and "never runs code" in done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    assert not (folder / "MARKER").exists()


def test_a_class_that_is_not_a_model_is_never_instantiated(made, tmp_path, monkeypatch):
    import transformers

    def must_not_run(self, *args, **kwargs):
        raise AssertionError("TrainingArguments was instantiated")

    monkeypatch.setattr(transformers.TrainingArguments, "__init__", must_not_run)
    folder = _copy(made, "plain", tmp_path)
    _edit_json(folder / "slimkit.json", lambda m: m["architecture"].update({"class": "TrainingArguments"}))
    _refused(folder, "slimkit.json", "'TrainingArguments' is not a transformers model class")
    hf = _copy(made, "hf", tmp_path)
    _edit_json(hf / "config.json", lambda c: c.update(architectures=["TrainingArguments"]))
    _refused(hf, "config.json", "'TrainingArguments' is not a transformers model class")
    plain = _copy(made, "plain", tmp_path / "again")
    _edit_json(plain / "slimkit.json", lambda m: m["architecture"].update({"class": "BertModel"}))
    _refused(plain, "BertModel needs a BertConfig", "LlamaConfig")


# -- 2. silent garbage ----------------------------------------------------------------------------------
def test_float_values_where_int8_codes_belong_are_refused(made, tmp_path):
    folder = _copy(made, "quantized", tmp_path)
    key = "model.layers.0.self_attn.q_proj.qweight"

    def floats(tensors, _meta):
        assert tensors[key].dtype == torch.int8
        tensors[key] = torch.full(tensors[key].shape, 1000.7)

    _rewrite_weights(folder, floats)
    _refused(folder, "dtype mismatch", repr(key), "torch.float32 in the file", "torch.int8 in the model")


def test_wider_integer_codes_are_refused_rather_than_wrapped(made, tmp_path):
    folder = _copy(made, "quantized", tmp_path)
    key = "model.layers.0.mlp.down_proj.qweight"
    _rewrite_weights(folder, lambda t, _m: t.update({key: torch.full(t[key].shape, 1000, dtype=torch.int32)}))
    _refused(folder, "dtype mismatch", repr(key), "torch.int32 in the file", "torch.int8 in the model")


def test_integers_where_a_float_weight_belongs_are_refused(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    key = "model.norm.weight"
    _rewrite_weights(folder, lambda t, _m: t.update({key: torch.ones(t[key].shape, dtype=torch.int32)}))
    _refused(folder, "dtype mismatch", repr(key), "torch.int32 in the file", "torch.float32 in the model")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(made, tmp_path, value):
    folder = _copy(made, "plain", tmp_path)

    def poison(tensors, _meta):
        tensors["model.layers.0.self_attn.o_proj.weight"][1, 2] = value

    _rewrite_weights(folder, poison)
    _refused(folder, "model.safetensors", "'model.layers.0.self_attn.o_proj.weight'", "1 NaN/inf value(s)")


def test_non_finite_values_in_compact_storage_and_hf_folders_are_refused(made, tmp_path):
    sparse = _copy(made, "sparse", tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"

    def poison(tensors, meta):
        assert key in json.loads(meta["slimkit.sparse"])  # stored as a bitmask plus its non-zeros
        tensors[key + ".__values"][0] = float("nan")

    _rewrite_weights(sparse, poison)
    _refused(sparse, repr(key), "NaN/inf")
    hf = _copy(made, "hf", tmp_path)
    _rewrite_weights(hf, lambda t, _m: t["model.norm.weight"].fill_(float("inf")))
    _refused(hf, "'model.norm.weight'", "NaN/inf")


def test_inconsistent_compact_storage_is_refused_before_reading(made, tmp_path):
    folder = _copy(made, "sparse", tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"

    def grow(_tensors, meta):
        sparse = json.loads(meta["slimkit.sparse"])
        sparse[key]["shape"] = [4096, 4096]
        meta["slimkit.sparse"] = json.dumps(sparse)

    _rewrite_weights(folder, grow)
    _refused(folder, "corrupt", repr(key), "bitmask")
    folder = _copy(made, "sparse", tmp_path / "b")

    def retype(_tensors, meta):
        sparse = json.loads(meta["slimkit.sparse"])
        sparse[key]["dtype"] = "int8"
        meta["slimkit.sparse"] = json.dumps(sparse)

    _rewrite_weights(folder, retype)
    _refused(folder, "corrupt", repr(key), "not a float dtype")


def _add_structure(folder: Path, records: dict) -> None:
    _edit_json(folder / "slimkit.json", lambda m: m.setdefault("structure", {}).update(records))


def test_structure_cannot_set_arbitrary_attributes(made, tmp_path):
    folder = _copy(made, "pruned", tmp_path)
    _add_structure(folder, {"model.norm": {"variance_epsilon": 1000000.0}})
    _refused(folder, "'structure'", "'variance_epsilon'", "not a structural size")


@pytest.mark.parametrize("value, words", [
    (-4, "positive integer"), (0, "positive integer"), (True, "positive integer"), ("8", "positive integer"),
    (2.0, "positive integer"),
])
def test_structure_values_must_be_positive_ints(made, tmp_path, value, words):
    folder = _copy(made, "pruned", tmp_path)
    _add_structure(folder, {"model.layers.0.mlp": {"intermediate_size": value}})
    _refused(folder, "'intermediate_size'", words)


def test_structure_needs_a_structured_step_and_an_existing_int_attribute(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    _add_structure(folder, {"model.layers.0.self_attn": {"num_heads": 2}})
    _refused(folder, "'structure'", "none of its steps is StructuredPrune")
    folder = _copy(made, "pruned", tmp_path / "b")
    _add_structure(folder, {"model.norm": {"num_heads": 2}})
    _refused(folder, "'num_heads'", "'model.norm'", "no such integer attribute")
    folder = _copy(made, "pruned", tmp_path / "c")
    _add_structure(folder, {"model.nowhere": {"num_heads": 2}})
    _refused(folder, "'model.nowhere'", "lacks")


def test_the_pruned_checkpoint_itself_still_loads(made):
    model = load(made / "pruned")
    assert model.model.layers[0].mlp.intermediate_size == 16


def test_recording_refuses_attributes_outside_the_allow_list():
    from slimkit.core.structure import STRUCTURE_FIELDS, record_attributes
    from slimkit.pruning import transformer_groups as tg

    model = nn.Linear(2, 2)
    with pytest.raises(UnsupportedError, match="'variance_epsilon'.*not a structural size"):
        record_attributes(model, "", {"variance_epsilon": 1e6})
    with pytest.raises(UnsupportedError, match="positive integer"):
        record_attributes(model, "", {"num_heads": 0})
    record_attributes(model, "", {"num_heads": 2})
    # Every attribute structured pruning rewrites can be recorded (and therefore reloaded).
    families = (tg._HEAD_DIM_ATTRS, tg._Q_HEAD_ATTRS, tg._KV_HEAD_ATTRS, tg._Q_WIDTH_ATTRS, tg._MLP_WIDTH_ATTRS)
    assert {a for family in families for a in family} <= STRUCTURE_FIELDS


# -- 3. malformed descriptions: one ModelLoadError each, naming the file ----------------------------------
def _set_modules(value):
    return lambda m: m.update(modules=value)


_BAD_META = [
    ("modules a list", _set_modules([]), ["'modules' must be an object", "an array"]),
    ("architecture a string", lambda m: m.update(architecture="LlamaForCausalLM"),
     ["'architecture' must be an object", "a string"]),
    ("steps a dict", lambda m: m.update(steps={"type": "RTN"}), ["'steps' must be an array"]),
    ("format_version a string", lambda m: m.update(format_version="1"), ["'format_version' must be a positive integer"]),
    ("format_version a bool", lambda m: m.update(format_version=True), ["'format_version' must be a positive integer"]),
    ("newer format", lambda m: m.update(format_version=99), ["newer slimkit"]),
    ("not slimkit", lambda m: m.update(format="other"), ["not a slimkit checkpoint description"]),
    ("entry without spec", _set_modules({"lm_head": {"type": "QuantLinear"}}),
     ["'modules['lm_head'].spec' must be an object", "null"]),
    ("spec not a dict", _set_modules({"lm_head": {"type": "QuantLinear", "spec": [64, 128]}}),
     ["'modules['lm_head'].spec' must be an object"]),
    ("type not a string", _set_modules({"lm_head": {"type": 7, "spec": {}}}), ["'modules['lm_head'].type'"]),
    ("unknown module type", _set_modules({"lm_head": {"type": "Evil", "spec": {}}}), ["unknown module type 'Evil'"]),
    ("spec with wrong values", _set_modules({"lm_head": {"type": "QuantLinear", "spec": {"in_features": "x"}}}),
     ["spec of 'lm_head' cannot rebuild a QuantLinear"]),
    ("spec too large for the file", _set_modules({"lm_head": {"type": "QuantLinear", "spec": {
        "in_features": 10 ** 6, "out_features": 10 ** 6, "bias": False, "bits": 8, "group_size": None,
        "symmetric": True}}}), ["does not match the architecture", "missing key(s): lm_head.qweight"]),
    ("module name that is no path", _set_modules({"__class__": {"type": "QuantLinear", "spec": {}}}),
     ["not a module path"]),
    ("attached module over an attribute", _set_modules({"model.layers.0.self_attn.training": {
        "type": "QuantAttentionInputs", "spec": {}}}), ["would replace LlamaAttention.training", "not a module"]),
    ("module that does not exist", _set_modules({"nowhere": {"type": "QuantLinear", "spec": {}}}),
     ["'nowhere' does not exist"]),
    ("extra key in an entry", _set_modules({"lm_head": {"type": "QuantLinear", "spec": {}, "code": "x"}}),
     ["unknown key 'code'"]),
    ("unknown top-level key", lambda m: m.update(modulse={}), ["unknown key 'modulse'", "did you mean 'modules'"]),
    ("unknown architecture key", lambda m: m["architecture"].update(clas="x"), ["unknown key 'clas'", "'class'"]),
    ("unknown architecture kind", lambda m: m["architecture"].update(kind="python"), ["'architecture.kind'"]),
    ("class not a string", lambda m: m["architecture"].update({"class": ["LlamaForCausalLM"]}),
     ["'architecture.class'"]),
    ("kind a number", lambda m: m.update(kind=3), ["'kind' must be a string"]),
    ("source an object", lambda m: m.update(source={}), ["'source' must be a string"]),
    ("step without type", lambda m: m.update(steps=[{"bits": 8}]), ["'steps[0]'"]),
    ("defaults a list", lambda m: m.update(defaults=[]), ["'defaults' must be an object"]),
    ("input_shape a string", lambda m: m.update(defaults={"input_shape": "1x8x8"}), ["'defaults.input_shape'"]),
    ("image_mean not numbers", lambda m: m.update(defaults={"image_mean": [0.5, "x", 10 ** 400]}),
     ["'defaults.image_mean'"]),
    ("structure a list", lambda m: m.update(structure=[]), ["'structure' must be an object"]),
    ("sentence-transformers file escaping", lambda m: m.update(defaults={"sentence_transformers": {
        "modules": [{"path": "", "type": "sentence_transformers.models.Transformer"}],
        "files": {"1_Pooling": {"../../evil.json": {}}}}}), ["plain .json file name"]),
    ("whole file a list", lambda m: [m], ["must hold a JSON object", "an array"]),
    ("whole file a number", lambda m: 1, ["must hold a JSON object"]),
]


@pytest.mark.parametrize("change, words", [(c, w) for _, c, w in _BAD_META], ids=[n for n, _, _ in _BAD_META])
def test_malformed_slimkit_json(made, tmp_path, change, words):
    folder = _copy(made, "plain", tmp_path)
    _edit_json(folder / "slimkit.json", change)
    _refused(folder, "slimkit.json", *words)


@pytest.mark.parametrize("text, words", [
    ("{not json", ["slimkit.json is not valid JSON"]),
    ("[" * 100000 + "]" * 100000, ["slimkit.json is not valid JSON", "RecursionError"]),
    ('{"format": "slimkit", "format_version": 1e999}', ["'format_version' must be a positive integer"]),
    ("\xff\xfe", ["slimkit.json is not valid JSON"]),
], ids=["broken", "deeply nested", "infinite version", "not utf-8"])
def test_unparsable_slimkit_json(made, tmp_path, text, words):
    folder = _copy(made, "plain", tmp_path)
    (folder / "slimkit.json").write_bytes(text.encode("latin-1"))
    _refused(folder, *words)


_BAD_CONFIG = [
    ("a list", lambda c: [c], ["config.json must hold a JSON object", "an array"]),
    ("architectures a string", lambda c: c.update(architectures="LlamaForCausalLM"),
     ["config.json: 'architectures' must be a list"]),
    ("architectures of numbers", lambda c: c.update(architectures=[1]), ["'architectures' must be a list"]),
    ("unknown model_type", lambda c: c.update(model_type="no-such-model"), ["config.json cannot be read"]),
    ("negative size", lambda c: c.update(intermediate_size=-5), ["config.json"]),
    ("huge hidden size", lambda c: c.update(hidden_size=100000),
     ["config.json describes a model of", "parameters", "model.safetensors is only"]),
    ("huge layer count", lambda c: c.update(num_hidden_layers=10 ** 7), ["num_hidden_layers = 10,000,000"]),
]


@pytest.mark.parametrize("folder_name", ["plain", "hf"])
@pytest.mark.parametrize("change, words", [(c, w) for _, c, w in _BAD_CONFIG], ids=[n for n, _, _ in _BAD_CONFIG])
def test_malformed_config_json(made, tmp_path, folder_name, change, words):
    folder = _copy(made, folder_name, tmp_path)
    _edit_json(folder / "config.json", change)
    _refused(folder, *words)


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    _edit_json(folder / "config.json", lambda c: c.update(hidden_size=100000, intermediate_size=100000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the peak so far
    message = _refused(folder, "describes a model of", "refused before building the model")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB ({message})"


def test_a_zoo_architecture_larger_than_its_weights_is_refused(tmp_path):
    save(slimkit.load("digits-cnn"), tmp_path / "ck")
    _edit_json(tmp_path / "ck" / "slimkit.json",
               lambda m: m["architecture"]["config"].update(channels=[4096, 4096, 4096]))
    _refused(tmp_path / "ck", "slimkit.json describes a model of", "model.safetensors is only")


def test_a_users_module_checkpoint_is_checked_before_the_skeleton_changes(made, tmp_path):
    folder = _copy(made, "module", tmp_path)
    skeleton = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    _edit_json(folder / "slimkit.json", _set_modules({"0": {"type": "QuantLinear", "spec": {
        "in_features": 4000, "out_features": 3000, "bias": True, "bits": 8, "group_size": None, "symmetric": True}}}))
    _refused(folder, "does not match the architecture", skeleton=skeleton)
    assert type(skeleton[0]) is nn.Linear and all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    assert isinstance(load(made / "module", skeleton=nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))),
                      nn.Sequential)


# -- files that are not what they seem ------------------------------------------------------------------
def test_slimkit_json_linked_to_dev_zero_is_refused(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    (folder / "slimkit.json").unlink()
    os.symlink("/dev/zero", folder / "slimkit.json")
    _refused(folder, "slimkit.json is a symbolic link to /dev/zero", "outside")


def test_links_out_of_the_folder_fifos_and_folders_are_refused(made, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text((made / "plain" / "config.json").read_text())
    folder = _copy(made, "plain", tmp_path)
    (folder / "config.json").unlink()
    os.symlink(outside, folder / "config.json")
    _refused(folder, "config.json is a symbolic link", "outside")
    folder = _copy(made, "plain", tmp_path / "b")
    shutil.move(folder / "model.safetensors", tmp_path / "weights.safetensors")
    os.symlink(tmp_path / "weights.safetensors", folder / "model.safetensors")
    _refused(folder, "model.safetensors is a symbolic link", "outside")
    folder = _copy(made, "plain", tmp_path / "c")
    (folder / "slimkit.json").unlink()
    os.mkfifo(folder / "slimkit.json")
    _refused(folder, "slimkit.json is a FIFO")
    folder = _copy(made, "plain", tmp_path / "d")
    (folder / "slimkit.json").unlink()
    (folder / "slimkit.json").mkdir()
    _refused(folder, "slimkit.json is a folder")


def test_a_link_inside_the_folder_is_fine(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    shutil.move(folder / "config.json", folder / "real-config.json")
    os.symlink("real-config.json", folder / "config.json")
    assert isinstance(load(folder), nn.Module)


def test_oversized_json_is_refused_before_reading(made, tmp_path):
    folder = _copy(made, "plain", tmp_path)
    text = (folder / "slimkit.json").read_text()
    (folder / "slimkit.json").write_text(text[:-1] + " " * (2 << 20) + "}")
    _refused(folder, "slimkit.json is 2,", "more than the 1,048,576 bytes")
    hf = _copy(made, "hf", tmp_path)
    with open(hf / "config.json", "a") as fh:
        fh.write(" " * (2 << 20))
    _refused(hf, "config.json is", "more than the 1,048,576 bytes")


# -- fuzzing: one SlimkitError or a model, never another exception ------------------------------------------
_NAMES = ["kind", "class", "name", "config", "type", "spec", "format", "format_version", "modules", "steps",
          "in_features", "out_features", "bits", "group_size", "bias", "symmetric", "lm_head", "model.norm",
          "num_heads", "intermediate_size", "input_shape", "sentence_transformers", "path", "files"]
_LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-3, max_value=70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["slimkit", "transformers", "zoo", "module", "LlamaForCausalLM", "QuantLinear",
                              "StructuredPrune", "TrainingArguments", "digits-cnn", "lm_head"]))
_JSON = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(_NAMES) | st.text(max_size=8), inner, max_size=4),
                     max_leaves=16)


@pytest.fixture(scope="module")
def fuzz_folder(made, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(made / "plain", folder)
    return folder


def _load_or_slimkit_error(folder: Path, meta) -> None:
    (folder / "slimkit.json").write_text(json.dumps(meta))
    try:
        load(folder)
    except SlimkitError:
        pass


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(meta=_JSON)
def test_fuzz_the_whole_slimkit_json(fuzz_folder, meta):
    _load_or_slimkit_error(fuzz_folder, meta)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(key=st.sampled_from([*META_KEYS, "architecture.class", "architecture.kind", "architecture.config",
                            "modules.lm_head", "modules.lm_head.spec", "structure.model.norm"]), value=_JSON)
def test_fuzz_each_known_key(made, fuzz_folder, key, value):
    meta = json.loads((made / "plain" / "slimkit.json").read_text())
    meta["steps"] = [{"type": "StructuredPrune"}]  # so that 'structure' values reach the pruning loader
    head, _, rest = key.partition(".")
    if not rest:
        meta[head] = value
    elif head == "modules":
        entry = {"type": "QuantLinear", "spec": {"in_features": 16, "out_features": 32, "bias": False, "bits": 8,
                                                  "group_size": None, "symmetric": True}}
        if rest == "lm_head":
            entry = value
        else:
            entry["spec"] = value
        meta["modules"] = {"lm_head": entry}
    elif head == "structure":
        meta["structure"] = {rest: value}
    else:
        meta["architecture"][rest] = value
    _load_or_slimkit_error(fuzz_folder, meta)
