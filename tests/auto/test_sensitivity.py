"""Per-layer sensitivity for every family, against slow references (torch's pruning, a hand-run KL)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.auto.sensitivity import (
    DEFAULT_GRID,
    first_rows,
    layer_sensitivity,
    magnitude_pruned,
    pruned_bytes,
    quantized_bytes,
    sensitivity_group,
)
from slimkit.core.errors import ConfigError, DataError
from slimkit.factorization.svd import FactorizedLinear, rank_for_param_ratio
from slimkit.quantization.modules import QuantLinear
from slimkit.tasks import GenericTask, set_task


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.GELU(), nn.Linear(32, 10)).eval()
    return set_task(model, GenericTask(example_inputs=torch.randn(2, 64)))


def test_bytes_by_hand():
    assert sensitivity_group(256) == 128 and sensitivity_group(96) == 32 and sensitivity_group(10) is None
    assert quantized_bytes(10, 256, 4, 128) == 10 * 256 // 2 + 4 * 10 * 2
    assert quantized_bytes(10, 30, 3, None) == math.ceil(300 * 3 / 8) + 40
    assert pruned_bytes(10, 30, 0.5) == math.ceil(300 / 8) + 4 * 150


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]), st.integers(0, 10**6))
def test_magnitude_pruning_matches_torch_l1_unstructured(out_f, in_f, fraction, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    ours = magnitude_pruned(lin, fraction)
    ref = nn.Linear(in_f, out_f)
    ref.load_state_dict(lin.state_dict())
    torch_prune.l1_unstructured(ref, "weight", amount=round(out_f * in_f * fraction))
    assert torch.equal(ours.weight, ref.weight.detach())  # random floats: no ties
    assert torch.equal(lin.weight, ref.weight_orig)  # the original is untouched


def _kl(ref: torch.Tensor, new: torch.Tensor) -> float:
    p, q = ref.double().log_softmax(-1), new.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_each_divergence_is_the_hand_run_kl_with_that_layer_alone_replaced():
    model = _model()
    batches = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sens = layer_sensitivity(model, batches, max_rows=24)
    with torch.no_grad():
        ref = [model(b) for b in batches]
    assert [s.name for s in sens.layers] == ["0", "2", "4"]
    for s in sens.layers:
        layer = model.get_submodule(s.name)
        for bits in DEFAULT_GRID["quantize"]:
            new = QuantLinear.from_linear(layer, int(bits), sensitivity_group(layer.in_features), True)
            want = _replaced_kl(model, s.name, new, batches, ref)
            assert s.curves["quantize"][bits][1] == pytest.approx(want, rel=1e-9, abs=1e-15)
        for frac in DEFAULT_GRID["prune"]:
            want = _replaced_kl(model, s.name, magnitude_pruned(layer, frac), batches, ref)
            assert s.curves["prune"][frac][1] == pytest.approx(want, rel=1e-9, abs=1e-15)
            assert s.curves["prune"][frac][0] == pruned_bytes(layer.out_features, layer.in_features, frac)
        for keep in DEFAULT_GRID["factorize"]:
            r = rank_for_param_ratio(layer.out_features, layer.in_features, keep)
            u, sv, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
            fact = FactorizedLinear(layer.in_features, layer.out_features, r)
            with torch.no_grad():
                fact.first.weight.copy_((vh[:r] * sv[:r, None].sqrt()).float())
                fact.second.weight.copy_((u[:, :r] * sv[:r].sqrt()).float())
                fact.second.bias.copy_(layer.bias)
            want = _replaced_kl(model, s.name, fact, batches, ref)
            assert s.curves["factorize"][keep][1] == pytest.approx(want, rel=1e-3, abs=1e-9)
            assert s.curves["factorize"][keep][0] == 4 * r * (layer.in_features + layer.out_features)
        # more compression moves the output further, in every family
        assert s.curves["quantize"][8][1] < s.curves["quantize"][2][1]
        assert s.curves["prune"][0.25][1] < s.curves["prune"][0.75][1]
        assert s.curves["factorize"][0.75][1] < s.curves["factorize"][0.25][1]
    # the model is left as it was
    with torch.no_grad():
        assert all(torch.equal(model(b), r) for b, r in zip(batches, ref))
    d = sens.to_dict()
    json.dumps(d)
    assert d["layers"][0]["curves"]["quantize"]["4"]["bytes"] == quantized_bytes(96, 64, 4, 32)
    assert sens.plot_png().startswith("iVBOR")  # a PNG
    assert "| 0 | 96×64 |" in sens.to_markdown() and sens.metric.startswith("KL")
    assert sens.most_sensitive("quantize", 2, n=1)[0][1] == max(s.curves["quantize"][2][1] for s in sens.layers)


def _replaced_kl(model, name, new, batches, ref):
    original = model.get_submodule(name)
    model._modules[name] = new
    try:
        with torch.no_grad():
            return sum(_kl(r, model(b)) for b, r in zip(batches, ref)) / len(batches)
    finally:
        model._modules[name] = original


def test_bad_requests_name_what_to_fix():
    model = _model()
    x = [torch.randn(4, 64)]
    with pytest.raises(ConfigError, match="unknown family 'distill'"):
        layer_sensitivity(model, x, families=("distill",))
    with pytest.raises(DataError, match="calibration batches"):
        layer_sensitivity(model, [])
    with pytest.raises(ConfigError, match="'1' is not a Linear-like layer"):
        layer_sensitivity(model, x, layers=["1"])
    only = layer_sensitivity(model, x, families=("prune",), grid={"prune": (0.5,)}, layers=["2"])
    assert [s.name for s in only.layers] == ["2"] and list(only.layers[0].curves) == ["prune"]
    assert list(only.layers[0].curves["prune"]) == [0.5]


def test_embedding_rows_get_quantize_curves_at_the_widths_they_store():
    from slimkit.quantization.modules import QuantEmbedding

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.head = nn.Linear(32, 50)

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model = set_task(Tiny().eval(), GenericTask(example_inputs=torch.zeros(2, 5, dtype=torch.long)))
    batches = [torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sens = layer_sensitivity(model, batches, max_rows=8)
    emb = next(s for s in sens.layers if s.name == "emb")
    assert list(emb.curves) == ["quantize"] and sorted(emb.curves["quantize"]) == [2, 4, 8]  # no 3-bit rows
    with torch.no_grad():
        ref = [model(b) for b in batches]
    for bits in (8, 4, 2):
        new = QuantEmbedding.from_embedding(model.emb, bits, sensitivity_group(32), True)
        assert emb.curves["quantize"][bits][1] == pytest.approx(_replaced_kl(model, "emb", new, batches, ref), rel=1e-9)
        assert emb.curves["quantize"][bits][0] == quantized_bytes(50, 32, bits, 32)
    assert [s.name for s in layer_sensitivity(model, batches, embeddings=False).layers] == ["head"]


def test_first_rows_cuts_tensor_tuple_and_dict_batches():
    t = [torch.arange(10).reshape(5, 2), torch.arange(10, 20).reshape(5, 2)]
    got = first_rows(t, 7)
    assert [b.shape[0] for b in got] == [5, 2] and torch.equal(got[1], t[1][:2])
    d = [{"input_ids": torch.ones(4, 3), "attention_mask": torch.ones(4, 3)}] * 3
    assert [b["input_ids"].shape[0] for b in first_rows(d, 6)] == [4, 2]
    tup = [(torch.ones(4, 3), torch.zeros(4))]
    (cut,) = first_rows(tup, 1)
    assert isinstance(cut, tuple) and cut[0].shape == (1, 3) and cut[1].shape == (1,)
    assert first_rows(t, 100) == t
