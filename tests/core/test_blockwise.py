"""Block-by-block plumbing: Linear groups, token feeding, scale folding, and the block walk."""

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.blockwise import (
    block_outputs,
    feed_inputs,
    fold_input_scale,
    linear_groups,
    run_blockwise,
)
from slimkit.core.calibration import CalibrationData, iterate_blocks
from slimkit.core.linear_like import in_features, linear_weight
from slimkit.core.registry import Context
from tests.llm_archs import ALL_ARCHS, tiny_causal_lm, token_batches

EXPECTED_GROUPS = {
    "llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)],
    "opt": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)],
    "phi3": [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)],
    "gpt2": [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)],  # transformers Conv1D
    "gpt_neox": [("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                 ("mlp.dense_4h_to_h",)],
    # Falcon runs attention and MLP in parallel on one norm's output: qkv and h_to_4h are one group.
    "falcon": [("self_attention.query_key_value", "mlp.dense_h_to_4h"), ("self_attention.dense",),
               ("mlp.dense_4h_to_h",)],
    "bloom": [("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
              ("mlp.dense_4h_to_h",)],
}
# llama/qwen2 tiny configs use grouped-query attention (2 kv heads for 4 query heads), so
# o_proj's input width differs from v_proj's output and cannot take v_proj's scale. The
# fused and GELU MLPs (phi3 gate_up, gpt2, neox, falcon, bloom) have no producer for the
# down projection.
_LLAMA_PRODUCERS = ["input_layernorm", None, "post_attention_layernorm", "mlp.up_proj"]
EXPECTED_PRODUCERS = {
    "llama": _LLAMA_PRODUCERS, "qwen2": _LLAMA_PRODUCERS, "qwen3": _LLAMA_PRODUCERS, "gemma": _LLAMA_PRODUCERS,
    "mistral": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
    "opt": ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"],
    "phi3": ["input_layernorm", None, "post_attention_layernorm", None],
    "gpt2": ["ln_1", None, "ln_2", None],
    "gpt_neox": ["input_layernorm", None, "post_attention_layernorm", None],
    "falcon": ["input_layernorm", None, None],
    "bloom": ["input_layernorm", None, "post_attention_layernorm", None],
}
# A fold needs a producer that scales linearly: Gemma's norms compute x·(1 + w), so only
# up_proj takes a scale there; Falcon's h_to_4h -> GELU -> 4h_to_h has none.
EXPECTED_FOLDS = {arch: [p is not None for p in producers] for arch, producers in EXPECTED_PRODUCERS.items()}
EXPECTED_FOLDS["gemma"] = [False, False, False, True]


def _data(n=4, seq=16):
    return CalibrationData.from_tensors(token_batches(n, seq), batch_size=2, key="input_ids")


def _first_block(model, data):
    return next(iter(iterate_blocks(model, data)))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_linear_groups_follow_execution_and_shared_inputs(arch):
    model = tiny_causal_lm(arch)
    b = _first_block(model, _data())
    groups = linear_groups(b.block, b.calls)
    expected = EXPECTED_GROUPS.get(arch, EXPECTED_GROUPS["llama"])
    assert [g.names for g in groups] == expected
    assert [g.producer for g in groups] == EXPECTED_PRODUCERS[arch]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_folding_a_scale_keeps_the_block_output(arch):
    model = tiny_causal_lm(arch)
    b = _first_block(model, _data())
    before = block_outputs(b.block, b.calls)
    g = torch.Generator().manual_seed(0)
    folded = []
    for group in linear_groups(b.block, b.calls):
        first = b.block.get_submodule(group.names[0])
        w_before = linear_weight(first).clone()  # (out, in), also for GPT-2's (in, out) Conv1D
        scale = torch.rand(in_features(first), generator=g) * 3 + 0.25
        ok = fold_input_scale(b.block, group, scale, b.calls[0])
        folded.append(ok)
        w_after = linear_weight(first)
        if ok:  # the weight's input columns carry the scale now
            torch.testing.assert_close(w_after, w_before * scale, rtol=1e-6, atol=0)
        else:
            assert torch.equal(w_after, w_before)
    after = block_outputs(b.block, b.calls)
    for x, y in zip(before, after):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    assert folded == EXPECTED_FOLDS[arch]


class _GeluMLP(nn.Module):
    """fc1 -> GELU -> fc2: GELU does not commute with a scale, so fc2 must not take fc1 as producer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class _Stack(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.layers = nn.ModuleList(_GeluMLP() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_fold_refuses_a_producer_that_does_not_scale_linearly():
    torch.manual_seed(0)
    model = _Stack().eval()
    data = CalibrationData.from_tensors(torch.randn(4, 5, 8), batch_size=2)
    b = _first_block(model, data)
    group = [g for g in linear_groups(b.block, b.calls) if g.names == ("fc2",)][0]
    assert group.producer == "fc1"  # the name rule proposes it ...
    state = {k: v.clone() for k, v in b.block.state_dict().items()}
    assert not fold_input_scale(b.block, group, torch.full((16,), 2.0), b.calls[0])  # ... the check refuses it
    for k, v in b.block.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="positive"):
        fold_input_scale(b.block, group, -torch.ones(16), b.calls[0])


def test_feed_inputs_streams_every_token_of_every_call():
    model = tiny_causal_lm("llama")
    data = _data(n=6, seq=8)
    b = _first_block(model, data)
    seen: dict[str, list[torch.Tensor]] = {}
    counts = feed_inputs(b.block, b.calls, ["self_attn.q_proj", "mlp.down_proj"],
                         lambda n, x: seen.setdefault(n, []).append(x.clone()))
    assert counts == {"self_attn.q_proj": 48, "mlp.down_proj": 48}
    x = torch.cat(seen["self_attn.q_proj"])
    assert x.shape == (48, 64)
    # The q_proj input is the attention norm of the block input.
    ref = torch.cat([b.block.input_layernorm(c.args[0] if c.args else c.kwargs["hidden_states"]).reshape(-1, 64)
                     for c in b.calls])
    torch.testing.assert_close(x, ref)


def test_feed_inputs_reports_a_layer_that_never_runs():
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    model = nn.Sequential()
    model.layers = nn.ModuleList([Routed(), Routed()])
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    data = CalibrationData.from_tensors(torch.randn(4, 3, 8), batch_size=2)
    b = _first_block(model, data)
    assert feed_inputs(b.block, b.calls, ["used", "unused"], lambda n, x: None) == {"used": 12, "unused": 0}
    groups = linear_groups(b.block, b.calls)
    assert [g.names for g in groups] == [("used",), ("unused",)]


def test_run_blockwise_feeds_each_block_the_edited_outputs():
    model = tiny_causal_lm("llama", layers=3)
    data = _data()
    seen_inputs = []

    def process(b):
        seen_inputs.append(b.calls[0].args[0].clone() if b.calls[0].args else b.calls[0].kwargs["hidden_states"].clone())
        with torch.no_grad():
            b.block.mlp.down_proj.weight.zero_()  # an edit the next block must see

    progress = []
    ctx = Context(progress=lambda d, f: progress.append((d, f)))
    assert run_blockwise(model, data, process, ctx, label="test") == 3
    assert [round(f, 3) for _, f in progress] == [0.333, 0.667, 1.0]
    # Recompute what block 1 should receive: block 0 (edited) on the recorded block-0 input.
    b0 = model.model.layers[0]
    call = next(iter(iterate_blocks(model, data))).calls[0]
    expected = b0(*call.args, **call.kwargs)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(seen_inputs[1], expected)


def test_an_architecture_without_repeated_blocks_is_refused_saying_what_was_found():
    from slimkit.core.errors import UnsupportedError
    from slimkit.quantization.gptq import GPTQ

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    data = CalibrationData.from_tensors(torch.randn(4, 8))
    with pytest.raises(UnsupportedError, match=r"Sequential has no list of repeated blocks.*children: 0: Linear, 1: ReLU"):
        run_blockwise(model, data, lambda b: None)
    mixed = nn.Module()
    mixed.layers = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])
    with pytest.raises(UnsupportedError, match=r"found module lists layers \(2 x Linear, ReLU\)"):
        slimkit.quantize_(mixed, GPTQ(bits=4, group_size=None), data)
