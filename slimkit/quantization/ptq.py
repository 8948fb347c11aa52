"""Post-training quantization of weights *and* activations: dynamic and static (calibrated).

- ``DynamicQuant``: weights int8 (or int16) per output channel, stored; each input
  activation is quantized per batch at run time from its own min/max. No data needed.
- ``StaticQuant``: weights per output channel (bits per layer, observer-chosen ranges);
  the input of every Linear/Conv2d gets one frozen scale/zero point, found by an observer
  (MinMax, moving average, percentile, KL, MSE) over ``CalibrationData``. Optionally an
  accuracy-aware fallback measures each layer's sensitivity (output error with only that
  layer quantized) and returns the most sensitive layers to float, one by one, until the
  model's output error on the calibration data is within ``tolerance``.

Both produce the layers of ``quantization.modules`` (QuantLinear/QuantConv2d with
``act_mode`` "dynamic"/"static"), which the ONNX export turns into real int8 kernels.
``CastPrecision`` keeps chosen layers in float16/bfloat16 (mixed precision).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData, run_model
from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.linear_like import (
    LinearLike,
    bypassed_forward,
    embedding_problem,
    in_features,
    linear_kind,
    linear_problem,
    linear_weight,
)
from slimkit.core.registry import Context, register
from slimkit.core.targets import (
    check_layer_map,
    check_patterns,
    matches,
    select_modules,
    set_submodule,
    subclass_reason,
    tie_notes,
    value_for,
)
from slimkit.quantization.attention import (
    CHILD,
    ROLES,
    QuantAttentionInputs,
    attention_modules,
    unsupported_reason,
    use_quantized_attention,
)
from slimkit.quantization.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quantization.observers import make_observer
from slimkit.quantization.primitives import BITS, QuantizedWeight, quantize_weight
from slimkit.quantization.smoothquant import (
    smooth_scales as smoothing_scale,  # one formula for both smoothing forms
)

WEIGHT_OBSERVERS = ("minmax", "mse", "percentile")


def _check_bits(value: Any, allowed: tuple[int, ...] = BITS) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        return f"bits must be one of {', '.join(map(str, allowed))}, got {value!r}"
    return None


def _check_common(cfg: Config, allowed_bits: tuple[int, ...]) -> None:
    """Validate the fields every PTQ config shares: bits (int or per-layer map), flags, patterns."""
    name = type(cfg).__name__
    if isinstance(cfg.bits, dict):
        check_layer_map(cfg.bits, f"{name}.bits", lambda v: _check_bits(v, allowed_bits))
    else:
        problem = _check_bits(cfg.bits, allowed_bits)
        if problem:
            cfg.fail("bits", problem + ' (or a per-layer map such as {"re:.*mlp.*": 4, "default": 8})')
    for flag in ("symmetric", "embeddings", "reduce_range"):
        if not isinstance(getattr(cfg, flag), bool):
            cfg.fail(flag, f"must be true or false, got {getattr(cfg, flag)!r}")
    cfg.check_name_patterns()


@dataclass(frozen=True)
class DynamicQuant(Config):
    """Dynamic PTQ: int8 (or int16) weights per output channel; inputs quantized per batch at run time.

    bits: 8 or 16 (or a per-layer map). act_bits: 8 (uint8 per-tensor, ORT's
    DynamicQuantizeLinear) or 16. embeddings: also store Embedding tables as int8 per row.
    include / ignore: module name patterns. Only Linear-like layers (nn.Linear, FalconLinear,
    Conv1D: ``core.linear_like``) are quantized dynamically.
    reduce_range: int8 weight codes in [−63, 63] (7 bits of range) — see StaticQuant.
    per_token: False: one uint8 range (with zero point) per input tensor and batch; True:
    one symmetric int8 scale max|x|/127 per token (each row of the input flattened to
    (tokens, in_features)), the W8A8 scheme of SmoothQuant and LLM.int8 — a token with an
    outlier then only coarsens its own row. ONNX export writes per-token inputs as float
    fake-quant ops (exact, but without the int8 MatMulInteger kernel).
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True

    bits: int | dict = 8
    act_bits: int = 8
    symmetric: bool = True
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    embeddings: bool = False
    reduce_range: bool = False
    per_token: bool = False

    @property
    def act_symmetric(self) -> bool:
        """Per-token inputs are symmetric int8 (absmax per row); per-tensor ones uint8 with a zero point."""
        return self.per_token

    def validate(self) -> None:
        """Check bit widths, flags and name patterns."""
        _check_common(self, (8, 16))
        if not isinstance(self.per_token, bool):
            self.fail("per_token", f"must be true or false, got {self.per_token!r}")
        if self.act_bits not in (8, 16) or isinstance(self.act_bits, bool):
            self.fail("act_bits", f"must be 8 or 16, got {self.act_bits!r}")
        if not self.symmetric:
            self.fail("symmetric", "dynamic quantization uses symmetric weights (integer kernels take a zero weight offset)")


@dataclass(frozen=True)
class StaticQuant(Config):
    """Static PTQ: weights per output channel, every Linear/Conv2d input with a frozen calibrated scale.

    bits: weight bits 1/2/4/8/16 or a per-layer map (``{"re:.*classifier.*": 8, "default": 4}``).
    group_size: None (per output channel) or a group of input columns (Linear only).
    symmetric: signed weight codes (zero point 0). weight_observer: "minmax", "mse" or
    "percentile" per output channel. act_bits: 8 or 16; act_symmetric: False gives uint8
    codes with a zero point (what x86 int8 kernels want), True int8 codes.
    act_observer: one of ``observers.OBSERVERS``; act_options: its options (e.g.
    ``{"percentile": 99.99}``). embeddings: store Embedding tables as int8 rows.
    tolerance: when set, layers return to float, most sensitive first, until
    1 − (mean cosine of float vs quantized model outputs on the calibration data) ≤ tolerance.
    smooth_alpha: when set (0 < alpha < 1), SmoothQuant-style migration (Xiao et al. 2022)
    before quantizing the Linear layers matched by ``smooth_include`` (all when empty):
    per input channel s_j = max|X_j|^alpha / max|W_:,j|^(1−alpha) over calibration inputs;
    the weight becomes W·diag(s) and the input is multiplied by 1/s at run time (an explicit
    multiply: in post-LayerNorm encoders such as BERT the norm output also feeds the
    residual, so 1/s cannot be folded into it). Layers that share one input share one s.
    fallback_to: "weight_only" (default) puts a sensitive layer's *input* back in float and
    keeps its int8 weights (per-channel int8 weights cost little accuracy, and the file
    stays small); "float" restores the original float layer.
    max_float_layers: a cap on how many layers the fallback may change.
    attention: also quantize the operands of the two matmuls inside each attention block
    (query and key of Q·Kᵀ, softmax probabilities and value of P·V) to static uint8 per
    tensor, calibrated with ``act_observer`` (transformers models listed in
    ``attention.SUPPORTED_MODEL_TYPES``; ``ignore`` patterns apply to attention module names
    too; the fallback may return a whole block's attention to float).
    reduce_range: 8-bit weight codes limited to [−63, 63]. x86 CPUs without VNNI (AVX2,
    plain AVX-512) multiply uint8 inputs by int8 weights with VPMADDUBSW, whose int16 pair
    sums saturate when |w| > 63 (255·127·2 > 32767): ONNX Runtime's default kernel then
    returns wrong results unless the session sets ``session.x64quantprecision=1``, which
    measured 0.83× fp32 instead of 0.65× on MiniLM on an AVX2 EPYC (``ort_session`` sets it
    only on such CPUs). Reduced-range weights are exact on the fast kernel, at twice the
    weight rounding step; on VNNI/AMX CPUs full-range weights are exact and more accurate.
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True
    qat_base: ClassVar[bool] = True  # QAT can train for its result (weights and static inputs)
    needs_data: ClassVar[bool] = True

    bits: int | dict = 8
    group_size: int | None = None
    symmetric: bool = True
    weight_observer: str = "minmax"
    act_bits: int = 8
    act_symmetric: bool = False
    act_observer: str = "minmax"
    act_options: dict = field(default_factory=dict)
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    embeddings: bool = False
    smooth_alpha: float | None = None
    smooth_include: tuple[str, ...] = ()
    tolerance: float | None = None
    fallback_to: str = "weight_only"
    max_float_layers: int | None = None
    reduce_range: bool = False
    attention: bool = False

    def validate(self) -> None:
        """Check bits, observers, tolerance and patterns; build the observer once to validate its options."""
        _check_common(self, BITS)
        if not isinstance(self.attention, bool):
            self.fail("attention", f"must be true or false, got {self.attention!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 8):
            self.fail("group_size", f"must be None (per output channel) or a positive multiple of 8, got {gs!r}")
        if self.weight_observer not in WEIGHT_OBSERVERS:
            self.fail("weight_observer", f"must be one of {', '.join(WEIGHT_OBSERVERS)}, got {self.weight_observer!r}")
        if gs is not None and self.weight_observer != "minmax":
            self.fail("weight_observer", "group-wise weights use 'minmax' ranges")
        if self.act_bits not in (8, 16) or isinstance(self.act_bits, bool):
            self.fail("act_bits", f"must be 8 or 16, got {self.act_bits!r}")
        if not isinstance(self.act_symmetric, bool):
            self.fail("act_symmetric", f"must be true or false, got {self.act_symmetric!r}")
        if self.attention is True and self.act_bits != 8:
            self.fail("attention", f"attention matmul inputs are quantized to 8 bits; act_bits is {self.act_bits}")
        if not isinstance(self.act_options, dict):
            self.fail("act_options", f"must be a mapping of observer options, got {self.act_options!r}")
        try:
            make_observer(self.act_observer, bits=self.act_bits, symmetric=self.act_symmetric, **self.act_options)
        except ConfigError as exc:
            self.fail("act_observer", str(exc))
        tol = self.tolerance
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
            self.fail("tolerance", f"must be a number in (0, 1) (1 − mean cosine to the float model), got {tol!r}")
        alpha = self.smooth_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1):
            self.fail("smooth_alpha", f"must be a number in (0, 1) or null, got {alpha!r}")
        if not isinstance(self.smooth_include, tuple):
            self.fail("smooth_include", f"must be a list of module name patterns, got {self.smooth_include!r}")
        check_patterns(self.smooth_include, "StaticQuant.smooth_include")
        if self.fallback_to not in ("weight_only", "float"):
            self.fail("fallback_to", f"must be 'weight_only' or 'float', got {self.fallback_to!r}")
        cap = self.max_float_layers
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            self.fail("max_float_layers", f"must be a non-negative integer or None, got {cap!r}")


# --- shared plumbing ----------------------------------------------------------------------


def skip_reason(module: nn.Module, group_size: int | None) -> str | None:
    """Why ``module`` cannot become a quantized (or QAT) layer, or None when it can.

    Linear-like layers (``core.linear_like``: nn.Linear, FalconLinear, Conv1D) and
    embeddings (scaled ones too) are checked by their own rules; a Conv2d must be exactly one.
    """
    if isinstance(module, nn.Embedding):
        problem = embedding_problem(module)
    elif linear_kind(module) is not None:
        problem = linear_problem(module, "a quantized layer")
    elif type(module) is not nn.Conv2d:
        problem = subclass_reason(module, "a quantized layer")
    else:
        problem = None
    if problem:
        return problem
    if module.weight.is_meta:
        return "its weight is on the meta device (not loaded)"
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} / mode {module.padding_mode!r} is not supported (zero padding given as numbers)"
        if group_size is not None:
            return "group-wise scales apply to Linear layers only"
    cols = in_features(module) if linear_kind(module) is not None else module.weight[0].numel()
    if group_size is not None and cols % group_size:
        return f"its {cols} input columns are not divisible by group_size {group_size}"
    return None


def _check_finite_weights(targets: list[tuple[str, nn.Module]]) -> None:
    for name, module in targets:
        if not torch.isfinite(module.weight.detach()).all():
            raise DataError(f"layer {name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{name!r}])")


def _select(model: nn.Module, cfg: Config, types: tuple[type[nn.Module], ...], group_size: int | None,
            ctx: Context) -> list[tuple[str, nn.Module]]:
    """Selected layers that can be quantized; the others are noted with the reason.

    Linear-like layers get their inputs quantized, so one that its parent never calls
    (``out_proj`` of an nn.MultiheadAttention, ``core.linear_like.bypassed_forward``) is skipped.
    """
    kind = type(cfg).__name__
    targets = []
    for name, module in select_modules(model, types, cfg.include, cfg.ignore):
        reason = skip_reason(module, group_size)
        if reason is None and linear_kind(module) is not None:
            reason = bypassed_forward(model, name)
        if reason:
            ctx.note(f"{kind}: skipped {name}: {reason}")
        else:
            targets.append((name, module))
    _check_finite_weights(targets)
    for line in tie_notes(model, targets, kind):
        ctx.note(line)
    return targets


def _paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path at which each module is reachable (a shared module is replaced at all of them)."""
    paths: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(name)
    return paths


def observed_weight(weight: torch.Tensor, bits: int, symmetric: bool, observer: str) -> QuantizedWeight:
    """Per-output-channel quantization of a 2-D weight with the range an observer picks (minmax = plain RTN)."""
    if observer == "minmax" or bits == 1:
        return quantize_weight(weight, bits, symmetric=symmetric)
    obs = make_observer(observer, bits=bits, symmetric=symmetric, axis=0)
    obs.update(weight.detach().float())
    scale, zero = obs.qparams()
    from slimkit.quantization.primitives import quantize

    scale = scale.reshape(-1, 1).float()
    zp = None if symmetric else zero.reshape(-1, 1)
    q = quantize(weight.detach().float(), scale, zp, bits, symmetric)
    return QuantizedWeight(q=q, scale=scale.contiguous(), zero=None if zp is None else zp.to(torch.uint8),
                           bits=bits, group_size=None, symmetric=symmetric)


def _quantized_twin(module: nn.Module, bits: int, cfg: Config, act_mode: str | None,
                    smooth: torch.Tensor | None = None) -> nn.Module:
    """The quantized replacement of one Linear / Conv2d / Embedding.

    ``smooth`` (Linear only): per-input-channel s; the stored weight is W·diag(s) and the
    layer multiplies its input by 1/s.
    """
    symmetric = cfg.symmetric
    if isinstance(module, nn.Embedding):
        return QuantEmbedding.from_embedding(module, 8, None, True)
    group_size = getattr(cfg, "group_size", None)
    observer = getattr(cfg, "weight_observer", "minmax")
    act = {"act_mode": act_mode, "act_bits": cfg.act_bits, "act_symmetric": getattr(cfg, "act_symmetric", False)}
    # reduce_range: quantize on the 7-bit grid, store in the 8-bit container.
    grid_bits = 7 if bits == 8 and getattr(cfg, "reduce_range", False) else bits
    if linear_kind(module) is not None:
        w = linear_weight(module).detach()  # (out, in), a Conv1D's read transposed
        weight = w if smooth is None else w * smooth
        qw = (quantize_weight(weight, grid_bits, group_size=group_size, symmetric=symmetric) if group_size
              else observed_weight(weight, grid_bits, symmetric, observer))
        multiplier = None if smooth is None else 1.0 / smooth
        return QuantLinear.from_linear(module, weight=dataclasses.replace(qw, bits=bits),
                                       input_multiplier=multiplier, **act)
    flat = module.weight.detach().reshape(module.out_channels, -1)  # (out, in/groups·kh·kw)
    qw = dataclasses.replace(observed_weight(flat, grid_bits, symmetric, observer), bits=bits)
    return QuantConv2d.from_conv(module, weight=qw, **act)


# --- dynamic ------------------------------------------------------------------------------


@register(DynamicQuant)
def apply_dynamic(model: nn.Module, config: DynamicQuant, ctx: Context) -> None:
    """Replace the selected Linear layers with int8/int16 weights and per-batch input quantization, in place."""
    types: tuple[type, ...] = (LinearLike, nn.Embedding) if config.embeddings else (LinearLike,)
    targets = _select(model, config, types, None, ctx)
    paths = _paths(model)
    with torch.no_grad():
        for i, (name, module) in enumerate(targets):
            act_mode = None if isinstance(module, nn.Embedding) else "dynamic_token" if config.per_token else "dynamic"
            new = _quantized_twin(module, value_for(name, config.bits), config, act_mode)
            new.train(module.training)
            for path in paths[id(module)]:
                set_submodule(model, path, new)
            if ctx.progress is not None:
                ctx.progress(f"dynamic int8: {name}", (i + 1) / len(targets))
    inputs = "symmetric int8 per token" if config.per_token else "per tensor, per batch"
    ctx.note(f"DynamicQuant: {len(targets)} layer(s) quantized (weights per output channel, inputs {inputs})")


# --- static -------------------------------------------------------------------------------


def _fold_batchnorm(model: nn.Module, ctx: Context) -> None:
    """Fold BatchNorm into the preceding convs (their quantized kernels must carry the BN scale)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    from slimkit.quantization.fold import fold_batchnorm

    folded = fold_batchnorm(model)
    if folded:
        ctx.note(f"StaticQuant: folded {len(folded)} BatchNorm layer(s) into their convs before quantizing")


@torch.no_grad()
def calibrate_inputs(model: nn.Module, data: CalibrationData, names: list[str], make,
                     multipliers: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Run ``data`` through ``model`` once, feeding each named module's input to its own observer.

    ``make(name)`` builds the observer; ``multipliers[name]`` (optional) scales that
    module's input before it is observed (smoothing). Returns name -> observer (a module
    that never ran has an observer with ``batches == 0``).
    """
    observers = {n: make(n) for n in names}
    multipliers = multipliers or {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_module, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                if name in multipliers:
                    x = x * multipliers[name]
                observers[name].update(x)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        for batch in data:
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return observers


@torch.no_grad()
def _smoothing(model: nn.Module, data: CalibrationData, names: list[str], alpha: float) -> dict[str, torch.Tensor]:
    """Per-layer smoothing scales; layers fed the very same input tensor share one scale."""
    absmax: dict[str, torch.Tensor] = {}
    first_input: dict[str, torch.Tensor] = {}  # held (not id()) so no address is reused mid-forward
    handles = []
    for name in names:
        def hook(_module, args, name=name):
            x = args[0].detach()
            first_input.setdefault(name, args[0])
            per_channel = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            absmax[name] = per_channel if name not in absmax else torch.maximum(absmax[name], per_channel)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for batch in data:
            run_model(model, batch)
            break  # one batch is enough to see which layers share an input; the rest only widen maxima
        for h in handles:
            h.remove()
        handles = []
        for name in names:
            def widen(_module, args, name=name):
                per_channel = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
                absmax[name] = torch.maximum(absmax[name], per_channel)

            handles.append(model.get_submodule(name).register_forward_pre_hook(widen))
        for i, batch in enumerate(data):
            if i:
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in names:
        if name in first_input:
            same = [g for g in groups if first_input[g[0]] is first_input[name]]
            if same:
                same[0].append(name)
            else:
                groups.append([name])
    first_input.clear()
    scales = {}
    for members in groups:
        w_absmax = [linear_weight(model.get_submodule(n)).detach().abs().amax(dim=0) for n in members]
        s = smoothing_scale(absmax[members[0]], w_absmax, alpha)
        for n in members:
            scales[n] = s
    return scales


def _main_output(out: Any) -> torch.Tensor:
    """The tensor a model's quality rests on: logits, last hidden state, or the output itself."""
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _rows(out: torch.Tensor, batch: Any) -> torch.Tensor:
    """Per-sample vectors to compare: mean-pooled over real tokens for sequences with a mask, else per row."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if out.dim() == 3 and mask is not None and "logits" not in batch:
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp(min=1)
    return out.reshape(-1, out.shape[-1])


@torch.no_grad()
def output_error(model: nn.Module, data: CalibrationData, reference: list[torch.Tensor]) -> float:
    """1 − mean cosine between ``model``'s outputs on ``data`` and the float ``reference`` outputs."""
    cos = []
    for batch, ref in zip(data, reference):
        got = _rows(_main_output(run_model(model, batch)).float(), batch)
        cos.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1))
    return float(1 - torch.cat(cos).mean())


@register(StaticQuant)
def apply_static(model: nn.Module, config: StaticQuant, ctx: Context) -> None:
    """Calibrate input ranges of the selected layers on ``ctx.data``, then swap in static-quantized layers.

    Order: check weights, fold BatchNorm, observe inputs in the float model, quantize
    (weights per channel, inputs with frozen scales), then the optional accuracy fallback.
    """
    data = ctx.data
    if data is None:
        raise DataError("StaticQuant needs calibration data (CalibrationData) to choose activation ranges")
    if isinstance(data, CalibrationData):
        data.validate()
    types: tuple[type, ...] = (LinearLike, nn.Conv2d) + ((nn.Embedding,) if config.embeddings else ())
    _check_finite_weights(select_modules(model, types, config.include, config.ignore))
    _fold_batchnorm(model, ctx)
    targets = _select(model, config, types, config.group_size, ctx)
    compute = [n for n, m in targets if not isinstance(m, nn.Embedding)]

    def make(name: str):
        return make_observer(config.act_observer, bits=config.act_bits, symmetric=config.act_symmetric,
                             tensor_name=f"input of {name}", **config.act_options)

    smooth: dict[str, torch.Tensor] = {}
    if config.smooth_alpha is not None:
        linears = [n for n, m in targets if linear_kind(m) is not None
                   and (not config.smooth_include or any(matches(n, p) for p in config.smooth_include))]
        smooth = _smoothing(model, data, linears, config.smooth_alpha)
        ctx.note(f"StaticQuant: smoothed the inputs of {len(smooth)} Linear layer(s) (alpha {config.smooth_alpha}, "
                 f"{len({id(v) for v in smooth.values()})} shared scale vector(s))")
    attention = _attach_attention(model, config, ctx) if config.attention else {}
    if ctx.progress is not None:
        ctx.progress(f"calibrating {len(compute)} input ranges ({config.act_observer})", 0.0)
    try:
        observers = calibrate_inputs(model, data, compute, make, {n: 1.0 / s for n, s in smooth.items()})
    except BaseException:
        _detach_attention(model, attention)
        raise
    for name, quant in list(attention.items()):
        if len(quant.freeze()) == len(ROLES):
            ctx.note(f"StaticQuant: kept the attention of {name.rpartition('.')[0]} in float: it received no "
                     "calibration input")
            _detach_attention(model, {name: quant})
            del attention[name]
            continue
        quant.enabled = False  # float attention for the reference outputs below
    reference = None
    if config.tolerance is not None:
        reference = [_rows(_main_output(run_model(model, b)).float(), b) for b in data]

    paths = _paths(model)
    float_layers: dict[str, nn.Module] = {}
    quant_layers: dict[str, nn.Module] = {}
    where: dict[str, list[str]] = {}  # every path of each replaced layer
    with torch.no_grad():
        for i, (name, module) in enumerate(targets):
            bits = value_for(name, config.bits)
            if isinstance(module, nn.Embedding):
                new = _quantized_twin(module, 8, config, None)
            else:
                obs = observers[name]
                if obs.batches == 0:
                    ctx.note(f"StaticQuant: kept {name} in float: it received no calibration input")
                    continue
                new = _quantized_twin(module, bits, config, "static", smooth.get(name))
                new.set_input_qparams(*obs.qparams())
            new.train(module.training)
            fallback = module
            if config.fallback_to == "weight_only" and not isinstance(module, nn.Embedding):
                fallback = _quantized_twin(module, bits, config, None, smooth.get(name))
            float_layers[name], quant_layers[name], where[name] = fallback, new, paths[id(module)]
            for path in paths[id(module)]:
                set_submodule(model, path, new)
            if ctx.progress is not None:
                ctx.progress(f"static int{config.act_bits}: {name}", (i + 1) / len(targets))

    for name, quant in attention.items():
        quant.enabled = True
        float_layers[name], quant_layers[name], where[name] = quant.disabled_copy(), quant, [name]
    kept = list(quant_layers)
    if config.tolerance is not None:
        kept = _fallback(model, config, ctx, data, reference, float_layers, quant_layers, where)
    n_attention = sum(1 for n in kept if n in attention)
    ctx.note(
        f"StaticQuant: {len(kept) - n_attention} layer(s) quantized (weights per output channel, "
        f"{config.weight_observer}; inputs int{config.act_bits} "
        f"{'symmetric' if config.act_symmetric else 'asymmetric'} per tensor, {config.act_observer})"
        + (f"; attention matmul inputs (query, key, probs, value) uint8 in {n_attention} block(s)" if attention else "")
    )


def _attach_attention(model: nn.Module, config: StaticQuant, ctx: Context) -> dict[str, QuantAttentionInputs]:
    """Give every selected attention block an observing ``QuantAttentionInputs`` and dispatch to it.

    Returns path of the attached module -> module. A model whose attention slimkit cannot
    reproduce keeps float attention (noted).
    """
    reason = unsupported_reason(model)
    if reason:
        ctx.note(f"StaticQuant: attention matmuls kept in float: {reason}")
        return {}
    attached = {}
    for name, module in attention_modules(model):
        if any(matches(name, p) for p in config.ignore):
            continue
        quant = QuantAttentionInputs(8)
        quant.observers = [make_observer(config.act_observer, bits=8, symmetric=False,
                                         tensor_name=f"{role} of {name}", **config.act_options) for role in ROLES]
        setattr(module, CHILD, quant)
        attached[f"{name}.{CHILD}" if name else CHILD] = quant
    if attached:
        use_quantized_attention(model)
    return attached


def _detach_attention(model: nn.Module, attached: dict[str, QuantAttentionInputs]) -> None:
    """Remove attached attention quantizers (after a failed calibration, or a block that never ran)."""
    for path in attached:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if hasattr(owner, child):
            delattr(owner, child)


def _swap(model: nn.Module, module_paths: list[str], new: nn.Module) -> None:
    for path in module_paths:
        set_submodule(model, path, new)


def _fallback(model: nn.Module, config: StaticQuant, ctx: Context, data: CalibrationData,
              reference: list[torch.Tensor], float_layers: dict[str, nn.Module],
              quant_layers: dict[str, nn.Module], where: dict[str, list[str]]) -> list[str]:
    """Return the most sensitive layers to float until the output error is within ``config.tolerance``.

    Sensitivity of a layer = output error (1 − mean cosine to float) with only that layer
    quantized. ``float_layers`` holds what a layer falls back to (the float original, or
    its weight-only twin). Returns the names still fully quantized; notes which layers
    went back and why.
    """
    error = output_error(model, data, reference)
    ctx.note(f"StaticQuant fallback: output error with every layer quantized {error:.5f} (tolerance {config.tolerance})")
    if error <= config.tolerance:
        return list(quant_layers)
    candidates = [n for n in quant_layers if not isinstance(quant_layers[n], QuantEmbedding)]
    sensitivity: dict[str, float] = {}
    for name in candidates:  # everything float, then one layer at a time quantized
        _swap(model, where[name], float_layers[name])
    for i, name in enumerate(candidates):
        _swap(model, where[name], quant_layers[name])
        sensitivity[name] = output_error(model, data, reference)
        _swap(model, where[name], float_layers[name])
        if ctx.progress is not None:
            ctx.progress(f"sensitivity of {name}", (i + 1) / len(candidates))
    for name in candidates:
        _swap(model, where[name], quant_layers[name])
    cap = len(candidates) if config.max_float_layers is None else config.max_float_layers
    kept = list(quant_layers)
    for name in sorted(candidates, key=sensitivity.get, reverse=True)[:cap]:
        if error <= config.tolerance:
            break
        _swap(model, where[name], float_layers[name])
        kept.remove(name)
        error = output_error(model, data, reference)
        what = ("float" if config.fallback_to == "float" or isinstance(quant_layers[name], QuantAttentionInputs)
                else "float input (int8 weights kept)")
        ctx.note(f"StaticQuant fallback: {name} back to {what} (alone it costs {sensitivity[name]:.5f}); "
                 f"output error now {error:.5f}")
    verdict = "met" if error <= config.tolerance else "NOT met"
    ctx.note(f"StaticQuant fallback: tolerance {config.tolerance} {verdict} with {len(quant_layers) - len(kept)} "
             f"layer(s) in float; final output error {error:.5f}")
    return kept
