"""digits-cnn: a small CNN trained on scikit-learn's bundled 8x8 digits.

Data (``load_digits_split``): ``sklearn.datasets.load_digits`` (1797 images of
8x8 pixels valued 0-16, 10 classes), ships with scikit-learn so nothing is
downloaded. Split rule, on sample indices ``0..1796``:

1. ``train_test_split(indices, test_size=0.3, stratify=y, random_state=0)``
   -> ``rest`` (70%) and ``test`` (30%, 540 samples);
2. ``train_test_split(rest, test_size=1/7, stratify=y[rest], random_state=0)``
   -> ``train`` (60%, 1077 samples) and ``calibration`` (10%, 180 samples).

Each split's indices are then sorted, so the order is the dataset's order.
Inputs are float32 ``N x 1 x 8 x 8`` scaled to [0, 1] (pixels / 16), labels int64.

Model (``DigitsCNN``): blocks of conv3x3 (padding 1) -> BatchNorm -> ReLU, a 2x2
max-pool after the blocks listed in ``pool_after``, then a global average
pool, a flatten and a Linear head. All plain ``nn`` modules in ``features``
(an ``nn.Sequential``) so structured pruning can follow conv -> bn -> conv.

Training (``train_digits``): the train split only, with random shifts of up to
one pixel, AdamW and a one-cycle schedule for a fixed number of epochs; no
model selection at all, so neither calibration nor test accuracy steers it.
Reproduce the shipped weights with ``slimkit zoo train digits-cnn --out OUT_DIR`` (1 thread).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelLoadError

SPLITS = ("train", "calibration", "test")
DATA_DIR = Path(__file__).parent / "data" / "digits-cnn"
DEFAULT_CONFIG = {"channels": [32, 64, 128], "pool_after": [0, 1], "num_classes": 10}
_CONFIG_KEYS = ("channels", "pool_after", "num_classes")


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, tuple[int, ...]]:
    """Sorted sample indices of every split (computed once; the rule is in the module docstring)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=0)
    train, calib = train_test_split(rest, test_size=1 / 7, stratify=y[rest], random_state=0)
    return {
        "train": tuple(sorted(int(i) for i in train)),
        "calibration": tuple(sorted(int(i) for i in calib)),
        "test": tuple(sorted(int(i) for i in test)),
    }


@lru_cache(maxsize=1)
def _all_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit as (float32 N x 1 x 8 x 8 in [0, 1], int64 labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the digits as ``(x, y)``: x float32 N x 1 x 8 x 8 in [0, 1], y int64."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
    x, y = _all_data()
    index = torch.tensor(_split_indices()[split], dtype=torch.int64)
    # Indexing copies, so callers may modify the result without touching the cache.
    return x[index], y[index]


def _validate_config(cfg: dict) -> dict:
    """A clean copy of an arch config; ConfigError (a ValueError) naming the first bad key."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"digits-cnn config must be a dict, got {type(cfg).__name__}")
    for key in cfg:
        if key not in _CONFIG_KEYS:
            raise ConfigError(f"unknown digits-cnn config key {key!r}; valid keys: {', '.join(_CONFIG_KEYS)}")
    for key in _CONFIG_KEYS:
        if key not in cfg:
            raise ConfigError(f"digits-cnn config is missing key {key!r}")
    channels, pool_after, num_classes = cfg["channels"], cfg["pool_after"], cfg["num_classes"]

    def is_pos_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not isinstance(channels, (list, tuple)) or not channels or not all(is_pos_int(c) for c in channels):
        raise ConfigError(
            f"digits-cnn config key 'channels' must be a non-empty list of positive ints, got {channels!r}"
        )
    if not isinstance(pool_after, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(channels) for i in pool_after
    ):
        raise ConfigError(
            f"digits-cnn config key 'pool_after' must list block indices in [0, {len(channels)}), got {pool_after!r}"
        )
    # Each pool halves the side; 8 -> 4 -> 2 -> 1, so at most three fit an 8x8 input.
    if len(set(pool_after)) > 3:
        raise ConfigError(f"digits-cnn config key 'pool_after' has more than 3 pools for an 8x8 input: {pool_after!r}")
    if not is_pos_int(num_classes):
        raise ConfigError(f"digits-cnn config key 'num_classes' must be a positive int, got {num_classes!r}")
    return {"channels": list(channels), "pool_after": sorted(set(pool_after)), "num_classes": num_classes}


class DigitsCNN(nn.Module):
    """conv3x3-BN-ReLU blocks (some followed by a 2x2 max-pool), global average pool, Linear head.

    ``features`` is an ``nn.Sequential`` of Conv2d, BatchNorm2d, ReLU and MaxPool2d;
    ``pool``, ``flatten`` and ``classifier`` follow it. ``forward`` returns logits.
    """

    slimkit_arch = "digits-cnn"
    # What its task needs to know, declared by the model itself (also when built directly, not loaded).
    slimkit_kind = "classifier"
    slimkit_defaults = {"corpus": "digits", "input_shape": [1, 8, 8]}

    def __init__(self, config: dict | None = None):
        super().__init__()
        self._config = _validate_config(DEFAULT_CONFIG if config is None else config)
        layers: list[nn.Module] = []
        in_ch = 1
        for i, out_ch in enumerate(self._config["channels"]):
            # bias=False: the following BatchNorm's shift makes a conv bias redundant.
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            if i in self._config["pool_after"]:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_ch, self._config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N x num_classes) for images N x 1 x 8 x 8."""
        return self.classifier(self.flatten(self.pool(self.features(x))))

    def arch_config(self) -> dict:
        """A JSON-able copy of the architecture config."""
        return json.loads(json.dumps(self._config))

    def sync_arch_config(self) -> None:
        """Set the config's channel list to the convs' current widths (after structured pruning)."""
        self._config["channels"] = [int(c.out_channels) for c in self.features if isinstance(c, nn.Conv2d)]

    @classmethod
    def from_arch_config(cls, cfg: dict) -> DigitsCNN:
        """A freshly initialised model from an arch config; ValueError naming a bad key."""
        return cls(cfg)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (switched to eval mode) on ``(x, y)``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image shifted by -1, 0 or +1 pixel on each axis (zero fill), drawn from ``gen``."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    # Nine possible offsets: one slice per offset beats per-image loops.
    for oy in range(3):
        for ox in range(3):
            m = (dy == oy) & (dx == ox)
            if m.any():
                out[m] = padded[m, :, oy : oy + 8, ox : ox + 8]
    return out


def train_digits(
    out_dir: str | Path,
    *,
    epochs: int = 60,
    seed: int = 0,
    config: dict | None = None,
    batch_size: int = 64,
    lr: float = 4e-3,
) -> dict:
    """Train digits-cnn on the train split and save model.safetensors, config.json, training.json to ``out_dir``.

    Returns the training summary written to training.json.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN(config)
    x_train, y_train = load_digits_split("train")
    steps_per_epoch = -(-len(x_train) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)

    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), batch_size):
            idx = perm[i : i + batch_size]
            xb = random_shift(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - start

    model.eval()
    # contiguous(): safetensors refuses views; state_dict keeps BN running stats.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.arch_config(), indent=2) + "\n")
    # Score the saved-and-reloaded model so the recorded figures are exactly what load_pretrained gives.
    reloaded = _load_from(out)
    summary = {
        "arch": DigitsCNN.slimkit_arch,
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "train_seconds": round(train_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_accuracy": accuracy(reloaded, *load_digits_split("train")),
        "calibration_accuracy": accuracy(reloaded, *load_digits_split("calibration")),
        "test_accuracy": accuracy(reloaded, *load_digits_split("test")),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load_from(folder: Path) -> DigitsCNN:
    """A DigitsCNN built from ``folder``'s config.json and strictly loaded from its model.safetensors."""
    from safetensors.torch import load_file

    cfg_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ModelLoadError(f"digits-cnn file missing: {p}")
    model = DigitsCNN.from_arch_config(json.loads(cfg_path.read_text()))
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.eval()


def load_pretrained() -> DigitsCNN:
    """The shipped digits-cnn, weights loaded strictly, in eval mode."""
    return _load_from(DATA_DIR)
