"""slimkit auto under a latency budget: structural sensitivity, the time model, the allocation against brute
force, a whole run with deterministic timing, the timer itself, and trials in processes and on Ray."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.auto import latency as L
from slimkit.auto import plan as P
from slimkit.auto import trials as T
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError
from slimkit.pruning.structured import StructuredPrune
from slimkit.quantization.weight_only import RTN
from slimkit.recipe.runner import run_recipe
from slimkit.tasks import GenericTask, set_task, task_of
from tests.auto.test_plan import _model
from tests.test_cli import slimkit_cli


def _mlp(seed: int = 0, width: int = 128) -> nn.Module:
    return _model(seed, width)


def _kl64(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    log_p, log_q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_structural_sensitivity_equals_zeroing_the_removed_units():
    model = _mlp()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    groups = L.structural_sensitivity(model, [x])
    roots = {g.root: g for g in groups}
    assert set(roots) == {"0", "2"}  # the last layer's outputs are the model's: not prunable
    g = roots["0"]
    assert g.units == 128 and sorted(g.options) == list(L.RATIOS)
    assert g.shapes == {"0": (128, 64), "2": (128, 128)}
    for ratio, option in g.options.items():
        kept = 128 - math.ceil(ratio * 128)
        assert option.shapes == {"0": (kept, 64), "2": (128, kept)}
        # the slow reference: the same units zeroed in the unpruned model give the same output
        work = P.copy.deepcopy(model)
        from slimkit.recipe.steps import apply_step

        apply_step(work, L.prune_step({"0": ratio}, {"0": g.outputs}))
        rows = [int(torch.where((model[0].weight == r).all(1))[0][0]) for r in work[0].weight]
        mask = torch.zeros(128)
        mask[rows] = 1
        with torch.no_grad():
            hidden = nn.functional.gelu(model[0](x)) * mask
            reference = model[4](nn.functional.gelu(model[2](hidden)))
            assert torch.allclose(work(x), reference, atol=1e-5)
            assert option.divergence == pytest.approx(_kl64(model(x), reference), rel=1e-6, abs=1e-12)
    assert g.options[0.25].divergence < g.options[0.75].divergence


def _timing(groups: list[L.GroupSensitivity], base: float = 10.0) -> L.LatencyModel:
    """Times proportional to the weights (1 µs per 1000 of them), int8 at half: exact in µs units."""
    shapes = {}
    for g in groups:
        shapes.update(g.shapes)
    every = set(shapes.values()) | {s for g in groups for o in g.options.values() for s in o.shapes.values()}
    times = {"fp32": {s: s[0] * s[1] / 1e6 for s in every}, "int8": {s: s[0] * s[1] / 2e6 for s in every}}
    return L.LatencyModel("torch", 1, base, shapes, "fp32", times)


def test_latency_model_replaces_each_linear_time():
    g = L.GroupSensitivity("a", "neuron", 4, ("a.up",), {"a.up": (1000, 1000), "a.down": (1000, 1000)},
                           {0.5: L.GroupOption(0.5, 0.1, {"a.up": (500, 1000), "a.down": (1000, 500)})})
    t = _timing([g], base=5.0)
    assert t.expected_ms("fp32") == pytest.approx(5.0)
    assert t.expected_ms("int8") == pytest.approx(5.0 - 1.0)  # two 1 ms layers at half
    assert t.expected_ms("fp32", g.options[0.5].shapes) == pytest.approx(5.0 - 1.0)
    assert t.expected_ms("int8", g.options[0.5].shapes) == pytest.approx(5.0 - 1.5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.lists(st.floats(0, 1), min_size=3, max_size=3)), min_size=1,
                max_size=4), st.floats(0.3, 1.0), st.sampled_from(["fp32", "int8"]))
def test_latency_allocation_is_the_brute_force_optimum(spec, fraction, mode):
    groups = []
    for i, (k, divs) in enumerate(spec):
        n = 1000 * k
        opts = {r: L.GroupOption(r, d, {f"g{i}": (round(n * (1 - r)), 1000)}) for r, d in zip(L.RATIOS, divs)}
        groups.append(L.GroupSensitivity(f"g{i}", "neuron", 4, (f"g{i}",), {f"g{i}": (n, 1000)}, opts))
    timing = _timing(groups, base=sum(1000 * k for k, _ in spec) / 1e3 + 0.5)
    target = fraction * timing.base_ms
    best = math.inf
    for combo in itertools.product([None, *L.RATIOS], repeat=len(groups)):
        changed = {n: s for g, r in zip(groups, combo) if r is not None for n, s in g.options[r].shapes.items()}
        if timing.expected_ms(mode, changed) <= target + 1e-9:
            best = min(best, sum(g.options[r].divergence for g, r in zip(groups, combo) if r is not None))
    if best == math.inf:
        with pytest.raises(ConfigError, match="raise the budget"):
            L.allocate_latency(groups, timing, mode, target)
        return
    ratios, expected, cost = L.allocate_latency(groups, timing, mode, target)
    assert expected <= target + 1e-9
    assert cost == pytest.approx(best, abs=1e-9)
    assert cost == pytest.approx(sum(g.options[ratios[g.root]].divergence for g in groups if g.root in ratios))


class _FakeJudge:
    """Time proportional to the Linear weights (int8 layers at half): what the budget logic sees, without noise."""

    def __init__(self, model, runtime, data, rounds=3):
        self.runtime, self.rows, self.unit, self.flops_inputs = runtime, 1, "units", None
        self.base = self.cost(model)

    @staticmethod
    def cost(model):
        from slimkit.quantization.modules import QuantLinear

        total = 0.0
        for m in model.modules():
            if isinstance(m, nn.Linear):
                total += m.weight.numel() / 1e3
            elif isinstance(m, QuantLinear):
                total += m.out_features * m.in_features / 2e3
        return total + 1.0

    def base_ms(self):
        return self.base

    def ratio(self, model, tag):
        return self.cost(model) / self.base, self.cost(model)

    def close(self):
        pass


def _fake_timing(monkeypatch):
    int8 = {"int8": RTN(bits=8)}

    def modes(model, runtime, batches):
        return "fp32", [L.ProbePath(runtime, "fp32"), L.ProbePath(runtime, "int8", int8["int8"])], int8

    monkeypatch.setattr(P, "LatencyJudge", _FakeJudge)
    monkeypatch.setattr(P, "_latency_modes", modes)
    monkeypatch.setattr(L, "time_path", lambda path, shape, rows: shape[0] * shape[1] / (2e3 if path.step else 1e3))


def test_auto_under_a_latency_budget_prunes_where_it_hurts_least_and_fits(monkeypatch, tmp_path):
    _fake_timing(monkeypatch)
    model = _mlp(width=256)
    r = P.auto(model, "latency=0.4", runtime="torch")
    assert r.by_latency and r.groups and r.sensitivity is None
    w = r.winner
    assert w is not None and w.error is None and w.latency_ratio <= 0.4
    ok = [p for p in r.plans if p.latency_ratio is not None and p.latency_ratio <= 0.4 and p.quality is not None]
    assert w.quality == max(p.quality for p in ok)
    assert {p.mode for p in r.plans} == {"fp32", "int8"} and any(p.name == "int8 alone" for p in r.plans)
    for p in r.plans:  # the time model is exact here: expected equals measured
        if p.latency_ratio is not None:
            assert p.expected_ms / r.fp32_ms == pytest.approx(p.latency_ratio, rel=1e-6)
    measured = [p for p in r.plans if p.quality is not None]
    for p in measured:
        if p.on_front:
            assert not any(q.latency_ratio <= p.latency_ratio and q.quality >= p.quality
                           and (q.latency_ratio < p.latency_ratio or q.quality > p.quality) for q in measured)
    # the winner's recipe, re-run, builds the same model
    recipe = w.recipe("m")
    out = run_recipe(P.copy.deepcopy(model), recipe).model
    data = task_of(model).eval_data(model, None)
    assert float(task_of(out).measure_quality(out, data)[0]["accuracy"]) == pytest.approx(w.quality, abs=1e-6)
    assert _FakeJudge.cost(out) / _FakeJudge.cost(model) == pytest.approx(w.latency_ratio)
    md = r.to_markdown()
    assert "measured × fp32 time" in md and "Structural sensitivity" in md and "(winner)" in md
    assert 'id="front-plot"' in r.to_html() and 'id="sensitivity-plot"' not in r.to_html()
    hopeless = P.auto(model, "latency=0.01", runtime="torch")
    assert hopeless.winner is None and any("raise the budget" in n for n in hopeless.notes)
    assert all(p.latency_ratio > 0.01 for p in hopeless.plans if p.latency_ratio is not None)


def test_a_recovery_trains_the_winner_before_it_is_quantized(monkeypatch):
    _fake_timing(monkeypatch)
    model = _mlp(width=256)
    r = P.auto(model, "latency=0.4", runtime="torch", recover_steps=4)
    rec = [p for p in r.plans if p.name.endswith("4-step recovery")]
    assert len(rec) == 1 and rec[0].error is None, rec[0].error if rec else r.notes
    families = [s.family for s in rec[0].recipe("m").steps]
    assert families.index("distill") > families.index("prune")
    if "quantize" in families:
        assert families.index("distill") < families.index("quantize")
    assert rec[0].latency_ratio <= 0.4


def test_bad_latency_settings_are_refused():
    model = _mlp()
    with pytest.raises(ConfigError, match="torch or onnxruntime"):
        P.auto(model, "latency=0.5", runtime="tflite")
    with pytest.raises(ConfigError, match="needs none"):
        P.auto(model, "bits=4", runtime="torch")
    with pytest.raises(ConfigError, match="recover_steps"):
        P.auto(model, "bits=4", recover_steps=-1)
    bare = set_task(nn.Sequential(nn.Linear(8, 4)).eval(), GenericTask(
        example_inputs=torch.randn(2, 8), calibration=CalibrationData.from_tensors(torch.randn(8, 8), batch_size=4)))
    with pytest.raises(Exception, match="no group it can prune|nothing to prune|size=F"):
        L.structural_sensitivity(bare, [torch.randn(4, 8)])


def test_the_timer_finds_a_model_as_fast_as_itself_and_a_smaller_one_faster():
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).eval()
    x = torch.randn(256, 512)
    set_task(model, GenericTask(example_inputs=x, calibration=CalibrationData.from_tensors(x, batch_size=64)))
    judge = L.LatencyJudge(model, "torch", None)
    try:
        same, _ = judge.ratio(P.copy.deepcopy(model), "same")
        small = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 512)).eval()
        smaller, ms = judge.ratio(small, "small")
    finally:
        judge.close()
    assert 0.5 < same < 2.0
    assert smaller < 0.6 and ms > 0  # an eighth of the work


def _setup(model):
    task = task_of(model)
    calib = task.calibration(model, None)
    data = task.eval_data(model, None)
    names = ["0", "2", "4"]
    return T.TrialSetup(model, calib, data, task.reference(model, data), "accuracy", names,
                        sum(model.get_submodule(n).weight.numel() for n in names))


PLANS = [(RTN(bits=4, group_size=32),), (StructuredPrune(ratio=0.5), RTN(bits=8)), (RTN(bits=2, group_size=32),)]


def test_trials_in_processes_equal_trials_in_this_process():
    setup = _setup(_mlp())
    serial = T.run_trials(setup, PLANS, jobs=1)
    forked = T.run_trials(setup, PLANS, jobs=2)
    keys = ("size_bytes", "bits", "quality", "error")
    assert [[r[k] for k in keys] for r in serial] == [[r[k] for k in keys] for r in forked]
    assert all(r["error"] is None for r in serial) and serial[0]["bits"] < 8
    with pytest.raises(ConfigError, match="jobs"):
        T.run_trials(setup, PLANS, jobs=0)


def test_trials_as_ray_tasks_on_a_local_instance_equal_serial():
    pytest.importorskip("ray")
    setup = _setup(_mlp())
    serial = T.run_trials(setup, PLANS[:2], jobs=1)
    remote = T.run_trials(setup, PLANS[:2], ray_address="local")
    keys = ("size_bytes", "bits", "quality", "error")
    assert [[r[k] for k in keys] for r in serial] == [[r[k] for k in keys] for r in remote]


def test_a_plan_that_fails_is_reported_and_the_others_still_count():
    setup = _setup(_mlp())
    bad = (StructuredPrune(ratio=0.5, include=("no-such-layer",)),)
    results = T.run_trials(setup, [bad, PLANS[0]])
    assert results[0]["error"] and "no-such-layer" in results[0]["error"] and results[0]["quality"] is None
    assert results[1]["error"] is None and results[1]["quality"] is not None


def test_cli_refuses_bad_latency_options(tmp_path):
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "latency=0.5", "--runtime", "tflite", "--out", tmp_path / "a")
    assert r.returncode == 2 and "torch or onnxruntime" in r.stderr and not (tmp_path / "a").exists()
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "size=0.5", "--runtime", "torch", "--out", tmp_path / "a")
    assert r.returncode == 2 and "needs none" in r.stderr
    r = slimkit_cli("auto", "stdlib-coder", "--budget", "size=0.5", "--jobs", "0", "--out", tmp_path / "a")
    assert r.returncode == 2 and "jobs" in r.stderr


def test_ray_missing_or_unreachable_is_a_config_error(monkeypatch):
    import sys

    setup = _setup(_mlp())
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'slimkit\[ray\]'"):
        T.run_trials(setup, PLANS[:1], ray_address="local")
    monkeypatch.delitem(sys.modules, "ray")
    ray = pytest.importorskip("ray")

    def refuse(**kw):
        raise ConnectionError("could not reach the GCS at 10.9.9.9:6379")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match="cannot connect .*ConnectionError.*ray start --head"):
        T.run_trials(setup, PLANS[:1], ray_address="10.9.9.9:6379")


def test_shared_linears_take_the_smaller_side_of_each_group_and_the_allocation_still_fits():
    a = {"fc": (64, 128), "up": (64, 32)}
    b = {"fc": (128, 96), "down": (16, 64)}
    assert L.merge_shapes(a, b) == {"fc": (64, 96), "up": (64, 32), "down": (16, 64)}
    model = _mlp(width=256)
    groups = L.structural_sensitivity(model, [torch.randn(8, 64)])
    timing = _timing(groups, base=sum(math.prod(s) for s in L.linear_shapes(model).values()) / 1e6 + 0.01)
    shared = L.possible_shapes(L.linear_shapes(model), groups)
    assert (64, 64) in shared and (256, 256) in shared  # layer 2 pruned on both sides
    for fraction in (0.3, 0.5, 0.8):
        ratios, expected, _ = L.allocate_latency(groups, timing, "fp32", fraction * timing.base_ms)
        changed = L.merge_shapes(*(g.options[ratios[g.root]].shapes for g in groups if g.root in ratios))
        assert expected == pytest.approx(timing.expected_ms("fp32", changed)) and expected <= fraction * timing.base_ms


def test_a_plan_far_under_its_expected_time_is_allocated_again_with_the_time_model_rescaled(monkeypatch):
    _fake_timing(monkeypatch)

    class Faster(_FakeJudge):  # the runtime does 30% better than the probes say, on every plan
        def ratio(self, model, tag):
            r, ms = super().ratio(model, tag)
            return 0.7 * r, 0.7 * ms

    monkeypatch.setattr(P, "LatencyJudge", Faster)
    r = P.auto(_mlp(width=256), "latency=0.4", runtime="torch")
    first = {p.name: p for p in r.plans if p.allocated and "time model" not in p.name}
    again = [p for p in r.plans if "(time model ×0.70)" in p.name]
    assert again and all("allocated again" in p.note for p in again)
    for p in again:
        before = first[p.name.split(" (time model")[0]]
        assert before.latency_ratio < 0.36  # it had room left
        assert before.latency_ratio < p.latency_ratio <= 0.4 + 1e-9  # the second one uses it
        assert p.quality >= before.quality


def test_the_rest_of_the_model_is_counted_in_flops_and_shrinks_with_pruned_filters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    set_task(model, GenericTask(example_inputs=x, calibration=CalibrationData.from_tensors(torch.randn(8, 3, 8, 8),
                                                                                           batch_size=4)))
    conv = lambda cin, cout: 2 * 2 * 8 * 8 * cout * cin * 9  # 2 FLOPs per MAC, batch 2, 8 × 8 outputs
    assert L.rest_flops(model, x) == conv(3, 16) + conv(16, 8)  # the Linear's 2·2·10·512 left out
    groups = L.structural_sensitivity(model, [x], timing_inputs=x)
    first = next(g for g in groups if g.root == "0")
    kept = 16 - math.ceil(0.5 * 16)
    assert first.options[0.5].rest_saved == conv(3, 16) + conv(16, 8) - conv(3, kept) - conv(kept, 8)
    timing = L.LatencyModel("torch", 2, 10.0, {"5": (10, 512)}, "fp32", {"fp32": {(10, 512): 1.0}},
                            rest_flops=L.rest_flops(model, x))
    assert timing.rest_ms == pytest.approx(9.0)
    half = timing.rest_flops / 2
    assert timing.expected_ms("fp32", rest_saved=half) == pytest.approx(10.0 - 4.5)
