import types

import pytest
import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core import measure
from slimkit.core.measure import (
    LatencyStats,
    ParamCount,
    count_flops,
    count_macs,
    count_parameters,
    layer_sparsity,
    measure_latency,
    model_latency,
    size_on_disk,
)

torch.set_num_threads(1)


# --- parameters ------------------------------------------------------------------------


def test_count_parameters_counts_zeros_by_hand():
    lin = nn.Linear(4, 3)  # 12 weights + 3 biases
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[0, :3] = 0.0
        lin.bias.copy_(torch.tensor([0.0, 2.0, 3.0]))
    assert count_parameters(lin) == ParamCount(total=15, nonzero=15 - 3 - 1)


def test_tied_weights_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    assert count_parameters(Tied()).total == 40


def test_slimkit_param_counts_protocol_adds_weights_held_in_buffers():
    class QuantLinear(nn.Module):
        def __init__(self):
            super().__init__()
            q = torch.tensor([[1, 0, -3], [0, 0, 5]], dtype=torch.int8)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", torch.ones(2))  # not a weight: never counted
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

        def slimkit_param_counts(self):
            return self.qweight.numel(), int(torch.count_nonzero(self.qweight))

    model = nn.Sequential(QuantLinear(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[1].weight.fill_(0.5)
    # parameters: bias (2, 1 nonzero) + linear (2, 2 nonzero); protocol: 6 total, 3 nonzero
    assert count_parameters(model) == ParamCount(total=2 + 2 + 6, nonzero=1 + 2 + 3)


# --- size on disk ----------------------------------------------------------------------


def test_size_on_disk_file_and_directory(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 123)
    sub = tmp_path / "sub" / "deeper"
    sub.mkdir(parents=True)
    (sub / "b.bin").write_bytes(b"y" * 1000)
    (tmp_path / "sub" / "c.txt").write_bytes(b"z" * 7)
    assert size_on_disk(tmp_path / "a.bin") == 123
    assert size_on_disk(tmp_path) == 123 + 1000 + 7
    assert size_on_disk(str(tmp_path / "sub")) == 1007


def test_size_on_disk_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SlimkitError, match="nope.safetensors"):
        size_on_disk(missing)


# --- sparsity --------------------------------------------------------------------------


def test_layer_sparsity_by_hand():
    class DenseFromPacked(nn.Module):
        """A compressed layer with no .weight that can rebuild its float weight."""

        def dense_weight(self):
            return torch.tensor([[0.0, 1.0], [0.0, 0.0]])

    model = nn.Sequential(
        nn.Linear(4, 3),
        nn.ReLU(),
        nn.Conv1d(2, 2, 3),
        nn.Conv2d(1, 2, 2),
        nn.Embedding(5, 2),
        nn.LayerNorm(3),
        DenseFromPacked(),
    )
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[1, 1:] = 0.0  # 3 of 12
        model[2].weight.fill_(2.0)  # 0 of 12
        model[3].weight.zero_()  # 8 of 8
        model[4].weight.fill_(1.0)
        model[4].weight[0] = 0.0  # 2 of 10
    assert layer_sparsity(model) == {"0": 0.25, "2": 0.0, "3": 1.0, "4": 0.2, "6": 0.75}


# --- FLOPs -----------------------------------------------------------------------------


def test_flops_linear_and_conv_by_hand():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    assert count_flops(lin, x) == 2 * 3 * 8 * 4
    assert count_macs(lin, x) == 3 * 8 * 4

    conv = nn.Conv2d(2, 5, 3)
    img = torch.randn(1, 2, 6, 6)  # output 1 x 5 x 4 x 4, each 2*3*3 MACs
    assert count_flops(conv, img) == 2 * (5 * 4 * 4) * (2 * 3 * 3)


def test_cpu_sdpa_attention_counts_its_two_matmuls_by_hand():
    q = torch.randn(2, 3, 16, 8)  # (batch, heads, seq, head_dim)
    k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    # Q·Kᵀ and P·V: 2 · batch · heads · seq · seq · head_dim multiply-accumulates, 2 FLOPs each.
    assert count_flops(attend, (q, k, v)) == 2 * 2 * (2 * 3 * 16 * 16 * 8)


def test_flops_dict_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 2, bias=False)

        def forward(self, x, y):
            return self.a(x) @ y  # (5,2) @ (2,7)

    model, x, y = Two(), torch.randn(5, 6), torch.randn(2, 7)
    expected = 2 * (5 * 6 * 2) + 2 * (5 * 2 * 7)
    assert count_flops(model, (x, y)) == expected
    assert count_flops(model, {"x": x, "y": y}) == expected


# --- latency ---------------------------------------------------------------------------


def _fake_clock(monkeypatch, durations_s):
    """Make measure's perf_counter a clock that fn() advances by the next duration."""
    clock = [0.0]
    steps = iter(durations_s)
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def fn():
        clock[0] += next(steps)

    return fn


def test_measure_latency_statistics_by_hand(monkeypatch):
    # 2 warm-up calls (long, must be ignored), then 5 timed ones.
    fn = _fake_clock(monkeypatch, [9.0, 9.0, 0.010, 0.030, 0.020, 0.050, 0.040])
    stats = measure_latency(fn, warmup=2, runs=5, batch_size=4, seq_len=16)
    assert stats.median_ms == pytest.approx(30.0)
    assert stats.mean_ms == pytest.approx(30.0)
    assert stats.min_ms == pytest.approx(10.0)
    assert stats.max_ms == pytest.approx(50.0)
    assert (stats.runs, stats.warmup, stats.batch_size, stats.seq_len) == (5, 2, 4, 16)
    assert stats.throughput == pytest.approx(4 / 0.030)
    assert stats.threads == torch.get_num_threads()


def test_measure_latency_no_batch_no_throughput(monkeypatch):
    fn = _fake_clock(monkeypatch, [0.001] * 4)
    stats = measure_latency(fn, warmup=0, runs=4)
    assert stats.throughput is None and stats.batch_size is None and stats.seq_len is None
    assert LatencyStats.from_dict(stats.to_dict()) == stats


def test_measure_latency_sets_and_restores_threads():
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    seen = []
    stats = measure_latency(lambda: seen.append(torch.get_num_threads()), warmup=1, runs=2, threads=wanted)
    assert seen == [wanted] * 3 and stats.threads == wanted
    assert torch.get_num_threads() == before

    def boom():
        raise RuntimeError("fails mid-measurement")

    with pytest.raises(RuntimeError):
        measure_latency(boom, threads=wanted)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kw", [{"warmup": -1}, {"runs": 0}, {"threads": 0}, {"batch_size": 0}])
def test_measure_latency_refuses_bad_settings(kw):
    with pytest.raises(SlimkitError) as info:
        measure_latency(lambda: None, **kw)
    assert isinstance(info.value, ValueError)
    assert next(iter(kw)) in str(info.value)


def test_model_latency_runs_no_grad_forward_and_reads_shapes():
    calls = []

    class Probe(nn.Module):
        def forward(self, input_ids, attention_mask):
            calls.append(torch.is_grad_enabled())
            return input_ids * attention_mask

    ids = torch.ones(3, 7, dtype=torch.long)
    stats = model_latency(Probe(), {"input_ids": ids, "attention_mask": ids}, warmup=1, runs=3)
    assert calls == [False] * 4
    assert (stats.batch_size, stats.seq_len, stats.runs) == (3, 7, 3)
    assert stats.throughput == pytest.approx(3 / (stats.median_ms / 1e3))

    img = model_latency(nn.Conv2d(3, 2, 1), torch.randn(5, 3, 4, 4), warmup=0, runs=1, batch_size=10)
    assert (img.batch_size, img.seq_len) == (10, None)  # explicit argument wins
