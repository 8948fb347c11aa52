"""SparseGPT: the blocked algorithm against a slow float64 OBS reference, exact sparsity, quality against
magnitude and Wanda, and the handler (true-sequential walk, fallbacks, bad input, streaming)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.registry import Context, config_types, handler_for
from slimkit.pruning.sparsegpt import SparseGPT, sparsegpt_prune
from slimkit.pruning.wanda import wanda_prune
from slimkit.core.hessian import accumulate_hessian, factor_hessian
from tests.llm_archs import (
    linear_copy,
    ToyLM,
    indefinite_hessian,
    tiny_causal_lm,
    token_batches,
    toy_data,
)

torch.set_num_threads(1)


# --- a slow, obvious reference -------------------------------------------------------------


def reference_sparsegpt(W, H, *, sparsity=0.5, nm=None, block_size=128, damp=0.01, mask=None):
    """Column-by-column OBS in float64 with an explicit inverse Hessian, downdated after each column.

    The saliency of column j is w²/[H_d[j:, j:]⁻¹]_00 — the inverse Hessian of the columns
    not yet visited, which the Cholesky factor's U_jj² equals. Unstructured: when a block
    starts, its share of round(sparsity·rows·cols) lowest saliencies over the block (ties:
    earlier column, then earlier row); N:M: per row, the N highest of every M columns when
    the group starts. With ``mask`` given, that mask is used instead. Returns (W, keep, loss).
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    Hd = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    u2 = torch.tensor([float(torch.linalg.inv(Hd[j:, j:])[0, 0]) for j in range(cols)], dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool) if mask is None else mask.clone()
    bs = block_size if nm is None else max(1, block_size // nm[1]) * nm[1]
    loss = 0.0
    for j in range(cols):
        if mask is None and nm is None and j % bs == 0:
            j2 = min(j + bs, cols)
            k = round(sparsity * rows * j2) - round(sparsity * rows * j)
            sal = W[:, j:j2] ** 2 / u2[j:j2]
            sal[:, dead[j:j2]] = 0.0
            order = sorted((float(sal[r, c]), c, r) for r in range(rows) for c in range(j2 - j))
            for _, c, r in order[:k]:
                keep[r, j + c] = False
        if mask is None and nm is not None and j % nm[1] == 0:
            n, m = nm
            sal = W[:, j:j + m] ** 2 / u2[j:j + m]
            sal[:, dead[j:j + m]] = 0.0
            for r in range(rows):
                order = sorted(range(m), key=lambda c: (-float(sal[r, c]), c))
                keep[r, j:j + m] = False
                for c in order[:n]:
                    keep[r, j + c] = True
        d = Hinv[j, j]
        assert abs(float(d) - float(u2[j])) <= 1e-9 * float(u2[j])  # the two forms of U_jj² agree
        err = torch.where(keep[:, j], torch.zeros(rows, dtype=torch.float64), W[:, j])
        loss += float((err ** 2).sum() / d)
        W[:, j + 1:] -= torch.outer(err / d, Hinv[j, j + 1:])  # the optimal compensation (OBS)
        W[:, j] -= err
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d  # remove column j from the inverse
    return W, keep, loss


def correlated_inputs(tokens, cols, seed=0, dead=(), outliers=()):
    """Inputs with strongly correlated features, uneven magnitudes and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, max(2, cols // 4), generator=g, dtype=torch.float64)
    mix = torch.randn(latent.shape[1], cols, generator=g, dtype=torch.float64)
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 3 + 0.2
    x = (latent @ mix + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)) * scale
    x[:, list(outliers)] *= 20.0
    x[:, list(dead)] = 0.0
    return x


def hessian_of(x):
    return 2.0 * x.T @ x / x.shape[0]


CASES = [
    # (rows, cols, sparsity, nm, block_size, dead)
    (8, 6, 0.5, None, 128, ()),
    (8, 12, 0.5, None, 4, ()),
    (6, 16, 0.3, None, 5, (2,)),  # blocks that do not divide the columns; a dead input
    (5, 20, 0.7, None, 8, ()),
    (8, 16, 0.5, (2, 4), 128, ()),
    (8, 16, 0.5, (2, 4), 3, (5,)),  # blocks narrower than a group: widened to whole groups
    (4, 32, 0.5, (4, 8), 8, ()),
    (6, 16, 0.75, (1, 4), 16, ()),
]


@pytest.mark.parametrize("rows, cols, sparsity, nm, bs, dead", CASES)
def test_blocked_algorithm_equals_slow_obs_reference_float64(rows, cols, sparsity, nm, bs, dead):
    g = torch.Generator().manual_seed(rows * cols)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(64, cols, seed=cols, dead=dead))
    pattern = None if nm is None else f"{nm[0]}:{nm[1]}"
    result = sparsegpt_prune(W, H, sparsity, pattern, bs)
    ref_w, ref_keep, ref_loss = reference_sparsegpt(W, H, sparsity=sparsity, nm=nm, block_size=bs)
    assert result.weight.dtype == torch.float64
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight, ref_w, rtol=1e-9, atol=1e-10)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert torch.all(result.weight[~result.mask] == 0)
    if nm is None:
        assert int((~result.mask).sum()) == round(sparsity * rows * cols)  # exact layer count
    else:
        assert torch.all(result.mask.reshape(rows, -1, nm[1]).sum(-1) == nm[0])  # exactly N of every M


def test_float32_path_matches_the_reference_on_its_mask():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 64, generator=g)
    H = hessian_of(correlated_inputs(256, 64, seed=1)).float()
    for pattern, nm in ((None, None), ("2:4", (2, 4))):
        result = sparsegpt_prune(W, H, 0.5, pattern, 16)
        assert result.weight.dtype == torch.float32
        ref_w, _, _ = reference_sparsegpt(W, H, nm=nm, block_size=16, mask=result.mask)
        torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-5, atol=1e-5 * float(ref_w.abs().max()))


def test_loss_equals_the_damped_output_error_trace():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 24, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(100, 24, seed=2, dead=(7,)))
    factor = factor_hessian(H, damp=0.01)
    for pattern in (None, "2:4"):
        result = sparsegpt_prune(W, factor, 0.5, pattern, 8)
        Hd = H.clone()
        Hd[7, 7] = 1.0
        Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(24, dtype=torch.float64)
        delta = W - result.weight
        assert result.loss == pytest.approx(float(torch.trace(delta @ Hd @ delta.T)), rel=1e-9)


def test_nm_result_does_not_depend_on_block_size():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(10, 48, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(80, 48, seed=4))
    results = [sparsegpt_prune(W, H, 0.5, "4:8", bs) for bs in (8, 16, 48, 128)]
    for r in results[1:]:
        assert torch.equal(r.mask, results[0].mask)
        torch.testing.assert_close(r.weight, results[0].weight, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), sparsity=st.floats(0.0, 0.95),
       bs=st.integers(1, 50), seed=st.integers(0, 1000))
def test_unstructured_count_is_exact_for_any_shape_and_block(rows, cols, sparsity, bs, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    x = torch.randn(3 * cols + 4, cols, generator=g)
    result = sparsegpt_prune(W, hessian_of(x), sparsity, None, bs)
    assert int((~result.mask).sum()) == round(sparsity * rows * cols)
    assert bool(torch.isfinite(result.weight).all()) and torch.all(result.weight[~result.mask] == 0)


def test_dead_inputs_are_pruned_first_and_the_rest_untouched():
    """A feature that is always 0 costs nothing: its weights go first, and nothing flows into or out of them."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(64, 16, seed=0, dead=(0, 9)))
    result = sparsegpt_prune(W, H, 0.5, None, 16)
    assert not result.mask[:, [0, 9]].any()
    result = sparsegpt_prune(W, H, 0.05, None, 16)  # a budget of 6, all taken from the 16 dead weights
    assert int((~result.mask).sum()) == 6 and int((~result.mask[:, [0, 9]]).sum()) == 6
    kept_dead = result.mask[:, [0, 9]]
    assert torch.equal(result.weight[:, [0, 9]][kept_dead], W[:, [0, 9]][kept_dead])  # no update reaches them
    torch.testing.assert_close(result.weight[:, [c for c in range(16) if c not in (0, 9)]],
                               W[:, [c for c in range(16) if c not in (0, 9)]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_beats_magnitude_and_wanda_on_correlated_outlier_inputs(pattern):
    g = torch.Generator().manual_seed(7)
    x = correlated_inputs(2048, 128, seed=3, outliers=(5, 40, 77)).float()
    W = torch.randn(64, 128, generator=g)
    ref = x @ W.T

    def err(w):
        return float((x @ w.T - ref).norm())

    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    if pattern is None:
        torch_prune.l1_unstructured(lin, "weight", amount=0.5)
        magnitude = lin.weight.detach()
    else:
        keep = torch.zeros(64, 128, dtype=torch.bool)
        groups = W.abs().reshape(64, 32, 4).topk(2, dim=-1).indices + torch.arange(0, 128, 4).reshape(1, 32, 1)
        keep.scatter_(1, groups.reshape(64, -1), True)
        magnitude = W.masked_fill(~keep, 0.0)
    wanda, _ = wanda_prune(W, x.double().norm(dim=0), 0.5, pattern)
    sgpt = sparsegpt_prune(W, hessian_of(x.double()).float(), 0.5, pattern, 128)
    assert err(sgpt.weight) < 0.8 * err(wanda) and err(wanda) < err(magnitude)


def test_pure_function_bad_input():
    H = torch.eye(8)
    with pytest.raises(DataError, match="NaN"):
        sparsegpt_prune(torch.full((2, 8), float("nan")), H)
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt_prune(torch.ones(2, 6), H)
    with pytest.raises(UnsupportedError, match="not divisible by M=8"):
        sparsegpt_prune(torch.ones(2, 12), torch.eye(12), pattern="4:8")
    with pytest.raises(ConfigError, match="sparsity"):
        sparsegpt_prune(torch.ones(2, 8), H, sparsity=1.0)
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt_prune(torch.ones(2, 8), H, block_size=0)
    with pytest.raises(ValueError, match="act_order"):
        sparsegpt_prune(torch.ones(2, 8), factor_hessian(H, act_order=True))


# --- the handler -----------------------------------------------------------------------------


def calib(n=8, seq=32):
    return CalibrationData.from_tensors(token_batches(n, seq), batch_size=4, key="input_ids")


def run(model, cfg, data):
    ctx = Context(data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few samples: the warning is tested in test_wanda
        handler_for(cfg)(model, cfg, ctx)
    return ctx


LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@torch.no_grad()
def reference_walk(model, data, pattern, true_sequential=True):
    """Block by block, group by group; each group's Hessian from full-model forwards with the earlier groups
    pruned (``true_sequential=False``: every group's Hessian measured before any group of the block is pruned)."""
    for layer in model.model.layers:
        passes = [LLAMA_GROUPS] if not true_sequential else [(g,) for g in LLAMA_GROUPS]
        for groups in passes:
            acc = {g[0]: {} for g in groups}
            handles = []
            for g in groups:
                def hook(_m, a, acc=acc[g[0]]):
                    acc["H"], acc["n"] = accumulate_hessian(acc.get("H"), acc.get("n", 0), a[0])

                handles.append(layer.get_submodule(g[0]).register_forward_pre_hook(hook))
            for batch in data:
                model(**batch)
            for h in handles:
                h.remove()
            for g in groups:
                for name in g:
                    lin = layer.get_submodule(name)
                    lin.weight.copy_(sparsegpt_prune(lin.weight, acc[g[0]]["H"], 0.5, pattern, 128).weight)


@pytest.mark.parametrize("pattern, true_sequential", [(None, True), ("2:4", True), (None, False), ("2:4", False)])
def test_handler_equals_full_model_reference(pattern, true_sequential):
    data = calib()
    model, ref = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    head = model.lm_head.weight.clone()
    ctx = run(model, SparseGPT(pattern=pattern, true_sequential=true_sequential), data)
    reference_walk(ref, data, pattern, true_sequential)
    refs = dict(ref.named_modules())
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert len(pruned) == 14
    for name, lin in pruned.items():
        torch.testing.assert_close(lin.weight, refs[name].weight, rtol=1e-5, atol=1e-6)
        w = lin.weight
        if pattern is None:
            assert int((w == 0).sum()) == w.numel() // 2, name  # the exact layer count
        else:
            assert torch.all((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2), name
    assert torch.equal(model.lm_head.weight, head)
    assert any("pruned 14 Linear layer(s)" in n and "measured sparsity 50.00%" in n and "per million" in n
               for n in ctx.notes)
    assert any("lm_head and embeddings stay dense" in n for n in ctx.notes)


@pytest.mark.parametrize("arch", ["qwen2", "opt"])
def test_handler_closer_to_dense_than_layerwise_magnitude(arch):
    data = calib()
    ids = torch.cat([b["input_ids"] for b in data])
    model, mag, dense = tiny_causal_lm(arch), tiny_causal_lm(arch), tiny_causal_lm(arch)
    run(model, SparseGPT(), data)
    for name, lin in mag.named_modules():
        if isinstance(lin, nn.Linear) and ".layers." in name:
            torch_prune.l1_unstructured(lin, "weight", amount=0.5)
            torch_prune.remove(lin, "weight")
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        out = model(input_ids=ids).logits
        base = mag(input_ids=ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).norm() < 0.8 * (base - ref).norm()


def test_unused_linear_falls_back_to_layer_magnitude_with_a_note():
    model = ToyLM()
    ctx = run(model, SparseGPT(sparsity=0.3), toy_data())
    for i in range(2):
        spare = nn.Linear(32, 32)
        with torch.no_grad():
            spare.weight.copy_(ToyLM().layers[i].spare.weight)
        torch_prune.l1_unstructured(spare, "weight", amount=round(0.3 * 32 * 32))
        got = model.layers[i].spare.weight
        assert int((got == 0).sum()) == round(0.3 * 32 * 32)
        assert torch.equal(got != 0, spare.weight_mask.bool())  # |w| is tie-free here: the same mask as torch's
        assert f"SparseGPT: layers.{i}.spare received no calibration tokens; magnitude (per layer) used" in ctx.notes
    for lin in (model.layers[0].up, model.layers[1].down):
        assert int((lin.weight == 0).sum()) == round(0.3 * lin.weight.numel())
    assert any("pruned 6 Linear layer(s)" in n and "2 by magnitude fallback" in n for n in ctx.notes)


@pytest.mark.parametrize("kwargs, field", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"pattern": "4:2"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.6}, "sparsity"), ({"block_size": 0}, "block_size"),
    ({"block_size": 1.5}, "block_size"), ({"dampening": 0}, "dampening"), ({"dampening": 2.0}, "dampening"),
    ({"dampening": True}, "dampening"), ({"ignore": "lm_head"}, "ignore"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=f"SparseGPT.{field}"):
        SparseGPT(**kwargs)


def test_config_round_trips_and_is_registered():
    cfg = SparseGPT(sparsity=0.5, pattern="4:8", block_size=64, dampening=0.05, ignore=["lm_head"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert config_types()["SparseGPT"] is SparseGPT and slimkit.SparseGPT is SparseGPT
    assert SparseGPT.needs_data and SparseGPT.family == "prune"


def test_no_data_indivisible_nm_and_nan_fail_before_any_change():
    model = ToyLM()
    with pytest.raises(DataError, match="SparseGPT needs calibration data"):
        handler_for(SparseGPT())(model, SparseGPT(), Context())
    model.layers[1].down = nn.Linear(66, 32)  # 66 input columns: not a multiple of 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=r"layers\.1\.down.*66 input columns"):
        run(model, SparseGPT(pattern="2:4"), toy_data())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model = ToyLM()
    with torch.no_grad():
        model.layers[1].up.weight[3, 3] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match=r"layers\.1\.up.*NaN or inf"):
        run(model, SparseGPT(), toy_data())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_handler_names_layer_whose_hessian_is_not_positive_definite(monkeypatch):
    from slimkit.pruning import sparsegpt

    monkeypatch.setattr(sparsegpt, "accumulate_hessian", indefinite_hessian)
    with pytest.raises(DataError, match=r"Hessian of layers\.0\.up is not positive definite even with damp="):
        run(ToyLM(), SparseGPT(ignore=["spare"]), toy_data(4))


def test_streamed_checkpoint_equals_in_memory(tmp_path):
    """Through run_blockwise SparseGPT also runs block by block from disk, with the same result."""
    from slimkit.api import compress_checkpoint

    model = tiny_causal_lm("mistral")
    model.save_pretrained(tmp_path / "src")
    data = calib()
    cfg = SparseGPT(pattern="2:4", block_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_checkpoint(tmp_path / "src", tmp_path / "out", cfg, data, Context())
    run(model, cfg, data)
    ids = token_batches(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "out")(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gpt2_conv1d_gets_2_4_along_its_inputs_like_its_linear():
    from transformers.pytorch_utils import Conv1D

    from slimkit.core.linear_like import linear_weight

    gpt2 = tiny_causal_lm("gpt2")
    linear = linear_copy(gpt2)
    data = calib()
    for model in (gpt2, linear):
        ctx = run(model, SparseGPT(pattern="2:4"), data)
    assert "pruned 8 Linear layer(s)" in ctx.notes[-1]
    for name, conv in gpt2.named_modules():
        if isinstance(conv, Conv1D):
            w = linear_weight(conv)  # (out, in) view of the (in, out) weight
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name
    first = "transformer.h.0.attn.c_attn"  # the same inputs in both models: the same OBS update exactly
    torch.testing.assert_close(linear_weight(gpt2.get_submodule(first)), linear.get_submodule(first).weight,
                               rtol=0, atol=0)
