"""The image-classifier task end to end: an HF ViTForImageClassification folder and a folder of PNG images.

References are computed by hand here: PIL reads each PNG, torch resizes it to the model's
16x16 (the images are 24x20, so resizing is exercised), the float model scores it, and the
folder name maps to the model's label id through ``config.label2id``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import slimkit as sk
from slimkit.core.errors import DataError
from slimkit.core.io import model_info
from slimkit.tasks import task_of

LABELS = ["owl", "cat", "dog"]  # the model's ids 0, 1, 2: not the sorted folder order (cat, dog, owl)
PER_CLASS = 4


def _vit_folder(folder):
    """A random-init ViTForImageClassification (16x16 images, patch 4, hidden 32, 2 layers, 3 labels)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    # initializer_range 1.0: weights large enough that the untrained model's answer depends on the image colour
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=3, id2label=dict(enumerate(LABELS)),
                       label2id={name: i for i, name in enumerate(LABELS)}, initializer_range=1.0)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _image_folder(folder, size=(24, 20)):
    """PER_CLASS noisy RGB PNGs (height x width ``size``) in one sub-folder per label, one dominant colour per
    label (chosen so that the seeded random model above gets most of them right)."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(LABELS):
        (folder / name).mkdir(parents=True)
        colour = np.zeros(3)
        colour[(i + 1) % 3] = 200
        for j in range(PER_CLASS):
            pixels = np.clip(colour + rng.normal(0, 60, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{j}.png")


def _by_hand(folder):
    """(pixel_values at 16x16 in [0, 1], label ids by config.label2id), in the reader's sorted order."""
    images, labels = [], []
    for name in sorted(LABELS):
        for file in sorted((folder / name).iterdir()):
            x = torch.from_numpy(np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            images.append(torch.nn.functional.interpolate(x[None], size=(16, 16), mode="bilinear", align_corners=False,
                                                          antialias=True)[0].clamp(0, 1))
            labels.append(LABELS.index(name))
    return torch.stack(images), torch.tensor(labels)


def _accuracy(model, x, y, k=1):
    with torch.no_grad():
        top = model(pixel_values=x).logits.topk(k, dim=-1).indices
    return int((top == y[:, None]).any(-1).sum()) / len(y)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-classifier")
    dense = _vit_folder(root / "vit")
    _image_folder(root / "images")
    return root, dense


def test_loading_calibrating_quantizing_and_evaluating(setup):
    root, dense = setup
    model = sk.load(root / "vit")
    assert model_info(model)["kind"] == "image-classifier"
    calib = task_of(model).calibration(model, str(root / "images"))
    batches = list(calib)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(3 * PER_CLASS, 3, 16, 16)]
    x, y = _by_hand(root / "images")
    # Calibration draws a seeded permutation: the same images, in some order.
    got = batches[0]["pixel_values"]
    assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(map(tuple, x.flatten(1).tolist()))

    sk.quantize_(model, sk.DynamicQuant(), data=calib)
    assert sum(type(m).__name__ == "QuantLinear" for m in model.modules()) == 2 * 6 + 1  # q k v o, fc1 fc2; head
    report = sk.evaluate(model, baseline=str(root / "vit"), data=str(root / "images"),
                         metrics=("size", "params", "accuracy"))
    assert report.baseline.quality == {"accuracy": _accuracy(dense, x, y), "top5_accuracy": 1.0}
    assert report.compressed.quality["accuracy"] == _accuracy(model, x, y)
    assert report.compressed.quality["top5_accuracy"] == 1.0  # 3 classes: any top-5 holds the label
    # The reference is not trivial: the labels follow label2id; the sorted folder order would score far lower.
    sorted_order = torch.tensor([sorted(LABELS).index(LABELS[i]) for i in y])
    assert _accuracy(dense, x, y) >= 0.6 and _accuracy(dense, x, sorted_order) <= 0.4


def test_cli_eval_prints_accuracy(setup):
    root, dense = setup
    x, y = _by_hand(root / "images")
    out = subprocess.run([sys.executable, "-m", "slimkit.cli", "eval", str(root / "vit"), "--data",
                          str(root / "images"), "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout)
    assert figures["kind"] == "image-classifier"
    assert figures["quality"]["accuracy"] == pytest.approx(_accuracy(dense, x, y))


def test_onnx_export_takes_pixel_values(setup, tmp_path):
    from slimkit.export.onnx import ort_session, run_onnx

    root, _ = setup
    model = sk.load(root / "vit")
    sk.quantize_(model, sk.DynamicQuant())
    result = sk.export_onnx(model, tmp_path / "vit.onnx", check=True)  # check: ORT vs torch at batch 3
    session = ort_session(result.path)
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    x, _ = _by_hand(root / "images")
    got = run_onnx(session, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        ref = model(pixel_values=x).logits.numpy()
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max() + 1e-4


def test_images_are_normalized_as_the_models_image_processor_does(tmp_path):
    from transformers import ViTImageProcessor

    folder = tmp_path / "vit"
    _vit_folder(folder)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2, 0.4, 0.6],
                                  image_std=[0.5, 0.25, 0.125])
    processor.save_pretrained(folder)
    _image_folder(tmp_path / "images", size=(16, 16))  # already 16x16: only rescale and normalize apply
    model = sk.load(folder)
    pixels = task_of(model).eval_data(model, str(tmp_path / "images")).inputs
    files = [f for name in sorted(LABELS) for f in sorted((tmp_path / "images" / name).iterdir())]
    expected = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)
    sk.save(model, tmp_path / "ck")  # recorded with the model: the checkpoint keeps them
    assert model_info(sk.load(tmp_path / "ck"))["defaults"]["image_std"] == [0.5, 0.25, 0.125]


def test_class_folders_partly_named_after_labels_are_refused(setup, tmp_path):
    root, _ = setup
    model = sk.load(root / "vit")
    _image_folder(tmp_path / "images", size=(16, 16))
    (tmp_path / "images" / "owl").rename(tmp_path / "images" / "bird")
    with pytest.raises(DataError, match="'bird' are not labels of this model"):
        task_of(model).eval_data(model, str(tmp_path / "images"))
