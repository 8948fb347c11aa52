"""The decoder-with-past ONNX export and ONNX Runtime's generation loop over it (``slimkit.export.onnx_decoder``).

References are PyTorch runs of the same weights with a transformers KV cache; quantized models
are compared with a float copy holding their dequantized weights (so the reference does not
depend on which kernel QuantLinear picks on this machine).
"""

from __future__ import annotations

import copy
import inspect
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import slimkit as sk
from slimkit.core.errors import ConfigError
from slimkit.core.targets import set_submodule
from slimkit.export.nbits import accuracy_levels
from slimkit.export.onnx import export_onnx, op_counts
from slimkit.export.onnx_decoder import DECODER_KEY, OrtDecoder, export_decoder_onnx
from slimkit.quantization.modules import QuantLinear
from tests.llm_archs import tiny_causal_lm

NEW_TOKENS = 20
PROMPT = torch.tensor([[3, 17, 42, 5, 99, 64, 7, 11]])


def lm(arch: str) -> nn.Module:
    """A tiny 2-layer model of ``arch`` with no eos id, so every run produces all the tokens asked for."""
    model = tiny_causal_lm(arch, layers=2)
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    return model


def torch_greedy(model: nn.Module, prompt: torch.Tensor, n: int, logits: list | None = None) -> list[int]:
    """Greedy tokens from ``model`` with a transformers DynamicCache (prefill, then one token per step);
    each step's last-position logits are appended to ``logits`` when given."""
    from transformers import DynamicCache

    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens: list[int] = []
    cache, ids = DynamicCache(), prompt
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=ids, use_cache=True, **{keyword: cache})
            returned = getattr(out, "cache", None)
            cache = returned if returned is not None else out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            if logits is not None:
                logits.append(out.logits[0, -1].numpy())
            ids = torch.tensor([[tokens[-1]]])
    return tokens


def recording(decoder: OrtDecoder, logits: list) -> OrtDecoder:
    """``decoder`` with its ``step`` appending each call's last-position logits to ``logits``."""
    step = decoder.step

    def recorded(ids, state):
        out, state = step(ids, state)
        logits.append(out[0, -1].numpy())
        return out, state

    decoder.step = recorded
    return decoder


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` whose QuantLinear layers are nn.Linear with the dequantized weights."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(m.dense_weight())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            set_submodule(dense, name, linear)
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    return dense.eval()


def full_logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def fp32_export(request, tmp_path_factory):
    """(arch, model, decoder file) for a float Llama (GQA, RoPE) and a float GPT-2 (Conv1D, learned positions)."""
    model = lm(request.param)
    path = tmp_path_factory.mktemp("dec") / f"{request.param}.onnx"
    export_decoder_onnx(model, path)
    return request.param, model, path


# -- (a) float models: ORT's greedy loop == PyTorch's, prefill logits within 1e-4 ------------------------
def test_fp32_greedy_tokens_and_prefill_logits_match_pytorch(fp32_export):
    arch, model, path = fp32_export
    got, want = [], []
    decoder = recording(OrtDecoder(path, threads=2), got)
    result = decoder.generate(PROMPT, NEW_TOKENS)
    assert result.runtime == "onnxruntime" and result.threads == 2 and result.new_tokens == NEW_TOKENS
    assert result.new_ids[0].tolist() == torch_greedy(model, PROMPT, NEW_TOKENS, want)
    # every step's logits, not only their argmax: a wrong position or cache shows here first
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4, rtol=0)
    decoder = OrtDecoder(path)
    logits, state = decoder.step(PROMPT, None)
    np.testing.assert_allclose(logits.numpy(), full_logits(model, PROMPT), atol=1e-4, rtol=0)
    assert state.length == PROMPT.shape[1]
    kv_heads = {"llama": 2, "gpt2": 4}[arch]  # Llama's GQA keeps 2 kv heads of the 4 query heads
    assert [p.shape for p in state.past] == [(1, kv_heads, PROMPT.shape[1], 16)] * 4


def test_graph_layout_and_recorded_metadata(fp32_export):
    arch, _, path = fp32_export
    import onnx

    proto = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    kv = {"llama": 2, "gpt2": 4}[arch]
    past = [f"past_key_values.{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert list(dims) == ["input_ids", "attention_mask", "position_ids", *past, "logits",
                          *(n.replace("past_key_values", "present") for n in past)]
    assert dims["input_ids"] == dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", kv, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", kv, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 128]
    info = OrtDecoder(path).info
    assert (info.num_layers, info.kv_heads, info.head_dim, info.position_ids, info.max_positions) == (2, kv, 16, True,
                                                                                                      128)
    assert any(p.key == DECODER_KEY for p in proto.metadata_props)


# -- (e) a decode step with a past gives the full forward's logits at those positions ---------------------
def test_steps_with_past_match_the_full_forward(fp32_export):
    _, model, path = fp32_export
    decoder = OrtDecoder(path)
    ids = torch.cat([PROMPT, torch.tensor([[8, 120, 33, 1]])], dim=1)  # 12 tokens
    _, state = decoder.step(ids[:, :7], None)
    two, state = decoder.step(ids[:, 7:9], state)  # past 7, two new tokens
    one, state = decoder.step(ids[:, 9:10], state)  # past 9, one new token
    assert state.length == 10
    ref = full_logits(model, ids)
    np.testing.assert_allclose(two.numpy(), ref[:, 7:9], atol=1e-4, rtol=0)
    np.testing.assert_allclose(one.numpy(), ref[:, 9:10], atol=1e-4, rtol=0)
    # batch 2 through the same graph: each row's step logits equal its own full forward
    rows = torch.stack([ids[0], ids[0].flip(0)])
    _, state = decoder.step(rows[:, :6], None)
    step, _ = decoder.step(rows[:, 6:8], state)
    np.testing.assert_allclose(step.numpy(), full_logits(model, rows)[:, 6:8], atol=1e-4, rtol=0)


# -- (b) quantized models: MatMulNBits nodes, and at accuracy_level 0 PyTorch's tokens ----------------
@pytest.mark.parametrize("config,bits", [(sk.RTN(bits=8), 8), (sk.RTN(bits=4, group_size=32), 4)],
                         ids=["rtn8", "rtn4-g32"])
def test_quantized_llama_is_matmulnbits_and_matches_its_dequantized_weights(config, bits, tmp_path):
    model = lm("llama")
    sk.quantize_(model, config)
    result = export_decoder_onnx(model, tmp_path / "q.onnx", accuracy_level=0)
    # 2 layers x 7 Linears + lm_head, every one a MatMulNBits node of the layer's bit width; attention stays MatMul
    assert op_counts(result.path)["MatMulNBits"] == 15
    assert sum(f"MatMulNBits bits={bits}" in n and "accuracy_level=0" in n for n in result.notes) == 15
    assert set(accuracy_levels(result.path).values()) == {0}
    assert any("no fast float kernel for 8-bit" in n for n in result.notes) == (bits == 8)  # the slow-path warning
    reference = dequantized_copy(model)
    decoder = OrtDecoder(result.path)
    assert decoder.generate(PROMPT, NEW_TOKENS).new_ids[0].tolist() == torch_greedy(reference, PROMPT, NEW_TOKENS)
    logits, _ = decoder.step(PROMPT, None)
    np.testing.assert_allclose(logits.numpy(), full_logits(reference, PROMPT), atol=1e-4, rtol=0)


# -- (c) a graph without a KV cache is refused -------------------------------------------------------------
def test_a_graph_without_past_inputs_is_refused_in_one_line(tmp_path):
    model = lm("llama")
    path = export_onnx(model, tmp_path / "plain.onnx", past=False).path
    import onnx

    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input_ids", "attention_mask"]
    with pytest.raises(ConfigError) as refused:
        OrtDecoder(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "KV-cache" in message and "past_key_values" in message


# -- (d) the context length ---------------------------------------------------------------------------------
def test_a_prompt_longer_than_the_context_is_refused_naming_both_lengths(fp32_export):
    _, _, path = fp32_export
    decoder = OrtDecoder(path)
    with pytest.raises(ConfigError, match=r"129 tokens.*context of 128 positions"):
        decoder.generate(torch.zeros(1, 129, dtype=torch.long), 5)
    # a prompt that fits but leaves less room than asked: what fits, said in the notes
    result = decoder.generate(torch.zeros(1, 124, dtype=torch.long), 10)
    assert result.new_tokens == 4 and "at most 4 tokens, not 10" in result.notes[0]
    _, state = decoder.step(torch.zeros(1, 127, dtype=torch.long), None)
    with pytest.raises(ConfigError, match=r"129 tokens exceed the model's context of 128"):
        decoder.step(torch.zeros(1, 2, dtype=torch.long), state)


# -- files from elsewhere, and eos ------------------------------------------------------------------------
def test_a_file_without_slimkit_metadata_is_read_from_its_graph(fp32_export, tmp_path):
    import onnx

    _, model, path = fp32_export
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if not p.key.startswith("slimkit.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    decoder = OrtDecoder(bare)
    recorded = OrtDecoder(path).info
    assert decoder.info == replace(recorded, vocab_size=None, max_positions=None, eos_token_ids=(), bos_token_id=None)
    assert decoder.generate(PROMPT, 5).new_ids[0].tolist() == torch_greedy(model, PROMPT, 5)


def test_generation_stops_at_the_recorded_eos(fp32_export, tmp_path):
    _, model, path = fp32_export
    tokens = torch_greedy(model, PROMPT, 6)
    decoder = OrtDecoder(shutil.copy(path, tmp_path / "eos.onnx"))
    assert decoder.eos_token_id is None
    decoder.info = replace(decoder.info, eos_token_ids=(tokens[3],))  # as if exported with this eos id
    stop = tokens.index(tokens[3]) + 1
    assert decoder.generate(PROMPT, 6).new_ids[0].tolist() == tokens[:stop]
    assert decoder.generate(PROMPT, 6, eos_token_id=-1).new_ids[0].tolist() == tokens  # an explicit id wins


def test_export_onnx_writes_the_accuracy_level_it_is_given(tmp_path):
    """The level reaches the nodes and their notes on the graph without a cache too (the CLI's --accuracy-level)."""
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 32), 4, 32, True, act_mode=None)).eval()
    x = torch.randn(2, 3, 64)
    default = export_onnx(model, tmp_path / "d.onnx", example=x)
    exact = export_onnx(model, tmp_path / "e.onnx", example=x, accuracy_level=0)
    assert set(accuracy_levels(default.path).values()) == {4} and set(accuracy_levels(exact.path).values()) == {0}
    assert "accuracy_level=0" in exact.notes[0] and "accuracy_level=4" in default.notes[0]
    with pytest.raises(ConfigError, match="accuracy_level must be one of"):
        export_onnx(model, tmp_path / "bad.onnx", example=x, accuracy_level=7)
