import pytest
import torch
from torch import nn

from slimkit.core.calibration import CalibrationData, capture_inputs, find_blocks, iterate_blocks
from slimkit.core.errors import DataError


class _CharTok:
    """A tiny tokenizer: one id per character, eos = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + (ord(c) % 100) for c in t] for t in texts]}


def test_from_texts_windows_are_disjoint_and_seeded():
    texts = ["abcdefghij" * 5, "klmnopqrst" * 5]
    a = CalibrationData.from_texts(texts, _CharTok(), seq_len=10, n=6, batch_size=4, seed=1)
    b = CalibrationData.from_texts(texts, _CharTok(), seq_len=10, n=6, batch_size=4, seed=1)
    assert [x["input_ids"].shape for x in a] == [torch.Size([4, 10]), torch.Size([2, 10])]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    rows = torch.cat([x["input_ids"] for x in a])
    assert len({tuple(r.tolist()) for r in rows}) <= 6 and a.num_samples == 6
    with pytest.raises(DataError, match="hold only"):
        CalibrationData.from_texts(texts, _CharTok(), seq_len=10, n=50)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([torch.tensor([[float("nan"), 1.0]])], "NaN"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], "must match"),
    ([{"input_ids": [1, 2]}], "not a tensor"),
])
def test_bad_calibration_data(bad, message):
    with pytest.raises(DataError, match=message):
        CalibrationData(bad)


def test_from_tensors_and_loader():
    x = torch.arange(10.0).view(5, 2)
    d = CalibrationData.from_tensors(x, batch_size=2)
    assert [b.shape[0] for b in d] == [2, 2, 1]
    loader = [(x[:2], torch.tensor([0, 1])), (x[2:4], torch.tensor([1, 0]))]
    d = CalibrationData.from_loader(loader)
    assert len(d) == 2 and torch.equal(next(iter(d)), x[:2])
    with pytest.raises(DataError):
        CalibrationData.from_tensors(torch.zeros(0, 3))


def test_capture_inputs_records_module_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    rec = capture_inputs(model, CalibrationData.from_tensors(x, batch_size=5), ["2"], stop_early=False)
    assert len(rec["2"]) == 1
    assert torch.allclose(rec["2"][0].args[0], torch.relu(model[0](x)))


def test_iterate_blocks_matches_full_forward(tiny_llama):
    ids = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        hidden = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states
    name, layers = find_blocks(tiny_llama)
    assert name == "model.layers" and len(layers) == 2
    seen = []
    for blk in iterate_blocks(tiny_llama, CalibrationData([{"input_ids": ids}])):
        assert torch.allclose(blk.calls[0].args[0], hidden[blk.index], atol=1e-5)
        seen.append(blk.name)
    assert seen == ["model.layers.0", "model.layers.1"]


def test_iterate_blocks_feeds_edited_block_outputs(tiny_llama):
    ids = torch.randint(0, 128, (2, 8))
    data = CalibrationData([{"input_ids": ids}])
    for blk in iterate_blocks(tiny_llama, data):
        if blk.index == 0:
            with torch.no_grad():
                for p in blk.block.mlp.parameters():
                    p.zero_()
            first_input = blk.calls[0].args[0]
        else:
            # with block 0's MLP zeroed, block 1 must see block 0's new output, not the original one
            with torch.no_grad():
                expected = tiny_llama.model.layers[0](first_input, **blk.calls[0].kwargs)
            expected = expected[0] if isinstance(expected, tuple) else expected
            assert torch.allclose(blk.calls[0].args[0], expected, atol=1e-6)


def test_trim_padding_cuts_right_padding_only_and_keeps_bert_outputs():
    from transformers import BertConfig, BertModel

    from slimkit.core.calibration import trim_padding

    ids = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    out = trim_padding({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])})
    assert out["input_ids"].shape == (2, 4) and out["attention_mask"].shape == (2, 4) and out["labels"].shape == (2,)
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert trim_padding({"input_ids": ids, "attention_mask": left})["input_ids"].shape == (2, 6)
    assert trim_padding(ids) is ids
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16)).eval()
    with torch.no_grad():
        full = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        cut = bert(**trim_padding({"input_ids": ids, "attention_mask": mask})).last_hidden_state
    assert torch.allclose(full[0, :3], cut[0, :3], atol=1e-5) and torch.allclose(full[1, :4], cut[1, :4], atol=1e-5)


def test_from_texts_refuses_a_single_string():
    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    with pytest.raises(DataError, match="not one string"):
        CalibrationData.from_texts("def f(x): return x" * 50, Tok(), seq_len=8, n=2)
    assert len(CalibrationData.from_texts(["def f(x): return x" * 50], Tok(), seq_len=8, n=2, batch_size=2)) == 1
