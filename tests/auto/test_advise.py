"""slimkit advise: machine and model facts, the probes' arithmetic, the tree, ranking, and a whole run.

The ranking rule is checked against hand-computed expectations; the whole run uses a small
user model (GenericTask) so the real probes stay fast; a faked AVX-512 VNNI machine shows the
tree's answers and the static int8 settings follow the ISA (A3's test with a faked ISA).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimkit.auto import advise as A
from slimkit.auto.facts import (
    OUTLIER_RATIO,
    activation_outliers,
    int8_accelerator,
    machine_facts,
    model_facts,
)
from slimkit.auto.probes import ShapeTimes, expected_ms
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError
from slimkit.quantization.ptq import StaticQuant
from slimkit.recipe.schema import Recipe
from slimkit.tasks import GenericTask, set_task

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}


def _mlp(d: int = 64, hidden: int = 256, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes)).eval()


def _user_model(metric=None, rows: int = 64) -> nn.Module:
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 64, generator=gen)
    y = model(x).argmax(-1).detach()
    metric = metric or (lambda m, data: {"accuracy": float((m(data[0]).argmax(-1) == data[1]).float().mean())})
    return set_task(model, GenericTask(example_inputs=x, calibration=CalibrationData.from_tensors(x, batch_size=16),
                                       eval_data=(x, y), metric=metric))


# --- facts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "accel", "isa"), [
    (AVX2, None, "AVX2"), (VNNI, "AVX-512 VNNI", "AVX-512 VNNI"),
    (VNNI | {"amx_int8", "amx_bf16"}, "AMX", "AMX + BF16"), (AVX2 | {"avx_vnni"}, "AVX-VNNI", "AVX-VNNI")])
def test_machine_facts_name_the_int8_hardware_from_the_flags(flags, accel, isa):
    m = machine_facts(flags=flags, runtimes={"torch": "x"})
    assert m.int8_accelerator == int8_accelerator(flags) == accel
    assert m.isa == isa and m.runtimes == {"torch": "x"} and m.cores >= 1
    json.dumps(m.to_dict())


def test_model_facts_count_parameters_by_layer_type_and_tied_weights_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.body = nn.Linear(32, 48)
            self.norm = nn.LayerNorm(48)
            self.head = nn.Linear(32, 100, bias=False)
            self.head.weight = self.emb.weight  # tied: counted once, as the embedding

        def forward(self, ids):
            return self.head(self.emb(ids))

    f = model_facts(set_task(Tied(), GenericTask(example_inputs=torch.zeros(2, 3, dtype=torch.long))))
    assert f.embedding_params == 3200 and f.embedding_rows == 100 and f.linear_params == 32 * 48 + 48 and f.other_params == 96
    assert f.params == 3200 + 32 * 48 + 48 + 96 and f.conv_params == 0
    # most weights first; the tied head is a Linear the probes time though its weight is the embedding's
    assert f.shapes == [((100, 32), 1), ((48, 32), 1)] and f.linear_layers == 2
    assert not f.generates and f.kind == "module"


def test_activation_outliers_are_the_largest_channel_over_the_median_one():
    lin = nn.Linear(8, 4)
    x = torch.ones(5, 8)
    x[2, 3] = -50.0  # one channel 50x the others
    ratios = activation_outliers(nn.Sequential(lin), {"0": lin}, [x, x * 0.5])
    assert ratios["0"] == pytest.approx(50.0)
    model = nn.Sequential(lin)
    set_task(model, GenericTask(example_inputs=x))
    f = model_facts(model, [x])
    assert f.outlier_layers == ["0"] and OUTLIER_RATIO <= 50


# --- arithmetic ------------------------------------------------------------------------------


def test_expected_ms_replaces_each_linear_fp32_time_with_the_path_time():
    probes = [ShapeTimes((64, 64), 3, 1, {"fp32": 2.0, "int8": 1.0, "small": 1.5}),
              ShapeTimes((256, 64), 2, 1, {"fp32": 4.0, "int8": 3.0, "small": 2.0})]
    assert expected_ms(20.0, probes, "fp32", "int8") == pytest.approx(20 - 3 * 1.0 - 2 * 1.0)
    # shrink: the path time scaled by small/fp32 per shape
    want = 20 + 3 * (1.0 * 1.5 / 2.0 - 2.0) + 2 * (3.0 * 2.0 / 4.0 - 4.0)
    assert expected_ms(20.0, probes, "fp32", "int8", ("fp32", "small")) == pytest.approx(want)
    probes[1].ms["int8"] = None
    assert expected_ms(20.0, probes, "fp32", "int8") is None


def test_expected_bytes_by_hand():
    f = model_facts(_user_model())
    weights = 64 * 256 + 256 * 256 + 256 * 10
    biases = 256 + 256 + 10
    assert f.linear_params == weights + biases
    # int8 per channel: 1 byte per weight (biases counted as Linear params), a 4-byte scale per output row
    assert A.expected_bytes(f, 8) == int(weights + biases + 4 * (256 + 256 + 10))
    # int4, groups of 32: half a byte each, one scale per 32 inputs of each row
    scales = 4 * (256 * 2 + 256 * 8 + 10 * 8)
    assert A.expected_bytes(f, 4, 32) == int((weights + biases) / 2 + scales)
    assert A.expected_bytes(f, 32) == 4 * f.params
    # embedding rows: int8 with one scale per row, int4 with one per 32 values
    f.embedding_params, f.embedding_rows = 1000 * 64, 1000
    assert A.expected_bytes(f, 32, embedding_bits=8) - A.expected_bytes(f, 32) == 1000 * 64 + 4 * 1000 - 4 * 64000
    assert A.expected_bytes(f, 32, embedding_bits=4) - A.expected_bytes(f, 32) == 32000 + 4 * 2000 - 4 * 64000


def _cand(name, ms, size, risk="low", excluded=None):
    c = A.Candidate(name, "torch", (), risk, "p", expected_bytes=size, expected_memory=size, expected_ms=ms)
    c.excluded = excluded
    return c


def test_rank_orders_by_the_target_then_risk_and_puts_excluded_last():
    cands = [_cand("slow-small", 9.0, 10), _cand("fast-big", 2.0, 90), _cand("fast-risky", 2.0, 50, "high"),
             _cand("fastest-excluded", 1.0, 5, excluded="probe failed"), _cand("untimed", None, 20)]
    assert [c.name for c in A.rank(cands, "latency")] == ["fast-big", "fast-risky", "slow-small", "untimed",
                                                          "fastest-excluded"]
    assert [c.name for c in A.rank(cands, "size")][:3] == ["slow-small", "untimed", "fast-risky"]


def test_the_tree_answers_follow_the_machine_and_static_int8_follows_the_isa():
    f = model_facts(_user_model())
    f.outliers = {"a": 40.0, "b": 2.0}
    avx2 = machine_facts(flags=AVX2, runtimes={"torch": "2", "onnxruntime": "1"})
    vnni = machine_facts(flags=VNNI, runtimes={"torch": "2", "onnxruntime": "1"})
    t2, tv = dict(A.decision_tree(f, avx2, "latency", False)), dict(A.decision_tree(f, vnni, "latency", False))
    assert t2["int8 dot-product hardware?"].startswith("No (AVX2)")
    assert tv["int8 dot-product hardware?"].startswith("Yes (AVX-512 VNNI)")
    assert "SmoothQuant" in t2["Activation outliers?"]

    def static(m):
        (c,) = [c for c in A.build_candidates(f, m) if c.name == "int8 static (ONNX Runtime)"]
        (s,) = c.steps
        assert isinstance(s, StaticQuant) and s.smooth_alpha == 0.5  # outliers: SmoothQuant
        return s

    assert static(avx2).reduce_range and not static(vnni).reduce_range
    only_q = A.build_candidates(f, avx2, keep_architecture=True)
    assert not [c for c in only_q if c.needs_training] and "quantization only" in dict(
        A.decision_tree(f, avx2, "latency", True))["May the architecture change?"]
    no_ort = A.build_candidates(f, machine_facts(flags=AVX2, runtimes={"torch": "2"}))
    assert {c.runtime for c in no_ort} == {"torch"}


# --- whole runs ------------------------------------------------------------------------------


def test_advise_measures_ranks_and_writes_a_recipe_that_runs(tmp_path):
    model = _user_model()
    advice = A.advise(model, "latency", machine=machine_facts(runtimes={"torch": torch.__version__}))
    names = [c.name for c in advice.candidates]
    assert advice.best is advice.candidates[0] and advice.best.excluded is None
    assert "no compression (fp32, torch)" in names
    timed = [c for c in advice.candidates if c.expected_ms is not None and not c.uncompressed]
    assert [c.expected_ms for c in timed] == sorted(c.expected_ms for c in timed)  # ranked by expected time
    assert "int8 weight-only" in names and "structured 30% + recovery" in names
    for p in advice.probes:
        assert p.ms["torch fp32"] > 0 and p.rows == 64
    d = advice.to_dict()
    json.dumps(d)
    assert d["recommendation"] == advice.best.name and d["baselines_ms"]["torch"] > 0
    text = advice.to_markdown()
    assert "Decision tree" in text and advice.best.name in text
    sens = A.advise(model, "size", keep_architecture=True, sensitivity=True,
                    machine=machine_facts(runtimes={"torch": torch.__version__}))
    assert not [c for c in sens.candidates if c.uncompressed]  # a size target never keeps fp32
    assert [s.name for s in sens.sensitivity.layers] == ["0", "2", "4"]
    assert "Per-layer sensitivity" in sens.to_markdown() and 'id="sensitivity-plot"' in sens.to_html()
    # each candidate's recipe parses back, and the recommendation's runs on the model
    for c in advice.candidates:
        if c.uncompressed:
            assert c.expected_ms == advice.baselines_ms[c.runtime] and d["candidates"][names.index(c.name)]["recipe"] is None
            continue
        assert Recipe.from_yaml_text(c.recipe("m").to_yaml()).steps == list(c.steps)
    # no compression ranks above a compression expected less than 5% faster
    fp32 = next(c for c in advice.candidates if c.uncompressed)
    for c in advice.candidates[:names.index(fp32.name)]:
        assert c.expected_ms < A.NO_GAIN * fp32.expected_ms


def test_max_drop_excludes_candidates_whose_measured_drop_is_too_large():
    model = _user_model()
    advice = A.advise(model, "size", max_drop=0.0, keep_architecture=True,
                      machine=machine_facts(runtimes={"torch": torch.__version__}))
    for c in advice.candidates:
        q = c.quality
        assert q is not None and q["metric"] == "accuracy" and q["baseline"] == 1.0
        assert (c.excluded is not None) == (q["drop"] > 0)
    assert advice.best is None or advice.best.quality["drop"] == 0.0
    with pytest.raises(ConfigError, match="max_drop"):
        A.advise(model, "size", max_drop=1.5)
    with pytest.raises(ConfigError, match="target"):
        A.advise(model, "speed")
    bare = set_task(_mlp(), GenericTask(example_inputs=torch.randn(4, 64),
                                        calibration=CalibrationData.from_tensors(torch.randn(8, 64), batch_size=4)))
    with pytest.raises(ConfigError, match="max_drop needs a quality figure"):
        A.advise(bare, "latency", max_drop=0.01)
