"""Quantization-aware training: the PTQ config reused in two steps, prepare and convert (as torchao's qat/api.py).

```python
base = sk.RTN(bits=4)                                  # or sk.StaticQuant(bits=4) to also quantize inputs
sk.quantize_(model, sk.QAT(base=base, step="prepare"))  # fold BN, swap in fake-quantized layers
model.train(); opt = torch.optim.Adam(model.parameters(), 1e-4)
for x, y in loader: ...                                 # the user's own training loop
sk.quantize_(model, sk.QAT(base=base, step="convert"))  # the same layers PTQ would produce
```

prepare
    Folds BatchNorm into the convs once, with eval-mode statistics (``fold.py``): the
    simple "fold, then fine-tune" scheme, so BN is *gone* during QAT and the folded weight
    and bias train directly. Each selected Linear-like layer (``core.linear_like``:
    nn.Linear, FalconLinear, GPT-2's Conv1D) / nn.Conv2d (the base's include, ignore and
    per-layer bits) becomes a ``QATLinear`` / ``QATConv2d``: the float weight stays the
    trainable Parameter (the very same Parameter object for a Linear; a transposed copy
    for a Conv1D) and the forward uses its fake-quantized copy, per output channel (per group of input columns
    for a Linear with ``group_size``), at the base's bits (16/8/4/2/1; 1 = binary
    sign × mean|w|). Fixed scales follow the min/max of the current weights on every step
    (STE gradient); ``learnable_scales`` makes them LSQ step sizes, nn.Parameters that
    ``model.parameters()`` hands to the optimizer, starting at the PTQ grid. With a
    ``StaticQuant`` base the layer inputs are fake-quantized too: per tensor, range from a
    moving average of each training batch's min/max (torch.ao's default for QAT),
    initialised from the base's ``act_observer`` on calibration data when the step gets
    some, else from the first training batch; ``freeze_observers_after`` stops the updates
    (the moving average drifts towards the batches' min/max, so a clipping observer such
    as "percentile" or "kl" shapes only the start). With ``learnable_scales`` the input
    step size is learned too, and the range only initialises it.

convert
    Replaces every QAT layer by exactly what the base's PTQ produces: ``QuantLinear`` /
    ``QuantConv2d`` (weight-only for RTN, ``act_mode="static"`` for StaticQuant) whose
    codes are built from the *trained* grid (the quantizer's scale and zero point, not a
    fresh min/max), and whose input scale/zero are the input quantizer's. In eval mode the
    converted model computes what the prepared model computed (same codes).

With an RTN base, QAT covers Conv2d layers too (weight-only ``QuantConv2d``): RTN itself
targets Linear layers of LLMs, QAT mostly CNNs. ``QATTrain`` is a small built-in training
step for recipes (label-free distillation from the float model on the recipe's data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.linear_like import (
    LinearLike,
    bypassed_forward,
    linear_kind,
    linear_shape,
)
from slimkit.core.registry import Context, register
from slimkit.core.targets import select_modules, set_submodule, value_for
from slimkit.quantization.fake_quant import FakeQuantizer
from slimkit.quantization.fold import (
    fold_batchnorm,  # also registers FoldedBatchNorm for slimkit.load
)
from slimkit.quantization.modules import QuantConv2d, QuantLinear
from slimkit.quantization.primitives import QuantizedWeight, quantize, split_groups
from slimkit.quantization.ptq import calibrate_inputs, skip_reason

STEPS = ("prepare", "convert")


# --- config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAT(Config):
    """Quantization-aware training in two steps around the user's training loop.

    base: the PTQ config whose result QAT trains for: ``RTN`` (weights only) or
    ``StaticQuant`` (weights and layer inputs); a mapping ``{"type": "RTN", "bits": 4}``
    is accepted (recipes). Its bits (per-layer maps too), group_size, symmetric, include
    and ignore choose the layers and grids. step: "prepare" (fake-quantize) or "convert"
    (to real quantized layers); both steps take the same base. learnable_scales: LSQ
    step sizes (weights and inputs) trained with the weights. fold_bn: fold BatchNorm into
    the preceding convs before preparing. freeze_observers_after: stop updating input
    ranges after this many training batches (None: never).
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True

    base: Any = None
    step: str = "prepare"
    learnable_scales: bool = False
    fold_bn: bool = True
    freeze_observers_after: int | None = None

    def validate(self) -> None:
        """Build the base from a mapping, check it is a supported type, check the flags."""
        base = self.base
        if isinstance(base, dict):
            try:
                base = Config.from_dict(base)
            except ConfigError as exc:
                self.fail("base", str(exc))
            object.__setattr__(self, "base", base)
        if not isinstance(base, Config):
            self.fail("base", f"must be a quantization config such as RTN(bits=4) or {{type: RTN, bits: 4}}, got {base!r}")
        name = type(base).__name__
        if not base.qat_base:
            from slimkit.core.registry import config_types

            bases = sorted(n for n, cls in config_types().items() if cls.qat_base)
            self.fail("base", f"QAT trains for {' or '.join(bases)} (weights-only or static), not {name}")
        if getattr(base, "embeddings", False):
            self.fail("base", "QAT does not fake-quantize Embedding tables: set embeddings: false in the base "
                              "(quantize them afterwards with RTN(embeddings=True, include=[...]))")
        if getattr(base, "tolerance", None) is not None:
            self.fail("base", "the accuracy fallback (tolerance) is a PTQ search; QAT trains instead: leave it unset")
        # StaticQuant options QAT's fake-quant layers do not model: refuse rather than silently drop them.
        for option, off in (("smooth_alpha", None), ("attention", False), ("reduce_range", False)):
            if getattr(base, option, off) != off:
                self.fail("base", f"QAT does not support {option}={getattr(base, option)!r} in the base; "
                                  f"leave it at {off!r} (apply it with PTQ instead)")
        if self.step not in STEPS:
            self.fail("step", f"must be 'prepare' or 'convert', got {self.step!r}")
        for flag in ("learnable_scales", "fold_bn"):
            if not isinstance(getattr(self, flag), bool):
                self.fail(flag, f"must be true or false, got {getattr(self, flag)!r}")
        n = self.freeze_observers_after
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            self.fail("freeze_observers_after", f"must be a positive number of training batches or None, got {n!r}")


@dataclass(frozen=True)
class QATTrain(Config):
    """A short QAT fine-tune for recipes, between ``QAT(step="prepare")`` and ``QAT(step="convert")``.

    Label-free: the recipe's data carries inputs only, so the prepared model is trained to
    match the float model's outputs (KL divergence at ``temperature``, Hinton et al. 2015),
    the float outputs computed once, before training, with fake quantization switched off.
    Adam with ``lr`` (and ``weight_decay``) for ``steps`` batches, cycling through the data
    in a seeded order. In your own code, write the loop yourself (with labels if you have them).
    """

    family: ClassVar[str] = "quantize"
    needs_data: ClassVar[bool] = True

    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    temperature: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        """Check the step count and the positive numbers."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            self.fail("steps", f"must be a positive integer, got {self.steps!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                self.fail(name, f"must be a positive number, got {v!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
            self.fail("weight_decay", f"must be a non-negative number, got {wd!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            self.fail("seed", f"must be an integer, got {self.seed!r}")


# --- fake-quantized layers ----------------------------------------------------------------


class _QATMixin:
    """Weight (and optional input) fake quantization shared by QATLinear and QATConv2d."""

    weight: nn.Parameter

    def _init_qat(self, bits: int, group_size: int | None, symmetric: bool, learnable: bool,
                  act_bits: int | None, act_symmetric: bool, freeze_after: int | None) -> None:
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        n_groups, _ = split_groups(cols, group_size)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.act_bits, self.act_symmetric = act_bits, act_symmetric
        # The weight is quantized as a (rows·n_groups, group) matrix: one scale per row of it.
        self.weight_quant = FakeQuantizer(bits, symmetric, axis=0, learnable=learnable, observer="current",
                                          channels=rows * n_groups)
        if learnable:
            self.weight_quant.initialize(self.weight_rows().detach())
        self.input_quant = None
        if act_bits is not None:
            self.input_quant = FakeQuantizer(act_bits, act_symmetric, None, learnable=learnable,
                                             observer="moving_average", freeze_after=freeze_after)

    def weight_rows(self) -> torch.Tensor:
        """The weight as (rows·n_groups, group size): one quantization scale per row."""
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        n_groups, gs = split_groups(cols, self.group_size)
        return self.weight.reshape(rows * n_groups, gs)

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight, in the weight's shape (gradients flow to the float weight)."""
        return self.weight_quant(self.weight_rows()).reshape(self.weight.shape)

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """Codes and scales of the weight on the quantizer's current grid, as a 2-D (rows, cols) QuantizedWeight."""
        w = self.weight_rows().detach().float()
        scale, zero = self.weight_quant.qparams(w)  # (rows·n_groups,) each
        s = scale.reshape(-1, 1)
        z = None if self.symmetric else zero.reshape(-1, 1)
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        n_groups, _ = split_groups(cols, self.group_size)
        q = quantize(w, s, z, self.bits, self.symmetric).reshape(rows, cols)
        zp = None if self.symmetric else zero.reshape(rows, n_groups).to(torch.uint8 if self.bits <= 8 else torch.int32)
        return QuantizedWeight(q=q, scale=scale.reshape(rows, n_groups).float().contiguous(), zero=zp,
                               bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def _act_kwargs(self) -> dict[str, Any]:
        if self.input_quant is None:
            return {"act_mode": None}
        return {"act_mode": "static", "act_bits": self.act_bits, "act_symmetric": self.act_symmetric}

    def _finish(self, new: nn.Module) -> nn.Module:
        if self.input_quant is not None:
            new.set_input_qparams(*self.input_quant.qparams())
        new.train(self.training)
        return new

    def _qat_repr(self) -> str:
        act = "" if self.input_quant is None else f", act=int{self.act_bits}"
        return f", bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}{act}"


class QATLinear(_QATMixin, nn.Linear):
    """An nn.Linear trained through fake quantization; ``to_quantized()`` gives the QuantLinear PTQ would build."""

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int | None = None, symmetric: bool = True, *,
                    learnable: bool = False, act_bits: int | None = None, act_symmetric: bool = False,
                    freeze_after: int | None = None) -> QATLinear:
        """Wrap a Linear-like ``linear``, sharing its weight and bias; ``act_bits`` None leaves the input float.

        A transformers Conv1D stores its weight (in, out): the QATLinear trains a transposed
        copy (a new Parameter; build the optimizer after prepare), and shares the bias.
        """
        out_f, in_f = linear_shape(linear)
        mod = cls(in_f, out_f, bias=linear.bias is not None, device="meta")
        if linear_kind(linear) == "conv1d":
            w = linear.weight
            mod.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        else:
            mod.weight = linear.weight
        mod.bias = linear.bias
        mod._init_qat(bits, group_size, symmetric, learnable, act_bits, act_symmetric, freeze_after)
        mod.to(linear.weight.device)
        mod.train(linear.training)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.fake_weight(), self.bias)

    def to_quantized(self) -> QuantLinear:
        """The QuantLinear with this layer's trained codes (and input scale)."""
        return self._finish(QuantLinear.from_linear(self, weight=self.quantized_weight(), **self._act_kwargs()))

    def extra_repr(self) -> str:
        return super().extra_repr() + self._qat_repr()


class QATConv2d(_QATMixin, nn.Conv2d):
    """An nn.Conv2d trained through fake quantization, one scale per output channel.

    ``to_quantized()`` gives the QuantConv2d PTQ would build.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int, symmetric: bool = True, *, learnable: bool = False,
                  act_bits: int | None = None, act_symmetric: bool = False,
                  freeze_after: int | None = None) -> QATConv2d:
        """Wrap ``conv``, sharing its weight and bias Parameters."""
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        mod.weight, mod.bias = conv.weight, conv.bias
        mod._init_qat(bits, None, symmetric, learnable, act_bits, act_symmetric, freeze_after)
        mod.to(conv.weight.device)
        mod.train(conv.training)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._conv_forward(x, self.fake_weight(), self.bias)

    def to_quantized(self) -> QuantConv2d:
        """The QuantConv2d with this layer's trained codes (and input scale)."""
        return self._finish(QuantConv2d.from_conv(self, weight=self.quantized_weight(), **self._act_kwargs()))

    def extra_repr(self) -> str:
        return super().extra_repr() + self._qat_repr()


QAT_LAYERS = (QATLinear, QATConv2d)


def qat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of ``model``'s QAT layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every FakeQuantizer of ``model`` on or off (off: the prepared model computes in float)."""
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = enabled


def freeze_observers(model: nn.Module) -> None:
    """Stop every input quantizer of ``model`` from updating its range (e.g. for the last epochs)."""
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.freeze()


# --- prepare / convert --------------------------------------------------------------------


def _check_finite(targets: list[tuple[str, nn.Module]]) -> None:
    for name, module in targets:
        if not torch.isfinite(module.weight.detach()).all():
            raise DataError(f"layer {name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{name!r}])")


def _act_spec(base: Config) -> tuple[int | None, bool]:
    """(input bits or None, input symmetric) of the base: StaticQuant quantizes inputs, RTN does not."""
    if type(base).__name__ == "StaticQuant":
        return base.act_bits, base.act_symmetric
    return None, False


@torch.no_grad()
def _calibrate_input_ranges(model: nn.Module, base: Config, data: Any, names: list[str]) -> dict[str, tuple]:
    """Initial (lo, hi) input ranges from the base's act_observer on ``data``, for each named layer that ran."""
    from slimkit.quantization.observers import make_observer

    def make(name: str):
        return make_observer(base.act_observer, bits=base.act_bits, symmetric=base.act_symmetric,
                             tensor_name=f"input of {name}", **base.act_options)

    was_training = model.training
    model.eval()
    try:
        observers = calibrate_inputs(model, data, names, make)
    finally:
        model.train(was_training)
    # The observer's clipping range: set_range turns it into the very (scale, zero) PTQ would use.
    return {name: obs.range() for name, obs in observers.items() if obs.batches > 0}


def _prepare(model: nn.Module, config: QAT, ctx: Context) -> None:
    base = config.base
    if qat_layers(model):
        raise ConfigError("the model is already prepared for QAT: train it, then run QAT(step='convert')")
    types = (LinearLike, nn.Conv2d)
    _check_finite(select_modules(model, types, base.include, base.ignore))  # before anything changes
    if config.fold_bn:
        folded = fold_batchnorm(model)
        if folded:
            ctx.note(f"QAT: folded {len(folded)} BatchNorm layer(s) into their convs (eval statistics); "
                     "BatchNorm is gone during training")
    group_size = getattr(base, "group_size", None)
    targets = []
    for name, module in select_modules(model, types, base.include, base.ignore):
        reason = skip_reason(module, group_size)
        if reason is None and linear_kind(module) is not None:
            reason = bypassed_forward(model, name)  # its fake quantization would never run
        if reason:
            ctx.note(f"QAT: skipped {name}: {reason}")
        else:
            targets.append((name, module))
    _check_finite(targets)  # folded weights
    act_bits, act_symmetric = _act_spec(base)
    observer = getattr(base, "weight_observer", "minmax")
    if observer != "minmax":
        ctx.note(f"QAT: weight ranges follow the min/max of the current weights on every step "
                 f"(weight_observer {observer!r} applies to PTQ only)")
    ranges: dict[str, tuple] = {}
    if act_bits is not None and ctx.data is not None and targets:
        ranges = _calibrate_input_ranges(model, base, ctx.data, [n for n, _ in targets])

    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    n_linear = n_conv = 0
    for i, (name, module) in enumerate(targets):
        bits = value_for(name, base.bits)
        common = {"learnable": config.learnable_scales, "act_bits": act_bits, "act_symmetric": act_symmetric,
                  "freeze_after": config.freeze_observers_after}
        if linear_kind(module) is not None:
            new = QATLinear.from_linear(module, bits, group_size, base.symmetric, **common)
            n_linear += 1
        else:
            new = QATConv2d.from_conv(module, bits, base.symmetric, **common)
            n_conv += 1
        if name in ranges:
            new.input_quant.set_range(*ranges[name])
        for path in paths[id(module)]:
            set_submodule(model, path, new)
        if ctx.progress is not None:
            ctx.progress(f"QAT prepare: {name}", (i + 1) / len(targets))

    scales = "learnable (LSQ)" if config.learnable_scales else "min/max of the current weights (STE)"
    inputs = "weights only"
    if act_bits is not None:
        start = (f"initialised from {base.act_observer} on the calibration data" if ranges
                 else "initialised from the first training batch")
        inputs = f"inputs int{act_bits} per tensor, moving-average range {start}"
    ctx.note(f"QAT prepare: {n_linear} Linear and {n_conv} Conv2d layer(s) fake-quantized at "
             f"{_bits_text(base.bits)} per output channel ({scales}; {inputs}); train with model.train(), "
             "an optimizer over model.parameters(), then QAT(step='convert')")


def _convert(model: nn.Module, config: QAT, ctx: Context) -> None:
    base = config.base
    layers = qat_layers(model)
    if not layers:
        raise UnsupportedError("QAT convert: the model has no QAT layers; run QAT(step='prepare') first, "
                               "train, then convert with the same base config")
    act_bits, act_symmetric = _act_spec(base)
    for name, m in layers:
        want = (value_for(name, base.bits), getattr(base, "group_size", None) if isinstance(m, QATLinear) else None,
                base.symmetric, act_bits)
        have = (m.bits, m.group_size, m.symmetric, m.act_bits)
        if want != have:
            raise ConfigError(f"QAT convert: layer {name!r} was prepared with (bits, group_size, symmetric, act_bits) "
                              f"= {have} but the convert config's base gives {want}; convert with the prepare base")
    _check_finite(layers)
    for name, m in layers:
        if m.input_quant is not None and not m.input_quant.initialized:
            raise DataError(f"QAT convert: layer {name!r} never saw an input in training mode, so its input range "
                            "is unknown; run training forwards (model.train()) or prepare with calibration data")
    new = {name: m.to_quantized() for name, m in layers}  # build all first: a failure changes nothing
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    for i, (name, m) in enumerate(layers):
        for path in paths[id(m)]:
            set_submodule(model, path, new[name])
        if ctx.progress is not None:
            ctx.progress(f"QAT convert: {name}", (i + 1) / len(layers))
    kinds = "QuantLinear/QuantConv2d" + (" with static inputs" if act_bits is not None else " (weights only)")
    ctx.note(f"QAT convert: {len(layers)} layer(s) to {kinds} at {_bits_text(base.bits)}, codes on the trained grid")


def _bits_text(bits: int | dict) -> str:
    if isinstance(bits, dict):
        return "bits " + ", ".join(f"{k}: {v}" for k, v in bits.items())
    return f"int{bits}"


@register(QAT)
def apply_qat(model: nn.Module, config: QAT, ctx: Context) -> None:
    """Prepare ``model`` for QAT or convert a prepared one, in place (see the module docstring)."""
    if config.step == "prepare":
        _prepare(model, config, ctx)
    else:
        _convert(model, config, ctx)


# --- the built-in training step -----------------------------------------------------------


def _logits(out: Any) -> torch.Tensor:
    """The tensor a model's quality rests on: ``.logits``, the first element of a tuple, or the output."""
    value = getattr(out, "logits", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(out, (tuple, list)):
        return out[0]
    if not isinstance(out, torch.Tensor):
        raise UnsupportedError(f"QATTrain needs a model that returns a tensor or .logits, got {type(out).__name__}")
    return out


@register(QATTrain)
def apply_qat_train(model: nn.Module, config: QATTrain, ctx: Context) -> None:
    """Fine-tune a QAT-prepared ``model`` on ``ctx.data`` by distillation from its own float outputs."""
    from slimkit.core.calibration import run_model
    from slimkit.core.kd import kd_loss

    if not qat_layers(model):
        raise UnsupportedError("QATTrain trains a QAT-prepared model: run QAT(step='prepare') before it")
    if ctx.data is None:
        raise DataError("QATTrain needs data (the recipe's calibration section, or data=...) to train on")
    batches = list(ctx.data)
    if not batches:
        raise DataError("QATTrain got no batches to train on")
    was_training = model.training
    T = float(config.temperature)
    model.eval()
    set_fake_quant(model, False)
    try:
        with torch.no_grad():  # the teacher: the float model as prepared, before any step
            targets = [_logits(run_model(model, b)).float() for b in batches]
    finally:
        set_fake_quant(model, True)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    order: list[int] = []
    losses = []
    try:
        for step in range(config.steps):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            i = order.pop()
            # Hinton KD with no labels: T²·KL(softmax(z_float/T) ‖ softmax(z/T)), averaged over rows.
            loss = kd_loss(_logits(run_model(model, batches[i])).float(), targets[i], temperature=T)
            if not torch.isfinite(loss):
                raise DataError(f"QATTrain: the loss became {float(loss)} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if ctx.progress is not None:
                ctx.progress(f"QAT training: loss {losses[-1]:.4f}", (step + 1) / config.steps)
    finally:
        model.train(was_training)
    k = max(1, min(10, len(losses) // 4))
    ctx.note(f"QATTrain: {config.steps} step(s) of Adam (lr {config.lr}) distilling the float outputs on "
             f"{len(batches)} batch(es); KL {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f} "
             f"(mean of the first/last {k})")
