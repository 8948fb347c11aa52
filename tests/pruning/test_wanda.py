"""Wanda: scores and masks against slow loops, exact sparsity, the true-sequential walk, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.registry import Context, config_types, handler_for
from slimkit.pruning.wanda import (
    Wanda,
    accumulate_sq_norms,
    wanda_mask,
    wanda_prune,
    wanda_scores,
)
from tests.llm_archs import ToyLM, linear_copy, tiny_causal_lm, token_batches, toy_data

torch.set_num_threads(1)

LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


# --- slow references -----------------------------------------------------------------------


def slow_scores(W, norm):
    rows, cols = W.shape
    return torch.tensor([[abs(float(W[i, j])) * float(norm[j]) for j in range(cols)] for i in range(rows)],
                        dtype=torch.float64)


def slow_row_mask(scores, sparsity):
    """Per row, prune the k lowest (ties: the earlier column first), by Python sorting."""
    rows, cols = scores.shape
    k = round(sparsity * cols)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(rows):
        order = sorted(range(cols), key=lambda j: (float(scores[i, j]), j))
        for j in order[:k]:
            keep[i, j] = False
    return keep


def slow_nm_mask(scores, n, m):
    rows, cols = scores.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, m):
            order = sorted(range(g, g + m), key=lambda j: (-float(scores[i, j]), j))
            for j in order[:n]:
                keep[i, j] = True
    return keep


# --- pure functions ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.9]),
       seed=st.integers(0, 10_000), ties=st.booleans())
def test_scores_and_unstructured_mask_match_slow_loops(rows, groups, sparsity, seed, ties):
    g = torch.Generator().manual_seed(seed)
    cols = 4 * groups
    W = torch.randn(rows, cols, generator=g)
    if ties:  # repeated magnitudes and norms: the tie rule matters
        W = torch.round(W * 2) / 2
    norm = torch.rand(cols, generator=g, dtype=torch.float64) + (0 if not ties else 1)
    if ties:
        norm = torch.ones(cols, dtype=torch.float64)
    scores = wanda_scores(W, norm)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, slow_scores(W, norm), rtol=0, atol=0)
    keep = wanda_mask(scores, sparsity)
    assert torch.equal(keep, slow_row_mask(scores, sparsity))
    assert torch.all((~keep).sum(1) == round(sparsity * cols))  # exact per row


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), nm=st.sampled_from([(2, 4), (4, 8), (1, 4)]),
       seed=st.integers(0, 10_000))
def test_nm_mask_matches_slow_loop(rows, groups, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    W = torch.round(torch.randn(rows, m * groups, generator=g) * 2) / 2  # with ties
    scores = wanda_scores(W, torch.ones(m * groups, dtype=torch.float64))
    keep = wanda_mask(scores, 0.5, f"{n}:{m}")
    assert torch.equal(keep, slow_nm_mask(scores, n, m))
    assert torch.equal(keep, wanda_mask(scores, 0.5, (n, m)))
    assert torch.all(keep.reshape(rows, groups, m).sum(-1) == n)


def test_norm_accumulates_over_all_tokens_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 8, generator=g) * 100
    acc = None
    for part in torch.split(x.reshape(-1, 8), 7):  # uneven batches
        acc = accumulate_sq_norms(acc, part)
    assert acc.dtype == torch.float64
    torch.testing.assert_close(acc.sqrt(), x.reshape(-1, 8).double().norm(dim=0), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="features"):
        accumulate_sq_norms(acc, torch.ones(2, 5))


def test_prune_changes_nothing_but_the_pruned_weights():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 32, generator=g)
    norm = torch.rand(32, generator=g, dtype=torch.float64)
    pruned, keep = wanda_prune(W, norm, 0.5)
    assert torch.equal(pruned[keep], W[keep]) and torch.all(pruned[~keep] == 0)
    # An input feature with a large norm protects its column, a small weight notwithstanding.
    norm[3] = 1e6
    pruned, keep = wanda_prune(W, norm, 0.5)
    assert bool(keep[:, 3].all())
    with pytest.raises(DataError, match="NaN"):
        wanda_prune(torch.full((2, 4), float("nan")), torch.ones(4), 0.5)


# --- the handler -----------------------------------------------------------------------------


def calib(n=8, seq=32):
    return CalibrationData.from_tensors(token_batches(n, seq), batch_size=4, key="input_ids")


def run(model, cfg, data):
    ctx = Context(data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few samples: the warning is tested below
        handler_for(cfg)(model, cfg, ctx)
    return ctx


@torch.no_grad()
def reference_wanda(model, data, sparsity, pattern=None, true_sequential=True):
    """The whole procedure with full-model forwards: block by block, group by group, each group's
    input norms measured by running the model with every earlier group already pruned
    (``true_sequential=False``: every group of a block measured before any of it is pruned)."""
    n_m = tuple(int(v) for v in pattern.split(":")) if pattern else None
    passes = LLAMA_GROUPS if true_sequential else (sum(LLAMA_GROUPS, ()),)
    for layer in model.model.layers:
        for group in passes:
            sums = {}
            handles = []
            for name in group:
                def hook(_m, args, name=name, sums=sums):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[name] = sums.get(name, 0) + (x * x).sum(0)
                handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
            for batch in data:
                model(**batch)
            for h in handles:
                h.remove()
            for name in group:
                lin = layer.get_submodule(name)
                scores = slow_scores(lin.weight, sums[name].sqrt())
                keep = slow_nm_mask(scores, *n_m) if n_m else slow_row_mask(scores, sparsity)
                lin.weight[~keep] = 0.0


@pytest.mark.parametrize("pattern, true_sequential", [(None, True), ("2:4", True), (None, False), ("2:4", False)])
def test_handler_equals_full_model_reference(pattern, true_sequential):
    data = calib()
    model, ref = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    head = model.lm_head.weight.clone()
    ctx = run(model, Wanda(sparsity=0.5, pattern=pattern, true_sequential=true_sequential), data)
    reference_wanda(ref, data, 0.5, pattern, true_sequential)
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    refs = dict(ref.named_modules())
    assert len(pruned) == 14
    for name, lin in pruned.items():
        assert torch.equal(lin.weight, refs[name].weight), name
        w = lin.weight
        if pattern is None:
            assert torch.all((w == 0).sum(1) == w.shape[1] // 2), name  # exactly half of every row
        else:
            assert torch.all((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2), name  # exactly 2 of every 4
    assert torch.equal(model.lm_head.weight, head)  # outside the blocks: dense
    assert any("pruned 14 Linear layer(s)" in n and "measured sparsity 50.00%" in n for n in ctx.notes)
    assert any("lm_head and embeddings stay dense" in n for n in ctx.notes)


def test_true_sequential_uses_pruned_inputs():
    """o_proj's norms come from the pruned q/k/v: pruning with dense-model norms gives a different o_proj."""
    data = calib()
    model, dense = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    run(model, Wanda(), data)
    sums = {}
    o = dense.model.layers[0].self_attn.o_proj
    h = o.register_forward_pre_hook(lambda _m, a: sums.update(x=accumulate_sq_norms(sums.get("x"), a[0])))
    with torch.no_grad():
        for batch in data:
            dense(**batch)
    h.remove()
    naive, _ = wanda_prune(o.weight, sums["x"].sqrt(), 0.5)
    assert not torch.equal(naive, model.model.layers[0].self_attn.o_proj.weight)


@pytest.mark.parametrize("arch, sparsity", [("qwen2", 0.3), ("opt", 0.7)])
def test_exact_per_row_counts_on_other_architectures(arch, sparsity):
    model = tiny_causal_lm(arch)
    ids = token_batches(2, 32, seed=4)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    run(model, Wanda(sparsity=sparsity), calib())
    layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert len(layers) >= 12
    for lin in layers:
        assert torch.all((lin.weight == 0).sum(1) == round(sparsity * lin.in_features))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, dense)


def test_unused_linear_falls_back_to_magnitude_per_row_with_a_note():
    model = ToyLM()
    ctx = run(model, Wanda(sparsity=0.25), toy_data())
    for i in range(2):
        original = ToyLM().layers[i].spare.weight.detach()
        expect = original.masked_fill(~slow_row_mask(original.abs().double(), 0.25), 0.0)
        assert torch.equal(model.layers[i].spare.weight, expect)
        assert f"Wanda: layers.{i}.spare received no calibration tokens; magnitude (per row) used" in ctx.notes
    assert any("pruned 6 Linear layer(s)" in n and "2 by magnitude fallback" in n for n in ctx.notes)
    assert not any("only" in n and "sample" in n for n in ctx.notes)  # 32 samples: no warning
    assert torch.equal(model.head.weight, ToyLM().head.weight)


@pytest.mark.parametrize("kwargs, field", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": "half"}, "sparsity"),
    ({"sparsity": True}, "sparsity"), ({"pattern": "3:2"}, "pattern"), ({"pattern": "2-4"}, "pattern"),
    ({"pattern": 4}, "pattern"), ({"pattern": "2:4", "sparsity": 0.7}, "sparsity"),
    ({"pattern": "1:4", "sparsity": 0.5}, "sparsity"), ({"ignore": "lm_head"}, "ignore"), ({"include": ["re:("]}, "include"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=f"Wanda.{field}"):
        Wanda(**kwargs)


def test_config_round_trips_and_is_registered():
    cfg = Wanda(sparsity=0.75, pattern="1:4", ignore=["lm_head"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert config_types()["Wanda"] is Wanda and slimkit.Wanda is Wanda
    assert Wanda.needs_data and Wanda.family == "prune"
    with pytest.raises(ConfigError, match="closest|did you mean 'sparsity'"):
        Config.from_dict({"type": "Wanda", "sparsty": 0.5})


def test_no_data_indivisible_nm_and_nan_fail_before_any_change():
    model = ToyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="Wanda needs calibration data"):
        handler_for(Wanda())(model, Wanda(), Context())
    model.layers[1].spare = nn.Linear(30, 32)  # 30 input columns: not a multiple of 4 (nor of 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for pattern in ("2:4", "4:8"):
        with pytest.raises(UnsupportedError, match=r"layers\.1\.spare.*30 input columns.*ignore"):
            run(model, Wanda(pattern=pattern), toy_data())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ctx = run(model, Wanda(pattern="2:4", ignore=["layers.1.spare"]), toy_data())  # the fix the message names
    assert any("pruned 5 Linear" in n for n in ctx.notes)
    model = ToyLM()
    with torch.no_grad():
        model.layers[1].down.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match=r"layers\.1\.down.*NaN or inf"):
        run(model, Wanda(), toy_data())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # block 0 untouched too


def test_few_samples_warn():
    ctx = Context(data=toy_data(4))
    with pytest.warns(UserWarning, match="only 4 sample"):
        handler_for(Wanda())(ToyLM(), Wanda(), ctx)
    assert any("only 4 sample" in n for n in ctx.notes)


def test_streamed_checkpoint_equals_in_memory(tmp_path):
    from slimkit.api import compress_checkpoint

    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "src")
    data = calib()
    cfg = Wanda(pattern="4:8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_checkpoint(tmp_path / "src", tmp_path / "out", cfg, data, Context())
    run(model, cfg, data)
    loaded = slimkit.load(tmp_path / "out")
    ids = token_batches(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrized_weight_is_skipped_with_a_note():
    """A layer whose weight is computed by a parametrization (e.g. a fine-tuning mask) is left alone, and said so."""
    from torch.nn.utils import parametrize

    model = ToyLM()
    parametrize.register_parametrization(model.layers[0].up, "weight", _Scale())
    before = model.layers[0].up.parametrizations.weight.original.clone()
    ctx = run(model, Wanda(), toy_data())
    assert torch.equal(model.layers[0].up.parametrizations.weight.original, before)
    assert any("skipped layers.0.up" in n and "parametrized" in n for n in ctx.notes)
    assert int((model.layers[1].up.weight == 0).sum()) == model.layers[1].up.weight.numel() // 2


def test_sparsity_defaults_to_what_the_pattern_implies():
    assert Wanda().sparsity == 0.5
    assert Wanda(pattern="1:4").sparsity == 0.75
    assert Wanda(pattern="4:8").to_dict()["sparsity"] == 0.5


def test_gpt2_conv1d_is_pruned_per_output_row_like_its_linear():
    from transformers.pytorch_utils import Conv1D

    from slimkit.core.linear_like import linear_weight

    gpt2 = tiny_causal_lm("gpt2")
    linear = linear_copy(gpt2)
    data = calib()
    for model in (gpt2, linear):
        ctx = run(model, Wanda(sparsity=0.5), data)
    assert "pruned 8 Linear layer(s)" in ctx.notes[-1]
    convs = {n: m for n, m in gpt2.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8
    for conv in convs.values():
        w = linear_weight(conv)
        assert type(conv) is Conv1D and torch.all((w == 0).sum(1) == w.shape[1] // 2)  # per output row
    first = "transformer.h.0.attn.c_attn"  # its inputs are the same in both models: the same mask exactly
    assert torch.equal(linear_weight(gpt2.get_submodule(first)), linear.get_submodule(first).weight)
    ids = token_batches(2, 16)
    with torch.no_grad():
        a, b = gpt2(input_ids=ids).logits, linear(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-3


def test_linear_subclass_with_own_forward_is_skipped_with_a_note():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = ToyLM()
    model.layers[0].spare = Scaled(32, 32)
    ctx = run(model, Wanda(sparsity=0.5), toy_data())
    assert any("skipped layers.0.spare" in n and "Scaled" in n for n in ctx.notes)
    assert bool((model.layers[0].spare.weight != 0).all())
