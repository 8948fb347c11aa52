"""Users' own nn.Modules through the public API: a residual CNN, a small ViT and an LSTM language model.

Each model gets a ``GenericTask`` (example inputs, calibration batches, evaluation data and a
metric callback of the user's), then goes through the verbs, ``save`` / ``load(skeleton=...)``,
``export_onnx`` and ``evaluate``. Compressed outputs are checked against references built here
from torch layers: the float model with each slimkit layer replaced by a plain ``nn.Linear`` /
``nn.Conv2d`` holding its dequantized (or multiplied-out) weight, preceded by its input grid
when it quantizes its input (``float_reference``); pruning against masks and channel choices
computed here from the dense weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import NothingCompressedError
from slimkit.core.registry import Context
from slimkit.export.onnx import check_onnx
from slimkit.factorization.conv import TuckerConv2d
from slimkit.factorization.svd import FactorizedLinear
from slimkit.quantization.modules import QuantConv2d, QuantLinear
from slimkit.tasks import GenericTask, set_task

pytest.importorskip("onnxruntime")


# -- the users' models ------------------------------------------------------------------------
class Block(nn.Module):
    """Conv-BN-ReLU, Conv-BN, plus the input (a residual add), ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """Stem conv, two residual blocks, global average pool, Linear head; BatchNorms with distinct random
    statistics (so channels can be told apart and folding changes something)."""

    def __init__(self, c: int = 16, classes: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block1, self.block2 = Block(c), Block(c)
        self.head = nn.Linear(c, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2 / m.weight[0].numel()) ** 0.5
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = torch.rand(c, generator=gen) + 0.5
                m.bias.data = torch.randn(c, generator=gen) * 0.1
                m.running_mean = torch.randn(c, generator=gen) * 0.1
                m.running_var = torch.rand(c, generator=gen) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class ViT(nn.Module):
    """Patch-embedding Conv2d, a class token, nn.TransformerEncoder (batch_first), LayerNorm, Linear head."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        # x.shape[0], not len(x): len() bakes the export example's batch size into the ONNX graph
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


class LSTMLanguageModel(nn.Module):
    """Embedding, 2-layer LSTM, Linear over the vocabulary: most weights are in the LSTM."""

    def __init__(self, vocab: int = 64, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.embed(ids))[0])


# -- helpers ----------------------------------------------------------------------------------
def top1(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """The users' metric: top-1 agreement with the labels (per position for a language model)."""
    x, y = data
    return {"top1": float((model(x).argmax(-1) == y).double().mean())}


def with_task(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with a GenericTask over ``x`` / ``y`` (example: two rows; calibration: 16 a batch)."""
    return set_task(model.eval(), GenericTask(example_inputs=x[:2], calibration=CalibrationData.from_tensors(
        x, batch_size=16), eval_data=(x, y), metric=top1))


def float_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose slimkit layers are plain torch layers with the dense weight they stand for
    (dequantized codes, multiplied-out factors), each after its input grid when the layer quantizes its input."""
    ref = copy.deepcopy(model)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, (QuantLinear, FactorizedLinear)):
            w = layer.dense_weight().detach()
            twin = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
            bias = layer.bias
        elif isinstance(layer, QuantConv2d):
            w, bias = layer.dense_weight().detach(), layer.bias
            twin = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, layer.groups, bias=bias is not None)
        elif isinstance(layer, TuckerConv2d):
            g, w, bias = layer.conv_spec, layer.dense_weight().detach(), layer.last.bias
            twin = nn.Conv2d(g["in_channels"], g["out_channels"], g["kernel_size"], g["stride"], g["padding"],
                             g["dilation"], bias=g["bias"])
        else:
            continue
        twin.weight.data = w.clone()
        if bias is not None:
            twin.bias.data = bias.detach().clone()
        if getattr(layer, "act_mode", None) is not None:
            twin.register_forward_pre_hook(lambda _m, args, q=layer: (q.quantize_input(args[0]),))
        ref.set_submodule(name, twin.eval())
    return ref


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_saved_and_exported(model: nn.Module, skeleton: nn.Module, x: torch.Tensor, tmp_path) -> float:
    """save -> load(skeleton) gives the same outputs; export_onnx with a 2-row example, then ORT at another
    batch size (the axis is dynamic) within check_onnx's tolerance. Returns ORT's max difference."""
    sk.save(model, tmp_path / "ck")
    reloaded = sk.load(tmp_path / "ck", skeleton=skeleton)
    assert torch.equal(outputs(reloaded, x), outputs(model, x))
    result = sk.export_onnx(model, tmp_path / "model.onnx", example=x[:2])
    return check_onnx(model, result.path, x[:5])


def assert_evaluated(model: nn.Module, dense: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """evaluate(model, baseline=dense): the user's metric, as computed here, for both models."""
    report = sk.evaluate(model, baseline=dense, metrics=("size", "params", "accuracy"))
    assert report.baseline.quality == top1(lambda t: outputs(dense, t), (x, y))
    assert report.compressed.quality == top1(lambda t: outputs(model, t), (x, y))
    assert report.compressed.size_bytes < report.baseline.size_bytes


# -- the residual CNN ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    dense = ResNet()
    y = outputs(dense, x).argmax(-1)
    y[::4] = (y[::4] + 1) % 5  # the float model scores 0.75: a metric that can move
    return with_task(dense, x, y), x, y


def test_cnn_static_int8_covers_every_conv(cnn, tmp_path):
    dense, x, y = cnn
    model = sk.quantize_(copy.deepcopy(dense), sk.StaticQuant(), data=CalibrationData.from_tensors(x, batch_size=16))
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 5 and all(m.act_mode == "static" for m in convs)
    assert isinstance(model.head, QuantLinear)
    # BatchNorm folded into the convs; each conv reads its input on a uint8 grid.
    torch.testing.assert_close(outputs(model, x), outputs(float_reference(model), x), atol=1e-5, rtol=0)
    assert (outputs(model, x) - outputs(dense, x)).abs().max() < 0.05 * outputs(dense, x).abs().max()
    assert_saved_and_exported(model, ResNet(), x, tmp_path)
    assert_evaluated(model, dense, x, y)


def test_cnn_magnitude_zeroes_the_smallest_half_of_each_layer(cnn, tmp_path):
    dense, x, _ = cnn
    model = sk.prune_(copy.deepcopy(dense), sk.Magnitude(sparsity=0.5))
    ref = copy.deepcopy(dense)
    for name, layer in ref.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            w = layer.weight.data
            keep = w.abs().flatten().argsort(descending=True)[: w.numel() - round(0.5 * w.numel())]
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[keep] = True
            layer.weight.data = w * mask.view_as(w)
            assert torch.equal(model.get_submodule(name).weight != 0, mask.view_as(w)), name
    torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-6, rtol=0)
    diff = assert_saved_and_exported(model, ResNet(), x, tmp_path)
    assert diff < 1e-4


def test_cnn_structured_pruning_keeps_the_residual_channels_coupled(cnn, tmp_path):
    dense, x, _ = cnn
    model = sk.prune_(copy.deepcopy(dense), sk.StructuredPrune(ratio=0.5))

    def kept(bn_name: str) -> list[int]:
        """Which dense channels a pruned BatchNorm kept, found by its (distinct, random) biases."""
        ours, theirs = model.get_submodule(bn_name).bias.detach(), dense.get_submodule(bn_name).bias.detach()
        return [int((theirs == b).nonzero()) for b in ours]

    residual = kept("bn")
    assert len(residual) == 8
    assert kept("block1.bn2") == residual and kept("block2.bn2") == residual  # the adds tie them together
    assert model.head.in_features == 8 and model.block1.conv1.in_channels == 8
    # The dense model with every removed channel's BatchNorm zeroed computes exactly the pruned model.
    ref = copy.deepcopy(dense)
    for bn_name, keep in [("bn", residual), ("block1.bn2", residual), ("block2.bn2", residual),
                          ("block1.bn1", kept("block1.bn1")), ("block2.bn1", kept("block2.bn1"))]:
        drop = [c for c in range(16) if c not in keep]
        assert len(drop) == 8
        ref.get_submodule(bn_name).weight.data[drop] = 0
        ref.get_submodule(bn_name).bias.data[drop] = 0
    torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-5, rtol=0)
    diff = assert_saved_and_exported(model, ResNet(), x, tmp_path)  # load resizes the full-width skeleton
    assert diff < 1e-4


def test_cnn_tucker_computes_the_multiplied_out_kernels(cnn, tmp_path):
    dense, x, _ = cnn
    model = sk.factorize_(copy.deepcopy(dense), sk.Tucker(rank_ratio=0.5))
    assert sum(isinstance(m, TuckerConv2d) for m in model.modules()) == 4  # the 3-channel stem is too thin
    torch.testing.assert_close(outputs(model, x), outputs(float_reference(model), x), atol=1e-5, rtol=0)
    sk.save(model, tmp_path / "ck")
    torch.testing.assert_close(outputs(sk.load(tmp_path / "ck", skeleton=ResNet()), x), outputs(model, x),
                               atol=0, rtol=0)


def test_rtn_refuses_a_cnn_and_names_conv2d_unless_partial_is_allowed(cnn):
    dense, x, _ = cnn
    with pytest.raises(NothingCompressedError, match=r"left unchanged: Conv2d \(9,648 weights\).*allow_partial"):
        sk.quantize_(copy.deepcopy(dense), sk.RTN(bits=8))
    ctx = Context(allow_partial=True)
    model = sk.quantize_(copy.deepcopy(dense), sk.RTN(bits=8), ctx=ctx)
    assert isinstance(model.head, QuantLinear) and isinstance(model.stem, nn.Conv2d)
    assert any("allowed by allow_partial" in note and "Conv2d" in note for note in ctx.notes)
    torch.testing.assert_close(outputs(model, x), outputs(float_reference(model), x), atol=1e-6, rtol=0)


# -- the ViT ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(3))
    return with_task(ViT(), x, y), x, y


@pytest.mark.parametrize("config", [sk.RTN(bits=8), sk.DynamicQuant(), sk.StaticQuant(), sk.SVD(rank_ratio=0.5)],
                         ids=["rtn", "dynamic", "static", "svd"])
def test_vit_runs_its_compressed_layers_inside_torch_transformer_layers(vit, config, tmp_path):
    dense, x, _ = vit
    model = sk.apply(copy.deepcopy(dense), config, data=CalibrationData.from_tensors(x, batch_size=16))
    layer = model.encoder.layers[0]
    assert type(layer.linear1).__name__ == ("FactorizedLinear" if isinstance(config, sk.SVD) else "QuantLinear")
    ref = float_reference(model)
    # torch's fused encoder path reads .weight instead of calling the layer: weight-only and factorized layers
    # must still compute their dense weight there, and input-quantizing ones must be called (not bypassed).
    torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-5, rtol=0)
    with torch.enable_grad():  # the unfused path (gradients on) computes the same
        torch.testing.assert_close(model(x).detach(), outputs(ref, x), atol=1e-5, rtol=0)
    if getattr(layer.linear1, "act_mode", None):
        # the input grids matter: the reference without them is measurably different
        plain = float_reference(model)
        for m in plain.modules():
            m._forward_pre_hooks.clear()
        assert (outputs(plain, x) - outputs(ref, x)).abs().max() > 1e-4
    diff = assert_saved_and_exported(model, ViT(), x, tmp_path)
    if isinstance(config, (sk.RTN, sk.SVD)):
        assert diff < 1e-4


def test_vit_evaluates_with_the_users_metric(vit):
    dense, x, y = vit
    model = sk.quantize_(copy.deepcopy(dense), sk.DynamicQuant())
    assert_evaluated(model, dense, x, y)


# -- the LSTM language model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lstm():
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)  # next token
    return with_task(LSTMLanguageModel(), ids, labels), ids, labels


@pytest.mark.parametrize("config", [sk.RTN(bits=8), sk.DynamicQuant()], ids=["rtn", "dynamic"])
def test_lstm_is_refused_by_linear_only_quantization_with_a_clear_message(lstm, config):
    dense, _, _ = lstm
    with pytest.raises(NothingCompressedError) as refused:
        sk.quantize_(copy.deepcopy(dense), config)
    message = str(refused.value)
    assert f"{type(config).__name__} changed 4,096 of the 61,440 weights it was asked to cover (6.7%)" in message
    assert "left unchanged: LSTM (57,344 weights)" in message and "allow_partial" in message


def test_lstm_with_partial_dynamic_quantization_saves_exports_and_evaluates(lstm, tmp_path):
    dense, ids, labels = lstm
    ctx = Context(allow_partial=True)
    model = sk.quantize_(copy.deepcopy(dense), sk.DynamicQuant(), ctx=ctx)
    assert isinstance(model.out, QuantLinear) and isinstance(model.lstm, nn.LSTM)
    assert any("LSTM" in note and "allowed by allow_partial" in note for note in ctx.notes)
    torch.testing.assert_close(outputs(model, ids), outputs(float_reference(model), ids), atol=1e-5, rtol=0)
    assert_saved_and_exported(model, LSTMLanguageModel(), ids, tmp_path)
    assert_evaluated(model, dense, ids, labels)
