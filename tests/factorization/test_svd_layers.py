"""SVD factorization of a model's Linear layers: the module, the config's rules, the handler, reload and ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.calibration import CalibrationData
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.registry import Context
from slimkit.factorization.svd import (
    SVD,
    FactorizedLinear,
    accumulate_input_stats,
    round_rank,
    truncated_svd,
    whitened_svd,
)

torch.set_num_threads(1)


class MLP(nn.Module):
    """Two wide Linears (break-even rank 21 for 64x32) and a tiny one that cannot gain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.tiny = nn.Linear(32, 1)

    def forward(self, x):
        return self.tiny(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def inputs(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g) @ torch.randn(32, 32, generator=g)
    x[:, :4] *= 10  # a few loud input features: where activation-aware truncation matters
    return x


def calib(n=256):
    return CalibrationData.from_tensors(inputs(n), batch_size=64)


def test_factorized_linear_equals_its_dense_weight_and_rebuilds_from_its_spec():
    f = truncated_svd(torch.randn(12, 20, dtype=torch.float64).float(), 5)
    bias = torch.randn(12)
    layer = FactorizedLinear.from_factors(f, bias)
    x = torch.randn(3, 7, 20)
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.dense_weight(), bias), atol=1e-5)
    assert torch.allclose(layer.dense_weight(), f.a @ f.b)
    assert sum(p.numel() for p in layer.parameters()) == 5 * (12 + 20) + 12
    empty = FactorizedLinear.from_slimkit_spec(layer.slimkit_spec())
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty(x), layer(x)) and layer.slimkit_spec()["rank"] == 5


def test_fixed_rank_is_the_truncated_svd_and_small_layers_are_skipped_and_reported():
    model, ctx = MLP(), Context()
    w1 = model.fc1.weight.detach().clone()
    sk.factorize_(model, SVD(rank=8), ctx=ctx)
    assert isinstance(model.fc1, FactorizedLinear) and model.fc1.rank == 8
    ref = truncated_svd(w1, 8)
    assert torch.allclose(model.fc1.dense_weight(), ref.a @ ref.b, atol=1e-5)
    assert type(model.tiny) is nn.Linear
    assert any("skipped tiny: too small to gain" in n for n in ctx.notes), ctx.notes
    assert any("factorized 2 layer(s)" in n and "4,096 -> 1,536" in n for n in ctx.notes), ctx.notes
    # the applied config is recorded on the model (saved with the checkpoint)
    assert sk.core.io.model_info(model)["steps"][-1]["rank"] == 8


def test_a_rank_above_break_even_is_refused_unless_forced_and_above_full_rank_always():
    with pytest.raises(ConfigError, match=r"above the break-even rank 21 of fc1.*force: true"):
        sk.factorize_(MLP(), SVD(rank=22, ignore=["tiny"]))
    model = sk.factorize_(MLP(), SVD(rank=22, force=True, ignore=["tiny"]))
    assert model.fc1.rank == 22
    with pytest.raises(ConfigError, match=r"above the full rank 32 of fc1"):
        sk.factorize_(MLP(), SVD(rank=33, force=True, ignore=["tiny"]))


@pytest.mark.parametrize("bad, match", [
    (dict(), "set exactly one of"),
    (dict(rank=4, param_ratio=0.5), "rank, param_ratio are all set"),
    (dict(rank=-1), "positive integer"),
    (dict(param_ratio=1.5), r"in \(0, 1\]"),
    (dict(param_ratio=1.0), "keeps every parameter"),
    (dict(energy=float("nan")), r"in \(0, 1\]"),
    (dict(rank=4, whitening="qr"), "cholesky, scale"),
    (dict(rank=4, rank_multiple=0), "positive integer"),
    (dict(budget=0.5, sensitivity_grid=[0.5, 1.2]), "sensitivity_grid"),
    (dict(rank=4, include="fc1"), "list of module name patterns"),
])
def test_config_mistakes_are_refused_by_name(bad, match):
    with pytest.raises(ConfigError, match=match):
        SVD(**bad)


def test_config_round_trips_and_says_when_it_needs_data():
    cfg = SVD(param_ratio=0.8, activation_aware=True, rank_multiple=8, ignore=["pooler.dense"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.needs_data and SVD(budget=0.8).needs_data and not SVD(rank=4).needs_data
    with pytest.raises(ConfigError, match="unknown key 'rank_ration'.*rank_ratio"):
        Config.from_dict({"type": "SVD", "rank_ration": 0.5})


def test_relative_rules_pick_the_documented_ranks():
    m = sk.factorize_(MLP(), SVD(param_ratio=0.5, ignore=["tiny"]))
    assert m.fc1.rank == 10  # floor(0.5 * 64 * 32 / 96) = 10
    m = sk.factorize_(MLP(), SVD(rank_ratio=0.25, rank_multiple=4, ignore=["tiny"]))
    assert m.fc1.rank == 8  # floor(0.25 * 32) = 8, a multiple of 4
    assert round_rank(13, 8) == 8 and round_rank(5, 8) == 5
    model = MLP()
    s = torch.linalg.svdvals(model.fc1.weight.detach().double())
    energy = float(s[:6].pow(2).sum() / s.pow(2).sum())
    sk.factorize_(model, SVD(energy=energy, ignore=["tiny"]))
    assert model.fc1.rank == 6


def test_energy_that_needs_more_than_break_even_skips_the_layer():
    with pytest.raises(sk.SlimkitError, match="SVD changed 0 of the"):  # every layer skipped: not a success
        sk.factorize_(MLP(), SVD(energy=0.9999, ignore=["tiny"]))
    ctx = Context(allow_partial=True)
    model = sk.factorize_(MLP(), SVD(energy=0.9999, ignore=["tiny"]), ctx=ctx)
    assert type(model.fc1) is nn.Linear
    assert any("skipped fc1: rank" in n and "above its break-even rank 21" in n for n in ctx.notes), ctx.notes


def test_activation_aware_factors_are_svd_llm_on_the_measured_inputs_and_beat_plain_svd():
    model = MLP()
    w, b = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    x = inputs()
    sk.factorize_(model, SVD(rank=6, activation_aware=True, include=["fc1"]), data=calib())
    ref = whitened_svd(w, x.double().T @ x.double(), 6)  # fc1 sees the raw inputs
    assert torch.allclose(model.fc1.dense_weight(), ref.a @ ref.b, atol=1e-4)
    plain = truncated_svd(w, 6)
    err_aware = torch.linalg.norm(model.fc1(x) - nn.functional.linear(x, w, b))
    err_plain = torch.linalg.norm(nn.functional.linear(x, plain.a @ plain.b, b) - nn.functional.linear(x, w, b))
    assert err_aware < 0.8 * err_plain, (err_aware, err_plain)


def test_scaled_whitening_is_asvd_on_the_mean_absolute_inputs():
    model = MLP()
    w = model.fc1.weight.detach().clone()
    x = inputs()
    sk.factorize_(model, SVD(rank=6, activation_aware=True, whitening="scale", alpha=0.5, include=["fc1"]),
                  data=calib())
    s = x.double().abs().mean(0).sqrt()
    u, sv, vh = torch.linalg.svd(w.double() * s, full_matrices=False)
    ref = ((u[:, :6] * sv[:6]) @ vh[:6]) / s
    assert torch.allclose(model.fc1.dense_weight().double(), ref, atol=1e-4)


def test_input_statistics_leave_out_padding_tokens():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    stats = accumulate_input_stats(None, x[mask.bool()])
    kept = x[mask.bool()]
    assert stats["tokens"] == 8 and torch.allclose(stats["gram"], kept.T @ kept)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 40)

        def forward(self, input_ids, attention_mask):
            return self.proj(input_ids)

    from slimkit.factorization.svd import collect_input_stats

    enc = Encoder()
    data = CalibrationData([{"input_ids": x.float(), "attention_mask": mask}])
    got = collect_input_stats(enc, ["proj"], data, gram=True)["proj"]
    assert got["tokens"] == 8 and torch.allclose(got["gram"], kept.T @ kept, atol=1e-5)


def test_a_singular_input_covariance_is_regularised_and_reported():
    dead = inputs()
    dead[:, 5:] = 0  # 27 of 32 input features never fire: XᵀX has rank 5
    ctx = Context()
    model = sk.factorize_(MLP(), SVD(rank=4, activation_aware=True, include=["fc1"]),
                          data=CalibrationData.from_tensors(dead, batch_size=64), ctx=ctx)
    assert torch.isfinite(model.fc1.dense_weight()).all()
    assert any("covariance of fc1 is singular" in n and "regularised" in n for n in ctx.notes), ctx.notes


def test_bad_input_is_refused_with_what_to_fix():
    with pytest.raises(DataError, match="needs calibration data"):
        sk.factorize_(MLP(), SVD(rank=4, activation_aware=True))
    nan = MLP()
    with torch.no_grad():
        nan.fc2.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="'fc2' has NaN"):
        sk.factorize_(nan, SVD(rank=4))
    with pytest.raises(ConfigError, match="match no Linear"):
        sk.factorize_(MLP(), SVD(rank=4, include=["fc9"]))
    with pytest.raises(ConfigError, match="is a 'factorize' technique"):
        sk.quantize_(MLP(), SVD(rank=4))


def test_tied_masked_and_already_factorized_layers_are_left_alone():
    from torch.nn.utils import prune

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 40)
            self.head = nn.Linear(40, 100, bias=False)
            self.head.weight = self.emb.weight
            self.mid = nn.Linear(40, 40)

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    model, ctx = Tied(), Context(allow_partial=True)
    prune.l1_unstructured(model.mid, "weight", amount=0.5)
    sk.factorize_(model, SVD(rank=4), ctx=ctx)
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert any("head: its weight is tied" in n for n in ctx.notes)
    assert any("mid: it is pruned with torch.nn.utils.prune" in n for n in ctx.notes)
    masked, ctx = MLP(), Context()
    with torch.no_grad():
        masked.fc1.weight[:, :8] = 0  # a quarter of its weights: a pruned layer
    sk.attach_masks_from_zeros(masked, include=["fc1"])
    sk.factorize_(masked, SVD(rank=4, ignore=["tiny"]), ctx=ctx)  # masks are baked in first, and it says so
    assert any("baked the pruning masks of 1 layer(s)" in n for n in ctx.notes)
    assert isinstance(masked.fc1, FactorizedLinear) and isinstance(masked.fc2, FactorizedLinear)
    assert any("did not keep the zeros of 1 of the 1 layer(s)" in n for n in ctx.notes)
    twice = sk.factorize_(MLP(), SVD(rank=8, ignore=["tiny"]))
    with pytest.raises(sk.SlimkitError, match="SVD changed 0 of the"):  # nothing left to factorize: an error
        sk.factorize_(twice, SVD(rank=4, ignore=["tiny"]))
    assert twice.fc1.rank == 8 and type(twice.fc1.first) is nn.Linear  # factors are not factorized again


def test_budget_meets_the_parameter_budget_and_spends_rank_where_it_matters():
    model, ctx = MLP(), Context()
    dense = model.fc1.weight.numel() + model.fc2.weight.numel()
    sk.factorize_(model, SVD(budget=0.5, activation_aware=True, ignore=["tiny"], sensitivity_batches=2), data=calib(),
                  ctx=ctx)
    kept = sum(m.rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, FactorizedLinear))
    kept += sum(m.weight.numel() for n, m in model.named_modules() if n in ("fc1", "fc2") and type(m) is nn.Linear)
    assert kept <= 0.5 * dense
    assert any("ranks allocated under a budget of 0.5" in n for n in ctx.notes), ctx.notes
    with pytest.raises(DataError, match="budget needs calibration data"):
        sk.factorize_(MLP(), SVD(budget=0.5))
    with pytest.raises(ConfigError, match="cannot be met"):
        sk.factorize_(MLP(), SVD(budget=0.01, ignore=["tiny"], sensitivity_grid=[0.5]), data=calib())


def test_llama_factorized_saves_reloads_and_exports_to_onnx(tiny_llama, tmp_path):
    from slimkit.export.onnx import export_onnx, ort_session, run_onnx

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    data = CalibrationData([{"input_ids": ids}])
    sk.core.io.attach_info(tiny_llama, kind="causal-lm")
    sk.factorize_(tiny_llama, SVD(param_ratio=0.6, activation_aware=True, ignore=["lm_head"]), data=data)
    layer = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(layer, FactorizedLinear) and layer.rank == 25  # floor(0.6 * 64 * 128 / 192) = floor(25.6)
    sk.save(tiny_llama, tmp_path / "svd")
    again = sk.load(tmp_path / "svd")
    assert again.model.layers[0].mlp.down_proj.rank == 25
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    path = export_onnx(tiny_llama, tmp_path / "svd.onnx").path
    got = run_onnx(ort_session(path), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
    ref = tiny_llama(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach().numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_stdlib_coder_activation_aware_svd_keeps_the_loss_closer_than_plain_svd():
    from slimkit.zoo.corpus import load_split

    dense = sk.load("stdlib-coder")
    tok = sk.tokenizer_of(dense)
    calib = CalibrationData.from_texts(load_split("calibration"), tok, seq_len=128, n=16)
    held_out = CalibrationData.from_texts(load_split("eval"), tok, seq_len=128, n=4).batches[0]["input_ids"]

    def loss(model):
        with torch.no_grad():
            return float(model(input_ids=held_out, labels=held_out).loss)

    config = dict(param_ratio=0.8, ignore=["lm_head"])
    plain = sk.factorize_(sk.load("stdlib-coder"), SVD(**config))
    aware = sk.factorize_(sk.load("stdlib-coder"), SVD(activation_aware=True, **config), data=calib)
    assert isinstance(aware.model.layers[0].mlp.down_proj, FactorizedLinear)
    base = loss(dense)
    # held-out perplexity (65k tokens) at this setting: dense 26.06, plain SVD 26.93, SVD-LLM 26.67
    assert loss(aware) - base < 0.8 * (loss(plain) - base), (base, loss(aware), loss(plain))
