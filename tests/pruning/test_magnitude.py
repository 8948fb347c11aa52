"""Magnitude pruning: identical to torch.nn.utils.prune, exact counts, thresholds, N:M, errors, masks kept."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import slimkit as sk
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.registry import Context
from slimkit.pruning.magnitude import (
    Magnitude,
    global_masks,
    layer_mask,
    magnitude_masks,
    magnitude_scores,
    threshold_mask,
)
from slimkit.core.masks import get_mask, masked_modules, strip
from slimkit.pruning.nm import nm_keep_mask

SHAPES = [(7, 5), (16, 12), (3, 4, 3, 3), (6, 2, 5), (1, 33)]


def _tied_values(shape, seed):
    """Weights with many exact ties in |w| (few distinct magnitudes, both signs)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, shape, generator=g).float() * 0.25).contiguous()


def _net(seed=0, ties=False):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                        nn.Linear(16, 8), nn.Conv1d(1, 2, 3))
    if ties:
        with torch.no_grad():
            for i, m in enumerate(net.modules()):
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    m.weight.copy_(_tied_values(m.weight.shape, i))
    return net


def _layers(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


# --- pure functions against torch.nn.utils.prune -------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("ties", [False, True])
def test_layer_mask_equals_torch_l1_unstructured(shape, sparsity, ties):
    w = _tied_values(shape, 1) if ties else torch.randn(shape, generator=torch.Generator().manual_seed(1))
    holder = nn.Module()
    holder.weight = nn.Parameter(w.clone())
    prune.l1_unstructured(holder, "weight", amount=sparsity)
    ours = layer_mask(magnitude_scores(w, "l1"), sparsity)
    assert torch.equal(ours, holder.weight_mask.bool())
    assert int((~ours).sum()) == round(sparsity * w.numel())


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_global_masks_equal_torch_global_unstructured(ties, sparsity):
    ref, net = _net(0, ties), _net(0, ties)
    prune.global_unstructured([(m, "weight") for _, m in _layers(ref)], pruning_method=prune.L1Unstructured,
                              amount=sparsity)
    masks = global_masks({n: magnitude_scores(m.weight, "l1") for n, m in _layers(net)}, sparsity)
    total = sum(m.weight.numel() for _, m in _layers(net))
    assert sum(int((~k).sum()) for k in masks.values()) == round(sparsity * total)
    for name, m in _layers(ref):
        assert torch.equal(masks[name], m.weight_mask.bool()), name


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_handler_equals_torch_prune_on_a_model(scope):
    ref, net = _net(3, ties=True), _net(3, ties=True)
    params = [(m, "weight") for _, m in _layers(ref)]
    if scope == "layer":
        for m, name in params:
            prune.l1_unstructured(m, name, amount=0.6)
    else:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.6)
    sk.prune_(net, Magnitude(sparsity=0.6, scope=scope))
    for (name, ours), (_, theirs) in zip(_layers(net), _layers(ref)):
        assert torch.equal(get_mask(ours), theirs.weight_mask.bool()), name
        assert torch.equal(ours.weight, theirs.weight), name
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net[:6](x), ref[:6](x))


def test_scores_and_l2_order():
    w = torch.tensor([[-3.0, 1.0], [0.5, -2.0]])
    assert torch.equal(magnitude_scores(w, "l1"), w.abs())
    assert torch.equal(magnitude_scores(w, "l2"), w * w)
    distinct = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    for s in (0.25, 0.5):  # unstructured: l1 and l2 rank identically
        assert torch.equal(layer_mask(magnitude_scores(distinct, "l1"), s), layer_mask(magnitude_scores(distinct, "l2"), s))
    with pytest.raises(ValueError, match="unknown criterion 'l3'"):
        magnitude_scores(w, "l3")


def test_threshold_mask_reference():
    w = torch.tensor([[0.1, -0.5, 1.0], [-2.0, 0.19, 0.21]])
    # prune |w| < 0.1 * 2.0 = 0.2
    assert threshold_mask(w, 0.1).tolist() == [[False, True, True], [True, False, True]]
    assert threshold_mask(w, 0.1, max_abs=10.0).tolist() == [[False, False, True], [True, False, False]]


def test_exact_counts_per_layer():
    net = _net(1)
    sk.prune_(net, Magnitude(sparsity=0.37))
    for name, m in _layers(net):
        assert int((m.weight == 0).sum()) == round(0.37 * m.weight.numel()), name


def test_row_scope_counts_per_row():
    net = _net(1)
    sk.prune_(net, Magnitude(sparsity=0.5, scope="row"))
    for name, m in _layers(net):
        rows = m.weight.reshape(m.weight.shape[0], -1)
        assert ((rows == 0).sum(1) == round(0.5 * rows.shape[1])).all(), name


def test_threshold_handler_layer_and_global():
    net, ref = _net(2), _net(2)
    sk.prune_(net, Magnitude(threshold=0.3))
    for (name, m), (_, r) in zip(_layers(net), _layers(ref)):
        w = r.weight.detach()
        assert torch.equal(m.weight != 0, w.abs() >= 0.3 * w.abs().max()), name
    net = _net(2)
    sk.prune_(net, Magnitude(threshold=0.3, scope="global"))
    top = max(float(r.weight.detach().abs().max()) for _, r in _layers(ref))
    for (name, m), (_, r) in zip(_layers(net), _layers(ref)):
        assert torch.equal(m.weight != 0, r.weight.detach().abs() >= 0.3 * top), name


def test_random_criterion_is_reproducible_and_exact():
    a, b, c = _net(0), _net(0), _net(0)
    sk.prune_(a, Magnitude(sparsity=0.5, criterion="random", seed=7))
    sk.prune_(b, Magnitude(sparsity=0.5, criterion="random", seed=7))
    sk.prune_(c, Magnitude(sparsity=0.5, criterion="random", seed=8))
    masks_a = [get_mask(m) for _, m in _layers(a)]
    assert all(torch.equal(x, get_mask(m)) for x, (_, m) in zip(masks_a, _layers(b)))
    assert not all(torch.equal(x, get_mask(m)) for x, (_, m) in zip(masks_a, _layers(c)))
    for (_, m), mask in zip(_layers(a), masks_a):
        assert int((~mask).sum()) == round(0.5 * mask.numel())
    # random ignores magnitude: it is not the l1 mask
    l1 = magnitude_masks(_net(0), Magnitude(sparsity=0.5))
    assert not torch.equal(l1["3"], masks_a[1])


def test_nm_pattern():
    net = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(4, 6, 2))  # conv rows are 4*2*2 = 16 wide
    ref = copy.deepcopy(net)
    sk.prune_(net, Magnitude(pattern="2:4"))
    assert Magnitude(pattern="2:4").sparsity == 0.5
    for (name, m), r in zip(net.named_children(), ref.children()):
        rows = m.weight.reshape(m.weight.shape[0], -1)
        expected = nm_keep_mask(r.weight.detach().abs().reshape(rows.shape), 2, 4)
        assert torch.equal(get_mask(m).reshape(rows.shape), expected), name
        assert ((rows != 0).reshape(rows.shape[0], -1, 4).sum(-1) <= 2).all()


def test_nm_indivisible_layer_is_named_and_model_untouched():
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 6), nn.Linear(6, 3))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(UnsupportedError, match="layer '2' has 6 input columns, not divisible by M=4"):
        sk.prune_(net, Magnitude(pattern="2:4"))
    assert masked_modules(net) == []
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    sk.prune_(net, Magnitude(pattern="2:4", ignore=["2"]))  # the fix the message suggests
    assert len(masked_modules(net)) == 2


def test_nan_weight_is_named_and_model_untouched():
    net = _net(0)
    with torch.no_grad():
        net[5].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="layer '5' has NaN or inf"):
        sk.prune_(net, Magnitude(sparsity=0.5))
    assert masked_modules(net) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, r"Magnitude.sparsity: sparsity must be a number in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"Magnitude.sparsity: .*got -0.1"),
    ({"criterion": "l3"}, r"Magnitude.criterion: .*'l3'"),
    ({"criterion": "randon"}, r"did you mean 'random'"),
    ({"scope": "glob"}, r"Magnitude.scope: .*did you mean 'global'"),
    ({"sparsity": 0.5, "threshold": 0.1}, r"Magnitude.threshold: give either sparsity"),
    ({"threshold": 1.5}, r"Magnitude.threshold: must be α in \(0, 1\)"),
    ({"threshold": 0.1, "criterion": "random"}, r"Magnitude.criterion: a threshold compares"),
    ({"threshold": 0.1, "pattern": "2:4"}, r"Magnitude.threshold: an N:M pattern"),
    ({"pattern": "2:4", "scope": "global"}, r"Magnitude.scope: an N:M pattern"),
    ({"pattern": "2:4", "sparsity": 0.7}, r"Magnitude.sparsity: the pattern 2:4 prunes exactly 0.5"),
    ({"pattern": "5:4"}, r"Magnitude.pattern"),
    ({"ignore": "lm_head"}, r"Magnitude.ignore: must be a list"),
    ({"keep_masks": "yes"}, r"Magnitude.keep_masks"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Magnitude(**kwargs)


def test_config_defaults_and_round_trip():
    assert Magnitude().sparsity == 0.5
    assert Magnitude(pattern="1:4").sparsity == 0.75
    assert Magnitude(threshold=0.2).sparsity is None
    for cfg in (Magnitude(), Magnitude(pattern="4:8", ignore=["lm_head"]), Magnitude(threshold=0.1, scope="global"),
                Magnitude(sparsity=0.3, criterion="random", seed=3)):
        assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="did you mean 'sparsity'"):
        Config.from_dict({"type": "Magnitude", "sparsty": 0.5})


def test_existing_masks_only_grow_and_sparsity_is_the_total():
    net = _net(4)
    sk.prune_(net, Magnitude(sparsity=0.3))
    first = {n: get_mask(m).clone() for n, m in _layers(net)}
    with torch.no_grad():  # let the kept weights change as in training; pruned ones must stay pruned
        for _, m in _layers(net):
            m.parametrizations.weight.original.mul_(torch.rand_like(m.weight) * 2)
    sk.prune_(net, Magnitude(sparsity=0.6))
    for name, m in _layers(net):
        mask = get_mask(m)
        assert not (mask & ~first[name]).any(), name  # nothing revived
        assert int((~mask).sum()) == round(0.6 * mask.numel()), name  # 0.6 of the layer, not of the rest
    with pytest.raises(sk.SlimkitError, match="Magnitude changed 0 of the"):  # below the current level: a no-op
        sk.prune_(net, Magnitude(sparsity=0.1))
    sk.prune_(net, Magnitude(sparsity=0.1), ctx=Context(allow_partial=True))  # accepted: nothing changes
    assert all(int((~get_mask(m)).sum()) == round(0.6 * m.weight.numel()) for _, m in _layers(net))


def test_keep_masks_false_zeroes_in_place():
    net = _net(0)
    sk.prune_(net, Magnitude(sparsity=0.5, keep_masks=False))
    assert masked_modules(net) == []
    assert int((net[3].weight == 0).sum()) == round(0.5 * net[3].weight.numel())


def test_ignore_lm_head_on_a_tiny_llm_and_note():
    from tests.llm_archs import tiny_causal_lm

    model = tiny_causal_lm("llama")
    ctx = Context()
    sk.prune_(model, Magnitude(sparsity=0.5, ignore=["lm_head"]), ctx=ctx)
    names = [n for n, _ in masked_modules(model)]
    assert "lm_head" not in names and len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert ctx.notes[-1].startswith("Magnitude: pruned 14 layer(s) (l1, layer 0.5): 50.00% of their weights are zero")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    report = sk.sparsity_report(strip(model))
    assert report["model.layers.0.mlp.up_proj"].sparsity == 0.5 and report["lm_head"].zeros == 0


def test_tied_lm_head_is_noted():
    from tests.llm_archs import tiny_causal_lm

    model = tiny_causal_lm("opt")  # OPT ties lm_head to the token embedding
    ctx = Context()
    sk.prune_(model, Magnitude(sparsity=0.5, include=["lm_head"]), ctx=ctx)
    assert any("lm_head's weight is shared with model.decoder.embed_tokens" in n for n in ctx.notes)
    emb = model.model.decoder.embed_tokens.weight
    assert int((emb == 0).sum()) == round(0.5 * emb.numel())


def _load_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "prune_digits.py"
    spec = importlib.util.spec_from_file_location("prune_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_masks_survive_fine_tuning():
    example = _load_example()
    dense = sk.load("digits-cnn")
    results = {"one-shot": example.one_shot(dense, 30), "gradual": example.gradual(dense, 40),
               "lottery": example.lottery(dense, 60)}
    for key, r in results.items():
        layers = _layers(r["model"])
        assert all(get_mask(m) is not None for _, m in layers), key
        total = sum(m.weight.numel() for _, m in layers)
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        # 70% of the weights, ranked globally: exact after training (masks held every step)
        assert zeros == round(0.7 * total) and math.isclose(r["sparsity"], zeros / total), key
        assert r["finetuned"] > 0.5, key  # far above chance (0.1): training ran on a working network
        assert sk.sparsity_report(strip(r["model"])).zeros == zeros, key


# --- transformers' Conv1D (GPT-2): weight stored (in, out), pruned with output rows first ----------


@pytest.mark.parametrize("cfg", [Magnitude(sparsity=0.5, scope="row"), Magnitude(pattern="2:4"),
                                 Magnitude(sparsity=0.3), Magnitude(sparsity=0.4, scope="global")])
def test_conv1d_masks_are_those_of_the_linear_it_computes(cfg, tmp_path):
    from transformers.pytorch_utils import Conv1D

    from slimkit.core.linear_like import as_linear, linear_weight

    torch.manual_seed(0)
    convs = nn.Sequential(Conv1D(24, 16), Conv1D(8, 24))  # (nf=out, nx=in): weights (16, 24) and (24, 8)
    linears = nn.Sequential(*[as_linear(c) for c in convs])  # the same (out, in) weights as nn.Linear
    from slimkit.core.registry import handler_for

    for model in (convs, linears):
        handler_for(cfg)(model, cfg, Context())
    for conv, lin in zip(convs, linears):
        assert get_mask(conv).shape == conv.weight.shape  # in the Conv1D's own (in, out) layout
        assert torch.equal(get_mask(conv).t(), get_mask(lin))  # rows = outputs, as for the Linear
        assert torch.equal(linear_weight(conv), lin.weight)
    if cfg.pattern:
        w = linear_weight(convs[0])
        assert bool(((w.reshape(24, -1, 4) == 0).sum(-1) == 2).all())  # 2:4 along the inputs
    x = torch.randn(3, 16)
    torch.testing.assert_close(convs(x), linears(x), rtol=1e-5, atol=1e-6)


def test_pruned_gpt2_conv1d_reloads_exactly(tmp_path):
    from transformers.pytorch_utils import Conv1D

    from tests.llm_archs import tiny_causal_lm, token_batches

    model = tiny_causal_lm("gpt2")
    ctx = Context()
    sk.prune_(model, Magnitude(pattern="2:4", ignore=["lm_head", "wte", "wpe"]), ctx=ctx)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8 and all(get_mask(m) is not None for m in convs.values())
    assert "pruned 8 layer(s)" in ctx.notes[-1]
    ids = token_batches(2, 16)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    sk.save(model, tmp_path / "gpt2")
    reloaded = sk.load(tmp_path / "gpt2")
    for name, m in convs.items():
        again = reloaded.get_submodule(name)
        assert type(again) is Conv1D and torch.equal(again.weight, m.weight)  # masks baked in, (in, out) layout
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, out)
