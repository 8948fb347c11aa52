"""sk.save + sk.load of structurally pruned models: the smaller layers come back, and mismatches are refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.errors import ModelLoadError

torch.set_num_threads(1)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                        vocab_size=100, max_position_embeddings=32)
    return BertModel(config).eval()


def test_non_uniformly_head_pruned_bert_reloads_with_equal_outputs(tmp_path):
    model = _tiny_bert()
    sk.prune_(model, sk.StructuredPrune(ratio=0.5, scope="global", importance="l2", targets=("heads", "neurons")))
    heads = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    widths = [layer.intermediate.dense.out_features for layer in model.encoder.layer]
    assert sum(heads) < 8 and sum(widths) < 256
    sk.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "slimkit.json").read_text())
    assert meta["structure"]["encoder.layer.0.attention.self"]["num_attention_heads"] == heads[0]
    reloaded = sk.load(tmp_path / "ck")
    assert [layer.attention.self.num_attention_heads for layer in reloaded.encoder.layer] == heads
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                               model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_pruned_checkpoint_with_the_wrong_architecture_is_refused(tmp_path):
    model = _tiny_bert()
    sk.prune_(model, sk.StructuredPrune(ratio=0.5, targets=("neurons",)))
    sk.save(model, tmp_path / "ck")
    config_file = tmp_path / "ck" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_hidden_layers"] = 3  # an architecture the weights were not pruned from
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="missing key"):
        sk.load(tmp_path / "ck")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(torch.flatten(x, 1))


def test_users_own_module_reloads_into_a_dense_skeleton(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    sk.prune_(model, sk.StructuredPrune(ratio=0.5, example_input_shape=(1, 1, 4, 4)))
    assert model.conv1.out_channels == 4 and model.fc.in_features == 4 * 16
    sk.save(model, tmp_path / "ck")
    reloaded = sk.load(tmp_path / "ck", skeleton=_Net())
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(reloaded(x), model(x))


def test_pruned_digits_cnn_reloads_from_its_zoo_config(tmp_path):
    model = sk.load("digits-cnn")
    sk.prune_(model, sk.StructuredPrune(ratio=0.3))
    sk.save(model, tmp_path / "ck")
    reloaded = sk.load(tmp_path / "ck")
    assert reloaded.arch_config()["channels"] == model.arch_config()["channels"] != [32, 64, 128]
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(reloaded(x), model(x))
