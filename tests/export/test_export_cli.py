"""`slimkit export onnx`: writes the file, reports size, ops and the ORT-vs-PyTorch difference."""

from __future__ import annotations

import json
import shutil

import torch

from slimkit.export.onnx import op_counts
from tests.test_cli import slimkit_cli


def test_export_onnx_of_a_model_folder(tiny_lm_dir, tmp_path):
    folder = tmp_path / "lm"
    shutil.copytree(tiny_lm_dir, folder)  # the default output goes into the folder: keep the shared fixture clean
    r = slimkit_cli("export", "onnx", folder, "--quiet")
    assert r.returncode == 0, r.stderr
    out = folder / "model.onnx"
    assert out.is_file()
    assert f"wrote {out} ({out.stat().st_size:,} bytes)" in r.stdout
    diff_line = next(line for line in r.stdout.splitlines() if line.startswith("max abs diff vs PyTorch:"))
    assert float(diff_line.split(":")[1]) < 1e-4
    assert "MatMul" in r.stdout


def test_export_onnx_json_of_a_quantized_checkpoint(tmp_path):
    """A saved slimkit checkpoint (digits-cnn with static int8 convs) exports to a QDQ graph ORT runs in int8."""
    import slimkit
    from slimkit.core.targets import set_submodule
    from slimkit.quantization.modules import QuantConv2d, QuantLinear
    from slimkit.quantization.primitives import tensor_qparams

    model = slimkit.load("digits-cnn")
    x = torch.rand(16, 1, 8, 8)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
             for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name in seen:
        layer = model.get_submodule(name)
        make = QuantConv2d.from_conv if isinstance(layer, torch.nn.Conv2d) else QuantLinear.from_linear
        q = make(layer, 8, act_mode="static")
        q.set_input_qparams(*tensor_qparams(seen[name], 8, symmetric=False))
        set_submodule(model, name, q)
    slimkit.save(model, tmp_path / "ckpt")
    out = tmp_path / "exports" / "digits.onnx"
    r = slimkit_cli("export", "onnx", tmp_path / "ckpt", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["path"] == str(out) and got["size_bytes"] == out.stat().st_size
    assert got["ops"] == op_counts(out) and got["ops"]["QuantizeLinear"] == 4
    assert got["ort_ops"]["MatMulIntegerToFloat"] == 1  # the classifier; convs stay DQ + float Conv
    assert got["max_abs_diff"] >= 0.0  # the check ran (and passed: the exit code is 0)
    assert any(n.startswith("features.0: QuantConv2d W8") for n in got["notes"])


def test_export_onnx_missing_folder_exits_2(tmp_path):
    r = slimkit_cli("export", "onnx", tmp_path / "nope", "--out", tmp_path / "x.onnx")
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x.onnx").exists()
