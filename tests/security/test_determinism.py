"""The same seed and thread count give byte-identical outputs; the thread count is recorded."""

import json

import torch

import slimkit as sk
from tests.llm_archs import tiny_causal_lm, token_batches


def _gptq_bytes(tmp, name):
    model = tiny_causal_lm("llama")
    data = sk.CalibrationData.from_tensors(token_batches(8, 32), batch_size=4, key="input_ids")
    sk.quantize_(model, sk.GPTQ(bits=4, group_size=32), data=data)
    sk.save(model, tmp / name)
    return (tmp / name / "model.safetensors").read_bytes(), json.loads((tmp / name / "slimkit.json").read_text())


def test_gptq_twice_at_one_thread_count_is_byte_identical_and_records_it(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, meta = _gptq_bytes(tmp_path, "a")
        b, _ = _gptq_bytes(tmp_path, "b")
    finally:
        torch.set_num_threads(threads)
    assert a == b
    assert meta["torch_threads"] == 1
