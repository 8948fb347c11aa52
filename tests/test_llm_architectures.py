"""Every one-shot LLM method on tiny random-init causal LMs of eleven architectures, with nothing skipped.

Each architecture (``tests.llm_archs.ALL_ARCHS``: Llama, Qwen2/3, Mistral, Gemma, Phi-3,
GPT-2, GPT-NeoX, OPT, Falcon, BLOOM) goes through RTN int8 (embeddings too), GPTQ and AWQ
w4 g32, SmoothQuant + per-token DynamicQuant, Wanda 50% and SparseGPT 2:4 via the public
API. For each: every Linear-like layer of the decoder blocks (nn.Linear, Falcon's
``FalconLinear``, GPT-2's ``Conv1D``) is replaced or pruned, and the handler's own summary
counts the same number; the logits stay near the float model's; a slimkit checkpoint
reloads to identical logits. Some variants also go to ONNX (ORT logits checked) and to a
compressed-tensors folder that transformers loads, which the format refuses for GPT-2's
Conv1D and Falcon's FalconLinear with a one-line error naming the architecture and layer.
Plumbing only: the models are random, so the bounds are loose.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.calibration import find_blocks
from slimkit.core.errors import UnsupportedError
from slimkit.core.linear_like import is_linear_like, linear_kind, linear_weight
from slimkit.core.registry import Context
from slimkit.quantization.modules import QuantEmbedding, QuantLinear, TiedQuantLinear
from tests.llm_archs import ALL_ARCHS, tiny_causal_lm, token_batches

torch.set_num_threads(1)

IDS = token_batches(8, 32)
METHODS = {
    "rtn": lambda: [sk.RTN(bits=8, embeddings=True)],
    "gptq": lambda: [sk.GPTQ(bits=4, group_size=32)],
    "awq": lambda: [sk.AWQ(bits=4, group_size=32)],
    "smoothquant": lambda: [sk.SmoothQuant(alpha=0.5), sk.DynamicQuant(per_token=True)],
    "wanda": lambda: [sk.Wanda(sparsity=0.5)],
    "sparsegpt": lambda: [sk.SparseGPT(pattern="2:4")],
}
# ‖logits − float logits‖ / ‖float logits‖ on random models; a broken model is near 1 or more.
BOUNDS = {"rtn": 0.05, "gptq": 0.25, "awq": 0.25, "smoothquant": 0.05, "wanda": 0.6, "sparsegpt": 0.6}
# Linear-like layers per decoder block: q/k/v/o + gate/up/down; fused qkv/gate_up (Phi-3);
# qkv + dense + two MLP layers (GPT-2's Conv1D, GPT-NeoX, Falcon, BLOOM); OPT's q/k/v/out + fc1/fc2.
PER_BLOCK = {"llama": 7, "qwen2": 7, "qwen3": 7, "mistral": 7, "gemma": 7, "phi3": 4, "gpt2": 4, "gpt_neox": 4,
             "opt": 6, "falcon": 4, "bloom": 4}


def block_linears(model: nn.Module) -> list[str]:
    """Names of the Linear-like layers inside the decoder blocks."""
    blocks, _ = find_blocks(model)
    return sorted(n for n, m in model.named_modules() if n.startswith(blocks + ".") and is_linear_like(m))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@functools.cache
def compressed(arch: str, method: str):
    """``(model, notes, block layer names, float logits)`` of ``arch`` after ``method``; shared, never modified."""
    model = tiny_causal_lm(arch)
    names = block_linears(model)
    with torch.no_grad():
        ref = model(input_ids=IDS[:2]).logits
    ctx = Context()
    data = sk.CalibrationData.from_tensors(IDS, batch_size=4, key="input_ids")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 calibration samples: the few-samples warning
        for cfg in METHODS[method]():
            verb = sk.prune_ if cfg.family == "prune" else sk.quantize_
            verb(model, cfg, data=data if cfg.needs_data else None, ctx=ctx)
    return model, tuple(ctx.notes), tuple(names), ref


def summary_count(notes, pattern: str) -> int:
    """The number in the handler's summary note matching ``pattern`` (one group)."""
    found = [int(m.group(1)) for n in notes if (m := re.search(pattern, n))]
    assert len(found) == 1, notes
    return found[0]


def check_quantized(model, notes, names, method):
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n in names)
    assert quantized == list(names)  # every block layer, whatever its class was
    if method == "gptq":
        assert summary_count(notes, r"GPTQ: quantized (\d+) Linear layer") == len(names)
    elif method == "awq":
        assert summary_count(notes, r"AWQ: quantized (\d+) Linear layer") == len(names)
    elif method == "smoothquant":
        assert all(model.get_submodule(n).act_mode == "dynamic_token" for n in names)
        assert summary_count(notes, r"DynamicQuant: (\d+) layer\(s\) quantized") == len(names) + 1  # + lm_head
        assert summary_count(notes, r"SmoothQuant: alpha 0.5: smoothed (\d+) input group") >= 1
    elif method == "rtn":
        # Outside the blocks too: lm_head (tied to the table where the model ties them) and the embeddings.
        # A layer left float must be named in a "skipped" note (OPT's position embedding offsets its ids).
        for name, m in model.named_modules():
            if is_linear_like(m) or isinstance(m, nn.Embedding):
                assert any(f"skipped {name}:" in n for n in notes), (name, notes)
        head = model.get_output_embeddings()
        table = model.get_input_embeddings()
        assert isinstance(table, QuantEmbedding)
        if isinstance(head, TiedQuantLinear):
            assert head.table is table and torch.equal(head.weight, table.weight)
        else:
            assert isinstance(head, QuantLinear)


def check_pruned(model, notes, names, method):
    label = "Wanda" if method == "wanda" else "SparseGPT"
    assert summary_count(notes, label + r": pruned (\d+) Linear layer") == len(names)
    assert not any("fallback" in n and "magnitude" in n and "used" in n for n in notes)
    for name in names:
        w = linear_weight(model.get_submodule(name))  # (out, in), also for GPT-2's Conv1D
        if method == "wanda":  # exactly half of every output row
            assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), name
        else:  # 2:4 along the inputs: two zeros in every group of four
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_method_covers_every_block_linear_and_reloads(arch, method, tmp_path):
    model, notes, names, ref = compressed(arch, method)
    assert len(names) == 2 * PER_BLOCK[arch]
    if method in ("wanda", "sparsegpt"):
        check_pruned(model, notes, names, method)
    else:
        check_quantized(model, notes, names, method)
    with torch.no_grad():
        out = model(input_ids=IDS[:2]).logits
    assert rel_error(out, ref) < BOUNDS[method]
    sk.save(model, tmp_path / "ckpt")
    reloaded = sk.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS[:2]).logits, out)
    if method in ("wanda", "sparsegpt"):  # pruned in their own layout: GPT-2 reloads its Conv1D as they were
        for name in names:
            before, after = model.get_submodule(name), reloaded.get_submodule(name)
            assert type(after) is type(before) and torch.equal(after.weight, before.weight)


def test_gpt2_and_falcon_layers_are_the_linear_like_kinds():
    gpt2, falcon = tiny_causal_lm("gpt2"), tiny_causal_lm("falcon")
    assert {type(gpt2.get_submodule(n)).__name__ for n in block_linears(gpt2)} == {"Conv1D"}
    assert {linear_kind(gpt2.get_submodule(n)) for n in block_linears(gpt2)} == {"conv1d"}
    assert {type(falcon.get_submodule(n)).__name__ for n in block_linears(falcon)} == {"FalconLinear"}


# One quantized and one pruned variant of the architectures whose layer kinds differ most
# (ONNX exports take seconds each): GPT-2's Conv1D, Falcon's FalconLinear, Gemma's scaled
# embedding with lm_head tied to its codes, Phi-3's fused projections.
ONNX_CASES = [("gpt2", "gptq"), ("falcon", "awq"), ("gemma", "rtn"), ("phi3", "smoothquant"),
              ("gpt2", "sparsegpt"), ("falcon", "wanda")]


@pytest.mark.parametrize("arch,method", ONNX_CASES)
def test_onnx_export_matches_pytorch(arch, method, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slimkit.export.onnx import export_onnx

    model, _, _, _ = compressed(arch, method)
    result = export_onnx(model, tmp_path / "model.onnx", check=True)  # ORT vs PyTorch logits, within tolerance
    assert result.max_abs_diff is not None and result.max_abs_diff < 0.05


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_compressed_tensors_folder_loads_or_is_refused_in_one_line(arch, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    from slimkit.export.compressed_tensors import export_compressed_tensors

    model, _, _, _ = compressed(arch, "gptq")
    if arch in ("gpt2", "falcon"):
        kind = {"gpt2": "Conv1D", "falcon": "FalconLinear"}[arch]
        with pytest.raises(UnsupportedError) as err:
            export_compressed_tensors(model, tmp_path / "ct")
        message = str(err.value)
        assert "\n" not in message and type(model).__name__ in message and f"as a {kind}" in message
        assert not (tmp_path / "ct").exists()
        return
    export_compressed_tensors(model, tmp_path / "ct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        ref, got = model(input_ids=IDS[:2]).logits, loaded(input_ids=IDS[:2]).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # the same codes, decompressed exactly
