"""The task layer: which task a model gets, and what each task feeds, measures and compares."""

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.io import model_info
from slimkit.tasks import (CausalLMTask, ClassifierTask, EncoderTask, GenericTask, ImageClassifierTask, corpus_names,
                           set_task, task_kinds, task_of)
from slimkit.tasks.base import EvalData, epoch_rows, split_labels


def test_task_of_picks_by_recorded_kind_class_and_declaration(tiny_lm_dir):
    import transformers as tf

    assert isinstance(task_of(sk.load(tiny_lm_dir)), CausalLMTask)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert isinstance(task_of(gpt2), CausalLMTask)  # "...LMHeadModel", not an encoder "...Model"
    bert = tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    assert isinstance(task_of(bert), EncoderTask)
    vit = tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    assert isinstance(task_of(vit), ImageClassifierTask)
    assert isinstance(task_of(sk.load("digits-cnn")), ClassifierTask)
    assert type(task_of(nn.Linear(2, 2))).kind == "module"  # a user's module: the generic task
    assert {"causal-lm", "encoder", "classifier", "image-classifier", "module"} <= set(task_kinds())
    assert {"stdlib", "stdlib-sentences", "digits"} <= set(corpus_names())


def test_set_task_attaches_a_generic_task_or_a_kind_and_refuses_unknown_kinds():
    net = nn.Sequential(nn.Linear(4, 3))
    task = GenericTask(example_inputs=torch.zeros(5, 4), metric=lambda m, d: {"accuracy": 0.5})
    set_task(net, task)
    assert task_of(net) is task and model_info(net)["kind"] == "module"
    assert task_of(net).example_inputs(net)["input"].shape == (5, 4)
    set_task(net, "classifier")
    assert isinstance(task_of(net), ClassifierTask)
    with pytest.raises(ConfigError, match="unknown task kind 'clasifier'.*did you mean 'classifier'"):
        set_task(net, "clasifier")


def test_causal_lm_calibration_takes_what_a_short_source_has_and_refuses_less_than_one_window(tiny_lm_dir, tmp_path):
    model = sk.load(tiny_lm_dir)
    text = tmp_path / "code.txt"
    text.write_text("\n".join(f"def f{i}(x): return x + {i}" for i in range(40)))
    calib = task_of(model).calibration(model, f"{text}?n=1000&seq_len=32")
    windows = torch.cat([b["input_ids"] for b in calib])
    assert windows.shape[1] == 32 and 1 < windows.shape[0] < 1000
    assert f"only {windows.shape[0]} available of the 1000 asked for" in calib.description
    with pytest.raises(DataError, match=r"one calibration window needs seq_len=100000 tokens"):
        task_of(model).calibration(model, f"{text}?seq_len=100000")


def test_causal_lm_eval_refuses_a_perplexity_of_a_few_tokens(tiny_lm_dir, tmp_path):
    model = sk.load(tiny_lm_dir)
    (tmp_path / "two.txt").write_text("a b")
    with pytest.raises(DataError, match="a perplexity needs at least 32"):
        task_of(model).eval_data(model, str(tmp_path / "two.txt"))


def test_causal_lm_labels_mask_padding_and_encoder_predictions_pool_over_the_mask():
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert CausalLMTask().labels({"input_ids": ids}, mask).tolist() == [[5, 6, 7], [8, 9, -100]]
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    pooled = EncoderTask().prediction(None, hidden, mask)
    assert torch.allclose(pooled[1], hidden[1, :2].mean(0)) and torch.allclose(pooled[0], hidden[0].mean(0))
    with pytest.raises(UnsupportedError, match="own objective"):
        EncoderTask().loss(None, None)


def test_classifier_reads_an_npz_file_for_calibration_and_evaluation(tmp_path):
    model = sk.load("digits-cnn")
    x = np.random.default_rng(0).random((70, 1, 8, 8), dtype=np.float32)
    y = np.arange(70) % 10
    np.savez(tmp_path / "digits.npz", inputs=x, labels=y)
    task = task_of(model)
    calib = task.calibration(model, f"{tmp_path / 'digits.npz'}?n=40")
    assert sum(b.shape[0] for b in calib) == 40
    data = task.eval_data(model, str(tmp_path / "digits.npz"))
    assert data.inputs.shape == (70, 1, 8, 8) and torch.equal(data.labels, torch.as_tensor(y))
    acc = task.measure_quality(model, data)[0]["accuracy"]
    with torch.no_grad():
        expected = float((model(torch.as_tensor(x)).argmax(1) == torch.as_tensor(y)).float().mean())
    assert acc == pytest.approx(expected)


def test_a_model_with_no_corpus_asks_for_data():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    set_task(model, "classifier")
    with pytest.raises(DataError, match="it has no built-in corpus; give a data source"):
        task_of(model).calibration(model)


def test_epoch_rows_visit_every_row_once_per_epoch_and_split_labels_forms():
    cache: dict = {}
    rows = torch.cat([epoch_rows(10, 4, step, seed=3, cache=cache) for step in range(5)])  # two epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:20].tolist()) == list(range(10))
    assert torch.equal(rows, torch.cat([epoch_rows(10, 4, s, 3, {}) for s in range(5)]))  # deterministic
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_labels((x, y))[1] is y and split_labels({"input": x, "labels": y})[0] is x
    assert split_labels({"input_ids": x})[1] is None


def test_generic_task_metric_must_return_numbers():
    net = nn.Linear(3, 2)
    task = GenericTask(example_inputs=torch.zeros(2, 3), eval_data=torch.zeros(4, 3), metric=lambda m, d: {"x": "y"})
    with pytest.raises(DataError, match="must return a dict of numbers"):
        task.measure_quality(net, EvalData("module", "d", inputs=torch.zeros(4, 3)))


def test_verbs_take_a_data_spec_or_a_data_loader(tiny_lm_dir, tmp_path):
    model = sk.load(tiny_lm_dir)
    text = tmp_path / "code.txt"
    text.write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(200)))
    sk.quantize_(model, sk.GPTQ(bits=4, group_size=32), data=f"{text}?n=8&seq_len=32")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 8), torch.zeros(32)),
                                         batch_size=8)
    sk.quantize_(net, sk.StaticQuant(), data=loader)  # (inputs, labels) batches: the inputs calibrate
    assert type(net[0]).__name__ == "QuantLinear" and net[0].act_mode == "static"
    with pytest.raises(ConfigError, match="data must be CalibrationData, a data spec"):
        sk.quantize_(nn.Sequential(nn.Linear(8, 8)), sk.StaticQuant(), data=3)


def test_a_huge_one_line_eval_text_is_tokenized_only_as_far_as_needed(tiny_lm_dir, tmp_path):
    import time

    model = sk.load(tiny_lm_dir)
    big = tmp_path / "big.txt"
    big.write_text("def f(x): return x + 1; " * 1_000_000)  # 24 MB on one line
    start = time.perf_counter()
    data = task_of(model).eval_data(model, str(big), max_tokens=2000)
    assert len(data.token_ids) == 2000 and time.perf_counter() - start < 20
