"""Rank allocation under a budget: the greedy hull walk against brute force, and the divergence measure."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError
from slimkit.factorization.allocation import allocate_budget, lower_hull

torch.set_num_threads(1)


def brute_force(dense, options, budget):
    """The least summed cost over every combination (None = dense) within the budget."""
    best = None
    for combo in itertools.product(*[[None, *range(len(o))] for o in options]):
        params = sum(d if c is None else o[c][0] for d, o, c in zip(dense, options, combo))
        cost = sum(0.0 if c is None else o[c][1] for o, c in zip(options, combo))
        if params <= budget and (best is None or cost < best):
            best = cost
    return best


def total(dense, options, chosen):
    params = sum(d if c is None else o[c][0] for d, o, c in zip(dense, options, chosen))
    cost = sum(0.0 if c is None else o[c][1] for o, c in zip(options, chosen))
    return params, cost


@st.composite
def convex_layers(draw):
    """Layers whose cost falls convexly as parameters grow (rising marginal cost per parameter saved)."""
    n = draw(st.integers(1, 4))
    dense, options = [], []
    for _ in range(n):
        d = draw(st.integers(20, 100))
        k = draw(st.integers(1, 4))
        sizes = sorted(draw(st.lists(st.integers(1, d - 1), min_size=k, max_size=k, unique=True)), reverse=True)
        slopes = sorted(draw(st.lists(st.floats(0.01, 10), min_size=k, max_size=k)))
        cost, prev, opts = 0.0, d, []
        for size, slope in zip(sizes, slopes):
            cost += slope * (prev - size)
            prev = size
            opts.append((size, cost))
        dense.append(d)
        options.append(opts)
    return dense, options


@settings(max_examples=150, deadline=None)
@given(convex_layers(), st.floats(0.05, 1.0))
def test_greedy_is_optimal_for_the_total_it_lands_on_when_costs_are_convex(layers, fraction):
    dense, options = layers
    smallest = sum(o[-1][0] for o in options)
    budget = max(smallest, int(fraction * sum(dense)))
    chosen = allocate_budget(dense, options, budget)
    params, cost = total(dense, options, chosen)
    assert params <= budget
    assert cost <= brute_force(dense, options, params) + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 60), st.lists(st.tuples(st.integers(1, 80), st.floats(0, 5)),
                                                       min_size=1, max_size=4)), min_size=1, max_size=4),
       st.floats(0.0, 1.0))
def test_any_costs_meet_the_budget_or_are_refused(layers, fraction):
    dense = [d for d, _ in layers]
    options = [opts for _, opts in layers]
    smallest = sum(min([d] + [p for p, _ in o if p < d]) for d, o in zip(dense, options))
    budget = int(fraction * sum(dense))
    if smallest > budget:
        with pytest.raises(ConfigError, match="cannot be met"):
            allocate_budget(dense, options, budget)
        return
    chosen = allocate_budget(dense, options, budget)
    assert total(dense, options, chosen)[0] <= budget
    for d, o, c in zip(dense, options, chosen):
        assert c is None or o[c][0] < d  # never an option at or above the dense size


def test_the_hull_drops_points_no_budget_would_choose():
    points = [(100, 0.0), (80, 5.0), (60, 2.0), (40, 10.0), (20, 30.0)]
    # (80, 5) lies above the segment from (100, 0) to (60, 2): never worth it
    assert lower_hull(points) == [0, 2, 3, 4]
    chosen = allocate_budget([100], [points[1:]], 70)
    assert chosen == [1]  # the (60, 2) option


def test_greedy_spends_the_budget_on_the_most_sensitive_layer():
    dense = [100, 100]
    sensitive = [(50, 10.0), (25, 40.0)]
    robust = [(50, 0.1), (25, 0.4)]
    assert allocate_budget(dense, [sensitive, robust], 150) == [None, 0]
    assert allocate_budget(dense, [sensitive, robust], 125) == [None, 1]


def test_task_divergence_is_one_minus_cosine_for_encoders_and_kl_otherwise():
    from slimkit.tasks import CausalLMTask, ClassifierTask, EncoderTask

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    expected = (1 - 1 / 2**0.5 + 0) / 2
    assert abs(EncoderTask().divergence(a, b) - expected) < 1e-12
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert abs(CausalLMTask().divergence(a, b) - kl) < 1e-12
    assert ClassifierTask().divergence(a, a) == 0.0


def test_replaying_the_unchanged_blocks_gives_the_same_sensitivities(tiny_llama, monkeypatch):
    from torch import nn

    from slimkit.core.io import attach_info
    from slimkit.factorization import allocation
    from slimkit.factorization.allocation import LayerChoices, measure_sensitivity

    attach_info(tiny_llama, kind="causal-lm")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (2, 12), generator=g)} for _ in range(2)]

    def shrunk(linear, scale):
        def build():
            new = nn.Linear(linear.in_features, linear.out_features, bias=False)
            new.weight.data = linear.weight.detach() * scale
            return new
        return build

    layers = [LayerChoices(name, 1, [(s, 0, shrunk(tiny_llama.get_submodule(name), s)) for s in (0.5, 0.9)])
              for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head")]
    replayed = measure_sensitivity(tiny_llama, layers, batches)
    monkeypatch.setattr(allocation, "_block_outputs", lambda model: None)
    full = measure_sensitivity(tiny_llama, layers, batches)
    assert torch.allclose(torch.tensor(replayed), torch.tensor(full), rtol=1e-5, atol=1e-9)
    assert all(row[0] > row[1] > 0 for row in full)  # a larger change moves the output more
    assert type(tiny_llama.model.layers[0]).__name__ == "LlamaDecoderLayer"  # blocks restored
