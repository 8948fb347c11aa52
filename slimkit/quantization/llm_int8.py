"""LLM.int8() (Dettmers et al. 2022): int8 matmul with the outlier feature dimensions kept in float.

For an input X (tokens, in) and a weight W (out, in) stored as int8 codes per output channel:

- outlier dimensions O = { j : any token has |X_tj| ≥ threshold } (6.0 in the paper), found
  on every batch at run time;
- Y = X[:, O] · Ŵ[:, O]ᵀ  (float, Ŵ the dequantized weight columns)
    + s_x ⊙ (Q(X[:, ¬O]) · Q(W)[:, ¬O]ᵀ) ⊙ s_wᵀ  (int8 × int8 → int32, rescaled)
  where Q(X) has one symmetric scale s_x,t = max_j∉O |X_tj| / 127 per token (row) and Q(W)
  one scale s_w,i = max_j |W_ij| / 127 per output row.

The int8 product runs through ``torch._int_mm`` (a real int8 kernel on CPU: 3–8× faster
than the float32 matmul of the same shape on an AMX/VNNI Xeon, measured at 2048×256×768),
falling back to an exact int32 matmul where ``_int_mm`` refuses the shapes. The outlier
detection, per-token scaling and the float part are extra passes over X, so the whole layer
is not necessarily faster than fp32 (the benchmark says how much).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import DataError
from slimkit.core.linear_like import (
    LinearLike,
    bypassed_forward,
    linear_problem,
    linear_shape,
    linear_weight,
)
from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.core.registry import Context, register
from slimkit.core.targets import select_modules, set_submodule, tie_notes
from slimkit.quantization.modules import (
    _dtype_from_spec,
    _dtype_spec,
    _forward_must_run,
    _QuantWeightMixin,
)
from slimkit.quantization.primitives import dequantize_weight, quantize_weight

DEFAULT_THRESHOLD = 6.0


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(in,) bool: the feature dims of a (tokens, in) input in which any |x| ≥ ``threshold``."""
    return (x.abs() >= threshold).any(dim=0)


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a (tokens, in) float tensor with one scale per row: (codes int8, scales (tokens, 1)).

    scale_t = max|x_t| / 127 (1 for an all-zero row, whose codes are then 0), codes in [-127, 127].
    """
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor, kernel: str = "int_mm") -> torch.Tensor:
    """Exact int32 product of int8 (m, k) ``a`` and int8 (k, n) ``b_t``.

    ``kernel="int_mm"``: ``torch._int_mm`` (int8 kernel), falling back to int32 when it
    refuses the shapes; ``"int32"``: int32 matmul emulation (slow, always available).
    """
    if kernel == "int_mm":
        try:
            return torch._int_mm(a, b_t)
        except RuntimeError:
            pass  # shapes or device the kernel does not take: the exact slow path below
    return a.to(torch.int32) @ b_t.to(torch.int32)


def llm_int8_linear(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, threshold: float,
                    bias: torch.Tensor | None = None, kernel: str = "int_mm") -> torch.Tensor:
    """LLM.int8's decomposed product of a (tokens, in) input with int8 (out, in) weight codes, float32.

    ``w_scale``: (out,) per-output-channel scales. Outlier columns of ``x`` (see
    ``outlier_columns``) are multiplied in float by the dequantized weight columns; the
    others (outlier columns zeroed, so they add nothing) in int8 with per-token scales.
    """
    xf = x.float()
    outliers = outlier_columns(xf, threshold)
    has_outliers = bool(outliers.any())
    regular = xf.masked_fill(outliers, 0.0) if has_outliers else xf
    qx, sx = per_token_int8(regular)
    y = int8_matmul(qx, codes.t(), kernel).float() * sx * w_scale.float().reshape(1, -1)
    if has_outliers:
        idx = outliers.nonzero().squeeze(1)
        w_out = codes.index_select(1, idx).float() * w_scale.float().reshape(-1, 1)  # (out, n_outliers)
        y = y + xf.index_select(1, idx) @ w_out.t()
    return y if bias is None else y + bias.float()


@register_module_type
class LLMInt8Linear(_QuantWeightMixin, SlimkitModule):
    """A Linear with int8 per-output-channel weight codes, run as LLM.int8's outlier-decomposed matmul.

    ``qweight`` int8 (out, in), ``scale`` float32 (out, 1), bias a float Parameter.
    ``threshold``: |x| at or above which an input dimension goes through the float path.
    ``.weight`` is the dequantized weight (read-only); the layer must be called (a
    ``_forward_must_run`` hook keeps torch's fused encoder paths from reading ``.weight`` instead).
    """

    onnx_unsupported: ClassVar[str] = (
        "LLM.int8's outlier columns are chosen per batch at run time, which ONNX has no operator for; "
        "export a DynamicQuant(per_token=True) model instead")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = DEFAULT_THRESHOLD,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.bits, self.group_size, self.symmetric = 8, None, True
        self.dtype = dtype
        self.kernel = "int_mm"  # not saved: "int32" forces the emulation (tests, timing)
        self._init_storage(out_features, in_features, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.register_forward_pre_hook(_forward_must_run)

    @property
    def _rows(self) -> int:
        return self.out_features

    @property
    def _cols(self) -> int:
        return self.in_features

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> LLMInt8Linear:
        """Quantize a Linear-like layer's (out, in) weight to int8 per output channel (min/max, symmetric)."""
        with torch.no_grad():
            w = linear_weight(linear)
            out_f, in_f = linear_shape(linear)
            qw = quantize_weight(w, 8, symmetric=True)
            mod = cls(in_f, out_f, bias=linear.bias is not None, threshold=threshold, device=w.device, dtype=w.dtype)
            mod._store(qw)
            if linear.bias is not None:
                mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return mod

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight."""
        return dequantize_weight(self.qweight, self.scale, None, None).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        y = llm_int8_linear(x2, self.qweight, self.scale[:, 0], self.threshold, self.bias, self.kernel)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        threshold = self.threshold if math.isfinite(self.threshold) else "inf"  # JSON has no infinity
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "threshold": threshold, **_dtype_spec(self.dtype)}

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> LLMInt8Linear:
        """An empty LLMInt8Linear of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        return cls(int(spec["in_features"]), int(spec["out_features"]), bias=bool(spec["bias"]),
                   threshold=float(spec["threshold"]), dtype=_dtype_from_spec(spec, "LLMInt8Linear"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 weights per channel, threshold={self.threshold}")


@dataclass(frozen=True)
class LLMInt8(Config):
    """LLM.int8(): int8 weights per output channel; per batch, input dims with any |x| ≥ threshold stay float.

    threshold: the outlier magnitude (6.0 in the paper; must be > 0; ``inf`` gives plain
    per-token W8A8). include / ignore: Linear name patterns. No calibration data needed.
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True

    threshold: float = DEFAULT_THRESHOLD
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check the threshold and the name patterns."""
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not t > 0:
            self.fail("threshold", f"must be a number > 0 (|x| at which an input dim stays float; 6.0 in the "
                                   f"paper), got {t!r}")
        self.check_name_patterns()


@register(LLMInt8)
def apply_llm_int8(model: nn.Module, config: LLMInt8, ctx: Context) -> None:
    """Replace the selected Linear-like layers with LLMInt8Linear, in place; the others are noted and skipped.

    Linear-like: nn.Linear, subclasses computing x·Wᵀ + b (FalconLinear) and transformers'
    Conv1D (``core.linear_like``). A layer its parent never calls (``out_proj`` of an
    nn.MultiheadAttention) is skipped with a note: its input could not be quantized.
    """
    targets = []
    for name, module in select_modules(model, (LinearLike,), config.include, config.ignore):
        problem = linear_problem(module, "an LLMInt8Linear") or bypassed_forward(model, name)
        if problem:
            ctx.note(f"LLMInt8: skipped {name}: {problem}")
        elif module.weight.is_meta:
            ctx.note(f"LLMInt8: skipped {name}: its weight is on the meta device (not loaded)")
        else:
            targets.append((name, module))
    for name, module in targets:
        if not torch.isfinite(module.weight.detach()).all():
            raise DataError(f"layer {name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{name!r}])")
    for line in tie_notes(model, targets, "LLMInt8"):
        ctx.note(line)
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    for i, (name, module) in enumerate(targets):
        new = LLMInt8Linear.from_linear(module, config.threshold)
        new.train(module.training)
        for path in paths[id(module)]:
            set_submodule(model, path, new)
        if ctx.progress is not None:
            ctx.progress(f"LLM.int8: {name}", (i + 1) / len(targets))
    ctx.note(f"LLMInt8: {len(targets)} Linear layer(s) to int8 weights per output channel; input dims with "
             f"|x| ≥ {config.threshold} computed in float, the rest int8 per token")
