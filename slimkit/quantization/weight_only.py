"""Weight-only round-to-nearest (RTN) quantization: the data-free baseline of LLM quantization.

Each selected nn.Linear (and nn.Embedding with ``embeddings=True``) is replaced in place by
a QuantLinear / QuantEmbedding whose weight is min/max quantized per output channel or per
group of input columns. No calibration data is needed; GPTQ and AWQ improve on it with data.
``range_opt`` optionally replaces the min/max range of each group by a searched one
(``range_search``: an MSE clip search, or HQQ's half-quadratic fit), still data-free.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import DataError
from slimkit.core.registry import Context, register
from slimkit.core.targets import (
    check_layer_map,
    select_modules,
    set_submodule,
    subclass_reason,
    value_for,
)
from slimkit.quantization.modules import QuantEmbedding, QuantLinear
from slimkit.quantization.primitives import BITS, QuantizedWeight
from slimkit.quantization.range_search import hqq_quantize, mse_clip_scales

ALLOWED_BITS = BITS
RANGE_OPTS = (None, "mse", "hqq")


def _bits_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        return f"must be one of {', '.join(map(str, ALLOWED_BITS))}, got {value!r}"
    return None


@dataclass(frozen=True)
class RTN(Config):
    """Round-to-nearest weight-only quantization.

    bits: 16, 8, 4, 3, 2 or 1 (binary: sign × mean|w|), or a per-layer map such as
    ``{"re:.*mlp.*": 4, "default": 8}`` (first matching pattern wins). group_size: None for one scale per output channel, else a scale per
    ``group_size`` consecutive input columns (a multiple of 8, so groups pack into whole
    bytes). symmetric: signed codes with z = 0, else unsigned codes with a zero point.
    include / ignore: module name patterns (plain name, glob, or ``re:``). embeddings: also
    quantize nn.Embedding tables (one scale per token row, or per group along the dim).
    range_opt: None (min/max range), "mse" (per group, shrink the range by the factor in
    [0.5, 1] that minimizes the squared weight error) or "hqq" (HQQ's half-quadratic fit of
    scale and zero point; asymmetric only). Both need 2..8 bits and no data.
    """

    family: ClassVar[str] = "quantize"

    bits: int | dict = 8
    group_size: int | None = None
    symmetric: bool = True
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    embeddings: bool = False
    range_opt: str | None = None

    def validate(self) -> None:
        """Check bits, group_size, the flags and the name patterns."""
        if isinstance(self.bits, dict):
            check_layer_map(self.bits, "RTN.bits", _bits_problem)
        elif _bits_problem(self.bits):
            self.fail("bits", _bits_problem(self.bits))
        for value in (self.bits.values() if isinstance(self.bits, dict) else [self.bits]):
            if value == 1 and not self.symmetric:
                self.fail("symmetric", "1-bit weights are binary (sign × scale): use symmetric: true")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 8):
            self.fail(
                "group_size",
                f"must be None (per output channel) or a positive multiple of 8 such as 32, 64 or 128, got {gs!r}",
            )
        for name in ("symmetric", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                self.fail(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.range_opt not in RANGE_OPTS:
            self.fail("range_opt", f"must be null (min/max), 'mse' or 'hqq', got {self.range_opt!r}")
        if self.range_opt is not None:
            for value in (self.bits.values() if isinstance(self.bits, dict) else [self.bits]):
                if not 2 <= value <= 8:
                    self.fail("range_opt", f"needs 2..8-bit weights, got a {value}-bit setting (binary and 16-bit "
                                           "weights have no range to search); use range_opt: null")
            if self.range_opt == "hqq" and self.symmetric:
                self.fail("range_opt", "'hqq' fits a zero point: use symmetric: false (or range_opt: 'mse')")
        self.check_name_patterns()


def _skip_reason(module: nn.Module, config: RTN) -> str | None:
    """Why ``module`` cannot be RTN-quantized under ``config``, or None when it can."""
    if type(module) not in (nn.Linear, nn.Embedding):
        # Subclasses (e.g. MultiheadAttention's out_proj) carry behaviour or are read
        # directly by their parent; a QuantLinear would silently drop that.
        return subclass_reason(module, "a QuantLinear/QuantEmbedding")
    if module.weight.is_meta:
        return "its weight is on the meta device (not loaded)"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "max_norm renormalizes the table during forward, which codes cannot do"
    cols = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
    if config.group_size is not None and cols % config.group_size:
        what = "in_features" if isinstance(module, nn.Linear) else "embedding_dim"
        return f"{what} {cols} is not divisible by group_size {config.group_size}"
    return None


@register(RTN)
def apply_rtn(model: nn.Module, config: RTN, ctx: Context) -> None:
    """Replace the selected Linear (and Embedding) layers of ``model`` with RTN-quantized ones, in place.

    Every target is checked first, so a NaN/inf weight raises DataError naming the layer
    with the model untouched. Layers that cannot be quantized are skipped with a note;
    weights tied between modules are quantized per module, with a note that the tie breaks.
    """
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if config.embeddings else (nn.Linear,)
    selected = select_modules(model, types, config.include, config.ignore)

    notes: list[str] = []
    targets = []
    for name, module in selected:
        reason = _skip_reason(module, config)
        if reason:
            notes.append(f"RTN: skipped {name}: {reason}")
        else:
            targets.append((name, module))
    for name, module in targets:
        if not torch.isfinite(module.weight.detach()).all():
            raise DataError(f"layer {name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{name!r}])")

    # Every path of every module (a module reachable twice is replaced at both paths) and
    # the module paths owning each Parameter (to find weights tied across modules).
    paths: dict[int, list[str]] = defaultdict(list)
    owners: dict[int, list[str]] = defaultdict(list)
    for mname, m in model.named_modules(remove_duplicate=False):
        paths[id(m)].append(mname)
        for p in m.parameters(recurse=False):
            owners[id(p)].append(mname)
    selected_names = {n for n, _ in targets}
    for name, module in targets:
        others = [o for o in owners[id(module.weight)] if o not in paths[id(module)]]
        if others and all(o not in selected_names or name < o for o in others):  # one note per tie
            both = any(o in selected_names for o in others)
            fate = "each copy is quantized separately" if both else "the other copy stays float"
            notes.append(f"RTN: {name}'s weight is shared with {', '.join(others)}; {fate}, so the tie is broken")

    n_linear = n_embedding = 0
    with torch.no_grad():
        for i, (name, module) in enumerate(targets):
            bits = value_for(name, config.bits)
            qw = _range_optimized(module.weight, bits, config)
            if isinstance(module, nn.Linear):
                new = QuantLinear.from_linear(module, bits, config.group_size, config.symmetric, weight=qw)
                n_linear += 1
            else:
                new = QuantEmbedding.from_embedding(module, bits, config.group_size, config.symmetric)
                if qw is not None:
                    new._store(qw)
                n_embedding += 1
            new.train(module.training)
            for path in paths[id(module)]:
                set_submodule(model, path, new)
            if ctx.progress is not None:
                ctx.progress(f"RTN int{bits}: {name}", (i + 1) / len(targets))

    for line in notes:
        ctx.note(line)
    scheme = "symmetric" if config.symmetric else "asymmetric"
    granularity = "per output channel" if config.group_size is None else f"group size {config.group_size}"
    search = {None: "", "mse": ", MSE clip search", "hqq": ", HQQ range fit"}[config.range_opt]
    skipped = len(selected) - len(targets)
    ctx.note(
        f"RTN: quantized {n_linear} Linear and {n_embedding} Embedding layer(s) to {_bits_text(config.bits)} "
        f"({scheme}, {granularity}{search}); skipped {skipped}"
    )


def _range_optimized(weight: torch.Tensor, bits: int, config: RTN) -> QuantizedWeight | None:
    """The range-searched codes of ``weight`` under ``config.range_opt``, or None for plain min/max RTN."""
    if config.range_opt == "mse":
        return mse_clip_scales(weight, bits, config.group_size, config.symmetric)
    if config.range_opt == "hqq":
        return hqq_quantize(weight, bits, config.group_size)
    return None


def _bits_text(bits: int | dict) -> str:
    if isinstance(bits, dict):
        return "bits " + ", ".join(f"{k}: {v}" for k, v in bits.items())
    return f"int{bits}"
