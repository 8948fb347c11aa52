"""Generation with a KV cache: same tokens as transformers' generate, sampling rules, bad input, LM report rows."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimkit as sk
from slimkit.core.errors import ConfigError, DataError
from slimkit.evaluation.generation import generate, measure_generation, tensor_bytes
from slimkit.quantization import kernels as K
from slimkit.tasks.generation import Sampling, decode_loop, next_token


def test_greedy_tokens_equal_transformers_generate(tiny_llama):
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    ours = generate(tiny_llama, prompt, max_new_tokens=20, sampling=Sampling(stop_at_eos=False))
    theirs = tiny_llama.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, min_new_tokens=20)
    assert ours.new_ids[0].tolist() == theirs[0, 12:].tolist()
    assert ours.new_tokens == 20 and ours.prefill_s > 0 and ours.decode_tokens_per_s > 0


def test_cached_decode_equals_full_forward_logits(tiny_llama):
    """Each decode step's logits with the cache equal a full forward over the whole sequence at that position."""
    from slimkit.evaluation.generation import torch_step

    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    step = torch_step(tiny_llama)
    with torch.no_grad():
        _, cache = step(ids[:, :6], None)
        for t in range(6, 10):
            logits, cache = step(ids[:, t:t + 1], cache)
            full = tiny_llama(ids[:, :t + 1]).logits[0, -1]
            assert torch.allclose(logits[0, -1], full, atol=1e-4)


def test_quantized_model_generates_with_its_kernels(tiny_llama):
    sk.quantize_(tiny_llama, sk.RTN(bits=8))
    prompt = torch.arange(1, 9).reshape(1, -1)
    with K.kernel_policy("reference"):
        ref = generate(tiny_llama, prompt, max_new_tokens=10, sampling=Sampling(stop_at_eos=False))
    with K.kernel_policy("force"):  # fp32-activation kernels: the same greedy tokens
        fast = generate(tiny_llama, prompt, max_new_tokens=10, sampling=Sampling(stop_at_eos=False))
    assert fast.new_ids.tolist() == ref.new_ids.tolist()


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_llama):
    prompt = torch.arange(1, 6).reshape(1, -1)
    a = generate(tiny_llama, prompt, max_new_tokens=8, sampling=Sampling(temperature=1.0, seed=7, stop_at_eos=False))
    b = generate(tiny_llama, prompt, max_new_tokens=8, sampling=Sampling(temperature=1.0, seed=7, stop_at_eos=False))
    assert a.new_ids.tolist() == b.new_ids.tolist()
    greedy = generate(tiny_llama, prompt, max_new_tokens=8, sampling=Sampling(stop_at_eos=False))
    top1 = generate(tiny_llama, prompt, max_new_tokens=8,
                    sampling=Sampling(temperature=2.0, top_k=1, seed=3, stop_at_eos=False))
    assert top1.new_ids.tolist() == greedy.new_ids.tolist()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), p=st.floats(0.05, 1.0))
def test_sampled_token_lies_in_top_k_and_top_p_set(seed, k, p):
    logits = torch.randn(20, generator=torch.Generator().manual_seed(seed))
    token = next_token(logits, Sampling(temperature=0.7, top_k=k, top_p=p),
                       torch.Generator().manual_seed(seed))
    order = torch.argsort(logits / 0.7, descending=True).tolist()
    assert order.index(token) < k
    probs = torch.softmax(logits / 0.7, dim=-1)[order]
    # the smallest prefix reaching p contains the token
    needed = int((torch.cumsum(probs, 0) < p).sum()) + 1
    assert order.index(token) < max(needed, 1)


def test_stops_at_eos_unless_told_not_to():
    def step(ids, state):  # always predicts token 3
        logits = torch.full((1, ids.shape[1], 5), -10.0)
        logits[..., 3] = 10.0
        return logits, state

    assert decode_loop(step, torch.tensor([[1]]), 10, eos_token_id=3).new_ids.tolist() == [[3]]
    assert decode_loop(step, torch.tensor([[1]]), 10, eos_token_id=None).new_tokens == 10


def test_prompt_longer_than_context_names_both_numbers(tiny_llama):
    with pytest.raises(ConfigError, match=r"130 tokens.*context is 128"):
        generate(tiny_llama, torch.zeros(1, 130, dtype=torch.long), max_new_tokens=4)


def test_prompt_near_the_end_of_context_generates_what_fits(tiny_llama):
    out = generate(tiny_llama, torch.ones(1, 120, dtype=torch.long), max_new_tokens=50,
                   sampling=Sampling(stop_at_eos=False))
    assert out.new_tokens == 8 and "generated 8 tokens, not 50" in out.notes[0]


def test_not_a_causal_lm_is_refused():
    model = sk.load("digits-cnn")
    with pytest.raises(ConfigError, match="causal language model"):
        generate(model, [1, 2, 3])


def test_text_prompt_needs_a_tokenizer(tiny_llama):
    with pytest.raises(DataError, match="no tokenizer"):
        generate(tiny_llama, "hello")
    with pytest.raises(DataError, match=r"\[0, 128\)"):
        generate(tiny_llama, [5, 200])


def test_text_in_text_out(tiny_lm_dir):
    out = sk.generate(str(tiny_lm_dir), "def add(", max_new_tokens=5, sampling=Sampling(stop_at_eos=False))
    assert isinstance(out.text, str) and out.new_tokens == 5


def test_measure_generation_figures(tiny_llama):
    stats = measure_generation(tiny_llama, torch.arange(1, 17).reshape(1, -1), new_tokens=8, runs=2)
    assert stats.decode_tokens_per_s > 0 and stats.prefill_ms > 0
    assert stats.prompt_tokens == 16 and stats.new_tokens == 8
    params = sum(p.numel() * 4 for p in tiny_llama.parameters())
    assert tensor_bytes(tiny_llama) >= params
    if stats.memory_mb is not None:
        assert stats.memory_mb * 1e6 >= params


def test_int4_kernel_copies_count_in_tensor_bytes(tiny_llama):
    sk.quantize_(tiny_llama, sk.RTN(bits=4, group_size=32))
    with K.kernel_policy("reference"):
        K.prepare_kernels(tiny_llama)  # no kernel: nothing prepared
        before = tensor_bytes(tiny_llama)
    with K.kernel_policy("force"), torch.no_grad():
        K.prepare_kernels(tiny_llama)
        assert tensor_bytes(tiny_llama) > before  # the repacked codes are memory too


def test_lm_report_shows_decode_speed_and_kernel_paths(tiny_lm_dir):
    base = sk.load(str(tiny_lm_dir))
    comp = sk.load(str(tiny_lm_dir))
    sk.quantize_(comp, sk.RTN(bits=8))
    from slimkit.evaluation.suite import compare, resolve_eval_data

    data = resolve_eval_data(base, ["def add(a, b):\n    return a + b\n" * 40])
    with K.kernel_policy("force"):
        report = compare(base, comp, data, metrics=("size", "latency", "perplexity"))
    md = report.to_markdown()
    assert "Decode tokens/s" in md and "Memory while generating" in md
    assert report.compressed.generation["decode_tokens_per_s"] > 0
    assert any("int8pack" in note for note in report.notes)
    again = type(report).from_json(report.to_json())
    assert again.compressed.generation == report.compressed.generation


def test_cli_generate_json_and_errors(tiny_lm_dir):
    from tests.test_cli import slimkit_cli

    result = slimkit_cli("generate", tiny_lm_dir, "--prompt", "def add(", "-n", "4", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["new_ids"]) <= 4 and data["runtime"].startswith("pytorch")
    text = slimkit_cli("generate", tiny_lm_dir, "--prompt", "def add(", "-n", "4")
    assert text.returncode == 0 and text.stdout.startswith("def add(") and "decode:" in text.stderr
    for args, message in ((("digits-cnn", "--prompt", "x"), "causal language model"),
                          ((tiny_lm_dir, "--prompt", "x", "--top-p", "0"), "top_p"),
                          ((tiny_lm_dir, "--prompt", "x", "--kv-cache", "int3"), "int8")):
        bad = slimkit_cli("generate", *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        errors = [line for line in bad.stderr.splitlines() if not line.startswith("done ")]
        assert len(errors) == 1 and errors[0].startswith("error:")


def test_cli_exports_a_kv_cache_graph_and_generates_from_it(tiny_lm_dir, tmp_path):
    """`slimkit export onnx` writes the decoder-with-past graph; `slimkit generate FILE.onnx` gives PyTorch's tokens."""
    import shutil

    from tests.test_cli import slimkit_cli

    folder = tmp_path / "m"
    shutil.copytree(tiny_lm_dir, folder)
    exported = slimkit_cli("export", "onnx", folder, "--json")
    assert exported.returncode == 0, exported.stderr
    names = json.loads(exported.stdout)["notes"]
    assert any("decoder-with-past" in n for n in names)
    onnx_run = slimkit_cli("generate", folder / "model.onnx", "--prompt", "def add(", "-n", "6", "--json")
    torch_run = slimkit_cli("generate", folder, "--prompt", "def add(", "-n", "6", "--json")
    assert onnx_run.returncode == 0 and torch_run.returncode == 0, onnx_run.stderr + torch_run.stderr
    a, b = json.loads(onnx_run.stdout), json.loads(torch_run.stdout)
    assert a["runtime"] == "onnxruntime" and a["new_ids"] == b["new_ids"]
    no_tok = tmp_path / "lone.onnx"
    shutil.copy(folder / "model.onnx", no_tok)
    bad = slimkit_cli("generate", no_tok, "--prompt", "x")
    assert bad.returncode == 2 and "no tokenizer files" in bad.stderr


def _measured(latency_ms: float, tok_s: float, prefill_timings=()) -> object:
    from slimkit.core.measure import LatencyStats
    from slimkit.evaluation.report import ModelMeasurement

    gen = {"decode_tokens_per_s": tok_s, "kernels": ["3 layers: int8pack (bf16 activations)"], "isa": "AVX2",
           "threads": 2, "layer_timings": ["64x64: int8pack (bf16 activations) 9.0 us vs fp32 F.linear 5.0 us"],
           "prefill_timings": list(prefill_timings)}
    lat = LatencyStats.from_samples([latency_ms] * 3, warmup=1, threads=2, batch_size=1, seq_len=256)
    return ModelMeasurement(name="m", kind="causal-lm", size_bytes=1, params_total=1, params_nonzero=1,
                            latency=lat, generation=gen)


def test_report_says_why_when_decode_or_prefill_got_slower():
    from slimkit.evaluation.suite import generation_notes

    line = "64x64: reference 30.0 us vs fp32 F.linear 20.0 us"
    notes = generation_notes(_measured(10.0, 100.0), _measured(12.0, 80.0, [line]))
    assert any(n.startswith("kernels measured on AVX2") for n in notes)
    assert any("no decode speed-up: 0.80x" in n and "9.0 us vs fp32" in n for n in notes)
    assert any("prefill (the latency row) is 1.20x" in n and line in n for n in notes)
    faster = generation_notes(_measured(10.0, 100.0), _measured(9.0, 120.0, [line]))
    assert not any("no decode speed-up" in n or "prefill (the latency row)" in n for n in faster)
