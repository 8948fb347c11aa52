"""digits-cnn: the shipped model's accuracy, the split's guarantees, the arch-config round trip."""

import json

import pytest
import torch
from torch import nn

from slimkit.zoo import digits

torch.set_num_threads(1)


def test_shipped_model_accuracy_matches_training_summary():
    model = digits.load_pretrained()
    assert not model.training
    acc = digits.accuracy(model, *digits.load_digits_split("test"))
    summary = json.loads((digits.DATA_DIR / "training.json").read_text())
    assert acc >= 0.97
    assert abs(acc - summary["test_accuracy"]) < 1e-9
    assert summary["arch"] == "digits-cnn" and summary["seed"] == 0


def test_split_is_deterministic_disjoint_complete_and_stratified():
    parts = {s: digits.load_digits_split(s) for s in digits.SPLITS}
    for s, (x, y) in parts.items():
        x2, y2 = digits.load_digits_split(s)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and len(x) == len(y)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert set(y.tolist()) == set(range(10)), f"{s} lacks a class"
    sizes = {s: len(parts[s][1]) for s in parts}
    assert sizes == {"train": 1077, "calibration": 180, "test": 540}
    index = {s: set(digits._split_indices()[s]) for s in digits.SPLITS}
    assert not index["train"] & index["calibration"]
    assert not index["train"] & index["test"]
    assert not index["calibration"] & index["test"]
    assert set.union(*index.values()) == set(range(1797))
    # Stratified: each class's share in test stays within 2 points of its share in train.
    share = {s: torch.bincount(parts[s][1], minlength=10).double() / sizes[s] for s in parts}
    assert (share["test"] - share["train"]).abs().max() < 0.02


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="calibration"):
        digits.load_digits_split("validation")


def test_split_results_are_copies():
    x, _ = digits.load_digits_split("test")
    x.fill_(5.0)
    assert digits.load_digits_split("test")[0].max() <= 1.0


def test_arch_config_round_trip_rebuilds_an_identical_model():
    model = digits.load_pretrained()
    cfg = model.arch_config()
    assert json.loads(json.dumps(cfg)) == cfg
    cfg["channels"].append(7)  # a copy: mutating it must not touch the model
    assert model.arch_config() != cfg
    rebuilt = digits.DigitsCNN.from_arch_config(model.arch_config())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    x = digits.load_digits_split("calibration")[0][:16]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_model_is_made_of_plain_modules():
    model = digits.DigitsCNN.from_arch_config({"channels": [8, 16], "pool_after": [0], "num_classes": 10})
    allowed = (digits.DigitsCNN, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
               nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)
    assert all(isinstance(m, allowed) for m in model.modules())
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert digits.DigitsCNN.slimkit_arch == "digits-cnn"


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"channels": [8], "pool_after": [], "num_classes": 10, "width": 3}, "width"),
        ({"channels": [8], "pool_after": []}, "num_classes"),
        ({"channels": [], "pool_after": [], "num_classes": 10}, "channels"),
        ({"channels": [8, -1], "pool_after": [], "num_classes": 10}, "channels"),
        ({"channels": [8], "pool_after": [1], "num_classes": 10}, "pool_after"),
        ({"channels": [8], "pool_after": [], "num_classes": 0}, "num_classes"),
    ],
)
def test_bad_config_raises_naming_the_key(cfg, key):
    with pytest.raises(ValueError, match=key):
        digits.DigitsCNN.from_arch_config(cfg)


def test_training_smoke(tmp_path):
    summary = digits.train_digits(tmp_path, epochs=1, config={"channels": [4], "pool_after": [], "num_classes": 10})
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "training.json"}
    assert summary["epochs"] == 1 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "training.json").read_text()) == summary
