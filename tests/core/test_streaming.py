"""Streaming: blocks read from safetensors one at a time, written out incrementally, reloaded exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimkit
from slimkit.core.atomic import atomic_dir
from slimkit.core.blockwise import linear_groups, run_blockwise
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ModelLoadError, UnsupportedError
from slimkit.core.io import META_FILE, WEIGHTS_FILE, checkpoint_meta
from slimkit.core.registry import Context
from slimkit.api import compress_checkpoint
from slimkit.core.streaming import (BlockStream, CheckpointIndex, SafetensorsWriter, lazy_model,
                                    memory_estimate)
from slimkit.core.targets import set_submodule
from slimkit.quantization.modules import QuantLinear
from tests.llm_archs import tiny_causal_lm, token_batches


def test_writer_output_is_a_valid_safetensors_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.int32),
               "h": torch.randn(2, 2).to(torch.bfloat16), "u": torch.randint(0, 255, (9,), dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    w = SafetensorsWriter(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        w.add(k, v)
    with pytest.raises(ValueError, match="twice"):
        w.add("a", torch.ones(1))
    w.close()
    assert not (tmp_path / "x.safetensors.data").exists()
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def _quantize_block(b):
    """A stand-in blockwise method: int4 RTN of every Linear of the block."""
    for group in linear_groups(b.block, b.calls):
        for name in group.names:
            set_submodule(b.block, name, QuantLinear.from_linear(b.block.get_submodule(name), 4, 16))


def _save_hf(tmp_path, layers=3):
    model = tiny_causal_lm("llama", layers=layers)
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    return model, folder


def test_streamed_blocks_equal_the_in_memory_run(tmp_path):
    model, folder = _save_hf(tmp_path)
    data = CalibrationData.from_tensors(token_batches(4, 16), batch_size=2, key="input_ids")
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    run_blockwise(model, data, _quantize_block)  # reference: everything in memory

    lazy = lazy_model(folder)
    assert all(p.is_meta for p in lazy.parameters())
    estimate = memory_estimate(lazy, data)
    assert estimate.block == block_bytes  # the unquantized block, in float32
    assert "one block" in estimate.describe()

    out = tmp_path / "out"
    loaded_blocks = []
    with atomic_dir(out) as tmp:
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE)
        stream = BlockStream(CheckpointIndex(folder), writer)
        original_load = stream.load_block

        def spy(name, block):
            original_load(name, block)
            # Only this block is materialized; every other block is still on the meta device.
            loaded_blocks.append([not any(p.is_meta for p in blk.parameters()) for blk in lazy.model.layers])
        stream.load_block = spy
        run_blockwise(lazy, data, _quantize_block, Context(stream=stream))
        stream.finish(lazy)
        writer.close()
        lazy.config.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(checkpoint_meta(lazy)))
    assert loaded_blocks == [[True, False, False], [False, True, False], [False, False, True]]
    assert all(p.is_meta for p in lazy.parameters())  # everything released at the end

    reloaded = slimkit.load(out)
    ids = token_batches(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_index_reads_sharded_checkpoints_and_rejects_corrupt_files(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    idx = CheckpointIndex(folder)
    got = idx.read(["a", "b"])
    assert torch.equal(got["a"], torch.ones(2)) and torch.equal(got["b"], torch.zeros(3))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        CheckpointIndex(bad)


def test_compress_checkpoint_refuses_a_method_that_is_not_blockwise(tmp_path):
    _, folder = _save_hf(tmp_path, layers=2)
    data = CalibrationData.from_tensors(token_batches(2, 8), key="input_ids")
    with pytest.raises(UnsupportedError, match="block by block"):
        compress_checkpoint(folder, tmp_path / "out", slimkit.RTN(bits=4), data)
    assert not (tmp_path / "out").exists()


def test_compress_checkpoint_with_gptq_equals_gptq_in_memory(tmp_path):
    from slimkit.core.io import load
    from slimkit.quantization.gptq import GPTQ

    model, folder = _save_hf(tmp_path)
    data = CalibrationData.from_tensors(token_batches(4, 16), batch_size=2, key="input_ids")
    config = GPTQ(bits=4, group_size=32)
    ctx = Context()
    compress_checkpoint(folder, tmp_path / "out", config, data, ctx)
    block_mb = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) / 2**20
    assert ctx.notes[0].startswith(f"memory estimate: one block {block_mb:.1f} MB")
    slimkit.quantize_(model, config, data)
    streamed = load(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in streamed.modules()) == 21
    ids = token_batches(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
