"""Weight-only round-to-nearest (RTN) quantization: the data-free baseline of LLM quantization.

Each selected Linear-like layer (nn.Linear, FalconLinear, GPT-2's Conv1D: ``core.linear_like``)
and, with ``embeddings=True``, each nn.Embedding (Gemma's scaled one too) is replaced in place
by a QuantLinear / QuantEmbedding whose weight is min/max quantized per output channel or per
group of input columns; an lm_head tied to a quantized embedding reads the embedding's codes. No calibration data is needed; GPTQ and AWQ improve on it with data.
``range_opt`` optionally replaces the min/max range of each group by a searched one
(``range_search``: an MSE clip search, or HQQ's half-quadratic fit), still data-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import DataError
from slimkit.core.linear_like import (
    LinearLike,
    embedding_problem,
    in_features,
    linear_kind,
    linear_problem,
    linear_weight,
)
from slimkit.core.registry import Context, register
from slimkit.core.targets import (
    check_layer_map,
    module_paths,
    select_modules,
    set_submodule,
    tie_notes,
    value_for,
)
from slimkit.quantization.grids import GRIDS, grid_for_columns, grid_problem
from slimkit.quantization.modules import QuantEmbedding, QuantLinear, TiedQuantLinear
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
    grid: a GGUF block grid (q8_0, q5_0, q4_0, q4_1, q4_k, q6_k; ``quantization.grids``) whose
    rule chooses each block's parameters, so ``slimkit export gguf`` copies the codes; it sets
    the bits, group size and symmetry (those fields are then not used). Rows that do not split
    into its blocks get llama.cpp's fallback type (q4_k -> q5_0, q6_k -> q8_0).
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True
    qat_base: ClassVar[bool] = True  # QAT can train for its result (weights only)

    bits: int | dict = 8
    group_size: int | None = None
    symmetric: bool = True
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    embeddings: bool = False
    range_opt: str | None = None
    grid: str | None = None

    def validate(self) -> None:
        """Check bits, group_size, the flags and the name patterns."""
        if self.grid is not None:
            if self.grid not in GRIDS:
                self.fail("grid", f"must be one of {', '.join(GRIDS)} (a GGUF block type) or None, got {self.grid!r}")
            if self.range_opt not in (None, "mse") or (self.range_opt == "mse" and not GRIDS[self.grid].searchable):
                self.fail("range_opt", f"on grid {self.grid!r} only range_opt 'mse' on the one-scale grids "
                                       "(q8_0, q5_0, q4_0) is offered; use range_opt: null")
            if isinstance(self.bits, dict):
                self.fail("bits", f"a per-layer bits map cannot be combined with grid {self.grid!r}")
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
    if isinstance(module, nn.Embedding):
        problem = embedding_problem(module)
        cols, what = module.embedding_dim, "embedding_dim"
    else:
        # nn.Linear, subclasses computing x·Wᵀ + b, Conv1D; other subclasses (a router, say)
        # carry behaviour a QuantLinear would silently drop.
        problem = linear_problem(module, "a QuantLinear")
        cols, what = (in_features(module), "in_features") if problem is None else (0, "")
    if problem:
        return problem
    if module.weight.is_meta:
        return "its weight is on the meta device (not loaded)"
    if config.grid is not None:
        return grid_problem(config.grid, cols)
    if config.group_size is not None and cols % config.group_size:
        return f"{what} {cols} is not divisible by group_size {config.group_size}"
    return None


def _tied_pairs(model: nn.Module, targets: list[tuple[str, nn.Module]], config: RTN) -> dict[str, str]:
    """Output layers to tie to a quantized embedding: linear name -> embedding name.

    A selected Linear holding the very Parameter of a selected Embedding (lm_head tied to
    the token table) with the same bit width can read the embedding's codes: one row per
    token, groups along the hidden dim, the same layout in both.
    """
    by_weight = {id(m.weight): n for n, m in targets if isinstance(m, nn.Embedding)}
    pairs = {}
    for name, module in targets:
        source = by_weight.get(id(module.weight)) if linear_kind(module) == "linear" else None
        if source is not None and value_for(name, config.bits) == value_for(source, config.bits):
            pairs[name] = source
    return pairs


@register(RTN)
def apply_rtn(model: nn.Module, config: RTN, ctx: Context) -> None:
    """Replace the selected Linear-like (and Embedding) layers of ``model`` with RTN-quantized ones, in place.

    Linear-like: nn.Linear, subclasses computing x·Wᵀ + b (FalconLinear) and transformers'
    Conv1D (``core.linear_like``); Embedding: nn.Embedding and scaled subclasses (Gemma).
    Every target is checked first, so a NaN/inf weight raises DataError naming the layer
    with the model untouched. Layers that cannot be quantized are skipped with a note. An
    output layer tied to a quantized embedding becomes a ``TiedQuantLinear`` reading the
    embedding's codes (the tie is kept); other ties are noted as broken.
    """
    types: tuple[type, ...] = (LinearLike, nn.Embedding) if config.embeddings else (LinearLike,)
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

    paths = module_paths(model)
    tied = _tied_pairs(model, targets, config)
    notes += tie_notes(model, targets, "RTN", kept=set(tied) | set(tied.values()))
    for name, source in tied.items():
        notes.append(f"RTN: {name} is tied to {source}: it computes with the embedding's int"
                     f"{value_for(name, config.bits)} codes (a TiedQuantLinear), so the tie is kept and stored once")

    n_linear = n_embedding = 0
    replaced: dict[str, nn.Module] = {}
    with torch.no_grad():
        # Embeddings first, so a tied output layer finds its quantized table.
        order = sorted(targets, key=lambda t: not isinstance(t[1], nn.Embedding))
        for i, (name, module) in enumerate(order):
            bits = value_for(name, config.bits)
            if name in tied:
                new = TiedQuantLinear.tie(module, replaced[tied[name]], tied[name])
                n_linear += 1
            elif isinstance(module, nn.Embedding):
                qw = _range_optimized(module.weight, bits, config)
                new = QuantEmbedding.from_embedding(module, bits, config.group_size, config.symmetric, weight=qw)
                n_embedding += 1
            else:
                qw = _range_optimized(linear_weight(module), bits, config)
                new = QuantLinear.from_linear(module, bits, config.group_size, config.symmetric, weight=qw)
                n_linear += 1
            new.train(module.training)
            replaced[name] = new
            for path in paths[id(module)]:
                set_submodule(model, path, new)
            if ctx.progress is not None:
                ctx.progress(f"RTN int{bits}: {name}", (i + 1) / len(targets))

    if config.grid is not None:
        moved = [n for n, m in targets if isinstance(m, nn.Embedding) and not GRIDS[config.grid].fits(m.embedding_dim)
                 or not isinstance(m, nn.Embedding) and not GRIDS[config.grid].fits(in_features(m))]
        if moved:
            notes.append(f"RTN: {len(moved)} layer(s) whose rows do not split into {config.grid} blocks use llama.cpp's "
                         f"fallback type {GRIDS[config.grid].fallback} (e.g. {moved[0]})")
    for line in notes:
        ctx.note(line)
    scheme = "symmetric" if config.symmetric else "asymmetric"
    granularity = "per output channel" if config.group_size is None else f"group size {config.group_size}"
    if config.grid is not None:
        scheme, granularity = f"GGUF {config.grid} grid", "llama.cpp's blocks"
    search = {None: "", "mse": ", MSE clip search", "hqq": ", HQQ range fit"}[config.range_opt]
    skipped = len(selected) - len(targets)
    ctx.note(
        f"RTN: quantized {n_linear} Linear and {n_embedding} Embedding layer(s) to "
        f"{config.grid if config.grid is not None else _bits_text(config.bits)} "
        f"({scheme}, {granularity}{search}); skipped {skipped}"
    )


def _range_optimized(weight: torch.Tensor, bits: int, config: RTN) -> QuantizedWeight | None:
    """The range-searched (or grid) codes of ``weight`` under ``config``, or None for plain min/max RTN."""
    if config.grid is not None:
        grid = grid_for_columns(config.grid, weight.shape[1])
        return grid.quantize(weight, search=config.range_opt == "mse" and grid.searchable)
    if config.range_opt == "mse":
        return mse_clip_scales(weight, bits, config.group_size, config.symmetric)
    if config.range_opt == "hqq":
        return hqq_quantize(weight, bits, config.group_size)
    return None


def _bits_text(bits: int | dict) -> str:
    if isinstance(bits, dict):
        return "bits " + ", ".join(f"{k}: {v}" for k, v in bits.items())
    return f"int{bits}"
