"""AWQ: activation-aware weight quantization (Lin et al. 2023), block by block.

A few input channels of each Linear carry much larger activations than the rest; their
weight columns matter most. AWQ scales those columns up before quantizing
(``W·diag(s)``, so they get finer codes relative to their group) and the input down
(``diag(s)⁻¹·x``, folded into the op producing it, so nothing extra runs at inference):

    s = mean|X_j|^α / sqrt(max·min),   α* = argmin_α ‖P(x; Q(W·diag(s))·diag(s)⁻¹) − P(x; W)‖²

for each group of Linear layers reading the same input (q/k/v; o; gate/up; down), α on a
grid in [0, 1] (α = 0 is plain RTN, so the search never does worse on its data).
``P`` is the group's *parent*, as in the paper and AutoAWQ (``objective="parent"``): the
lowest module holding every member (the attention module for q/k/v, softmax and o_proj
included; the MLP for gate/up), or the Linear itself for a group of one (o, down). It
is run in float on its recorded inputs (an even subsample of whole calls, at most about
``max_tokens`` tokens) with each member's weight replaced by ``Q(W·diag(s))·diag(s)⁻¹``,
which equals scaling the input by 1/s and the weight by s, so the producer is not
touched during the search. When the parent is the Linear (and for
``objective="linear"``, which scores every group on its Linear outputs) the error is
computed exactly from the Gram matrix ``G = XᵀX`` of the group's input,
``Σ_t ‖D x_t‖² = tr(D G Dᵀ)`` with ``D = Q(W·diag(s))·diag(s)⁻¹ − W``, costing
``out·in²`` per α instead of ``out·in·tokens``. Then (``clip``) each group of weights gets
the range shrink factor minimizing its layer-output error (AWQ's auto_clip; see
``range_search.mse_clip_scales`` with ``gram``), except for the query and key
projections, which AutoAWQ also leaves unclipped (their error passes through the q·kᵀ
product and the softmax, which a per-layer output error does not model), and the weights
are quantized by RTN or GPTQ.

Per decoder block (walked by ``blockwise.run_blockwise``; the next block sees this
block's scaled and quantized outputs): one pass records each group's Gram (on an even
subsample of at most ``max_tokens`` tokens) and mean|x| (all tokens); the groups are scaled
in execution order, each scale folded into its producer (a norm; up_proj for down_proj;
v_proj for o_proj when heads map one to one) and checked on the block output; since a
fold leaves the float block's function unchanged, a group's input just becomes ``x/s``
and its Gram ``diag(s)⁻¹ G diag(s)⁻¹``, with no second pass (a multi-layer parent's
inputs and float output are recorded just before its group is searched, after the
earlier folds); finally every layer is quantized (last, because a fold into
up_proj/v_proj changes their rows).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.blockwise import (
    feed_inputs,
    fold_input_scale,
    linear_groups,
    run_blockwise,
)
from slimkit.core.calibration import (
    BlockInputs,
    CapturedCall,
    _first_output,
    find_blocks,
)
from slimkit.core.config import Config
from slimkit.core.errors import DataError
from slimkit.core.linear_like import (
    LinearLike,
    in_features,
    linear_problem,
    linear_weight,
    set_linear_weight,
)
from slimkit.core.registry import Context, register
from slimkit.core.targets import select_modules, set_submodule
from slimkit.quantization.grids import GRIDS, BlockGrid, grid_for_columns, grid_problem
from slimkit.quantization.modules import QuantLinear
from slimkit.quantization.primitives import QuantizedWeight, quantize_weight
from slimkit.quantization.range_search import clip_factors, mse_clip_scales

AWQ_BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq")
OBJECTIVES = ("parent", "linear")
# Layers AutoAWQ never clips ("due to qk bmm, it is hard to clip precisely"): matched on the
# last name component (q_proj, k_proj, query, key; fused Wqkv / qkv_proj / query_key_value).
_NO_CLIP = re.compile(r"(q|k|query|key)(_proj)?|w?qkv(_proj)?|query_key_value", re.IGNORECASE)
# AutoAWQ's floor on s = mean|x|^α before normalization: keeps a dead channel's scale finite.
_SCALE_FLOOR = 1e-4


# --- the maths -------------------------------------------------------------------------


def awq_scale(x_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale ``mean|X_j|^α``, floored at 1e-4, divided by ``sqrt(max·min)``.

    The normalization centres the scales around 1 in log space (AutoAWQ does the same), so
    the folded producer and the scaled weights keep magnitudes of the usual order.
    """
    s = x_mean_abs.double().clamp_min(0).pow(alpha).clamp_min(_SCALE_FLOOR)
    return (s / (s.max() * s.min()).sqrt()).float()


def rtn_on(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
           grid: BlockGrid | None = None) -> QuantizedWeight:
    """Round-to-nearest codes of ``w``: on the GGUF ``grid`` when given, else slimkit's min/max grid."""
    if grid is not None:
        return grid.quantize(w)
    return quantize_weight(w, bits, group_size=group_size, symmetric=symmetric)


def scaled_output_error(weights: Sequence[torch.Tensor], gram: torch.Tensor, scale: torch.Tensor, bits: int,
                        group_size: int | None, symmetric: bool, grid: BlockGrid | None = None) -> float:
    """``Σ_layers tr(D G Dᵀ)``, D = RTN(W·diag(s))·diag(s)⁻¹ − W: the output error summed over the tokens of ``G = XᵀX``."""
    total = 0.0
    g = gram.float()
    s = scale.float()
    for w in weights:
        w = w.detach().float()
        deq = rtn_on(w * s, bits, group_size, symmetric, grid).dequantize()
        d = deq / s - w  # (out, in)
        total += float(((d @ g) * d).sum(dtype=torch.float64))
    return total


@dataclass(frozen=True)
class ScaleSearch:
    """The result of ``search_scale``: the best α, its scale (in,), and the loss of every α tried."""

    alpha: float
    scale: torch.Tensor
    alphas: tuple[float, ...]
    losses: tuple[float, ...]


def _grid_search(x_mean_abs: torch.Tensor, n_grid: int, loss_of) -> ScaleSearch:
    alphas = tuple(float(a) for a in torch.linspace(0, 1, n_grid, dtype=torch.float64))
    losses = []
    best = (math.inf, 0.0, None)
    for a in alphas:
        s = awq_scale(x_mean_abs, a)
        loss = loss_of(s)
        losses.append(loss)
        if loss < best[0]:  # strict: ties keep the smaller α
            best = (loss, a, s)
    if best[2] is None:  # every loss was NaN/inf: keep plain RTN
        best = (math.inf, 0.0, awq_scale(x_mean_abs, 0.0))
    return ScaleSearch(best[1], best[2], alphas, tuple(losses))


def search_scale(weights: Sequence[torch.Tensor], gram: torch.Tensor, x_mean_abs: torch.Tensor, *, bits: int,
                 group_size: int | None, symmetric: bool, n_grid: int = 20, grid: BlockGrid | None = None) -> ScaleSearch:
    """AWQ's grid search on the Linear outputs: α in ``linspace(0, 1, n_grid)`` minimizing ``scaled_output_error``.

    ``weights``: the (out, in) weights of the Linear layers sharing one input; ``gram``
    (in, in) that input's ``XᵀX``; ``x_mean_abs`` (in,) its mean |x| per channel. Ties keep
    the smaller α (α = 0, plain RTN, wins when nothing helps).
    """
    return _grid_search(x_mean_abs, n_grid,
                        lambda s: scaled_output_error(weights, gram, s, bits, group_size, symmetric, grid))


def group_parent(block: nn.Module, names: Sequence[str]) -> str:
    """The block-relative name of the lowest module holding every one of ``names`` ("" = the block).

    A single layer is its own parent. A container that is never called (ModuleList,
    ModuleDict) is skipped upwards, since the parent must be run on its recorded inputs.
    """
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for segments in zip(*parts):
        if len(set(segments)) > 1:
            break
        common.append(segments[0])
    while common and isinstance(block.get_submodule(".".join(common)), (nn.ModuleList, nn.ModuleDict)):
        common.pop()
    return ".".join(common)


@dataclass
class ParentRecord:
    """One call of a group's parent module: its arguments and its float (unquantized) main output."""

    call: CapturedCall
    output: torch.Tensor


@torch.no_grad()
def record_parent(block: nn.Module, calls: Sequence[CapturedCall], parent: str) -> list[ParentRecord]:
    """Run the block on ``calls``, keeping every call of submodule ``parent`` ("" = the block): inputs and output."""
    module = block.get_submodule(parent) if parent else block
    records: list[ParentRecord] = []
    pending: list[CapturedCall] = []

    def pre(_m, args, kwargs):
        pending.append(CapturedCall(tuple(args), dict(kwargs)))

    def post(_m, _args, out):
        records.append(ParentRecord(pending.pop(), _first_output(out).detach()))

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        for call in calls:
            block(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


@torch.no_grad()
def parent_output_error(parent: nn.Module, members: Sequence[nn.Module], records: Sequence[ParentRecord],
                        scale: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                        grid: BlockGrid | None = None) -> float:
    """``Σ_calls ‖parent(x) − float output‖²`` with each member's weight W replaced by ``Q(W·diag(s))·diag(s)⁻¹``.

    Equal to running the parent with the members' input divided by ``scale`` and their
    weights ``Q(W·diag(s))``; ``Q`` is RTN (quantize, then dequantize). ``members``:
    Linear-like layers (their (out, in) weights, ``core.linear_like``). The weights are
    restored before returning.
    """
    saved = [linear_weight(m).detach().clone() for m in members]
    s = scale.detach().float()
    try:
        for m, w in zip(members, saved):
            sd = s.to(w.device)
            deq = rtn_on(w.float() * sd, bits, group_size, symmetric, grid).dequantize()
            set_linear_weight(m, deq / sd)
        total = 0.0
        for r in records:
            out = _first_output(parent(*r.call.args, **r.call.kwargs))
            total += float((out.float() - r.output.float()).pow(2).sum(dtype=torch.float64))
        return total
    finally:
        for m, w in zip(members, saved):
            set_linear_weight(m, w)


def search_scale_parent(parent: nn.Module, members: Sequence[nn.Module], records: Sequence[ParentRecord],
                        x_mean_abs: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool,
                        n_grid: int = 20, grid: BlockGrid | None = None) -> ScaleSearch:
    """AWQ's grid search on the parent module's output (``parent_output_error``), α in ``linspace(0, 1, n_grid)``.

    ``members``: the group's Linear layers inside ``parent`` that get quantized; ``records``:
    the parent's recorded calls (``record_parent``); ``x_mean_abs`` (in,): the group's
    input mean |x| per channel. Ties keep the smaller α.
    """
    return _grid_search(x_mean_abs, n_grid,
                        lambda s: parent_output_error(parent, members, records, s, bits, group_size, symmetric, grid))


def clip_searched(name: str) -> bool:
    """Whether AWQ's clip search runs on layer ``name``: not on query/key projections (as in AutoAWQ)."""
    return not _NO_CLIP.fullmatch(name.rsplit(".", 1)[-1])


class InputStats:
    """Running statistics of one layer input: Gram ``XᵀX`` of an even token subsample, mean |x| of all tokens.

    Every ``stride``-th token (counted across batches) enters the Gram, so at most about
    ``total / stride`` tokens are multiplied out.
    """

    def __init__(self, features: int, stride: int) -> None:
        self.gram = torch.zeros(features, features, dtype=torch.float32)
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.tokens = 0  # all tokens seen
        self.sampled = 0  # tokens in the Gram
        self.stride = stride

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a (tokens, features) batch."""
        x = x.detach().float().cpu()
        first = (-self.tokens) % self.stride  # index in this batch of the next token to sample
        sub = x[first::self.stride]
        self.gram.addmm_(sub.T, sub)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]
        self.sampled += sub.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per channel over every token seen."""
        return (self.abs_sum / max(self.tokens, 1)).float()

    def rescale(self, scale: torch.Tensor) -> None:
        """The statistics of ``x / scale`` (after a scale was folded into the input's producer)."""
        s = scale.double()
        self.gram = (self.gram.double() / s.unsqueeze(0) / s.unsqueeze(1)).float()
        self.abs_sum = self.abs_sum / s


# --- the config and handler -------------------------------------------------------------


@dataclass(frozen=True)
class AWQ(Config):
    """Activation-aware weight quantization of the Linear layers inside a causal LM's decoder blocks.

    bits: 2, 3, 4 or 8. group_size: None (per output channel) or a positive multiple of 8.
    symmetric: False (AWQ's default: unsigned codes with a zero point) or True. n_grid:
    α values tried in [0, 1]. objective: "parent" (the paper's: the scale search measures
    the error at the output of the module holding the group, e.g. the whole attention for
    q/k/v) or "linear" (at the group's own Linear outputs; cheaper). clip: also search
    each weight group's range on the layer's output error (never for q/k projections).
    method: "rtn" or "gptq" (quantize the scaled weights with GPTQ, the Hessian taken
    from every calibration token). max_tokens: tokens (an even subsample) that enter the
    search statistics per layer. include / ignore: module name patterns.
    Linear layers outside the decoder blocks (lm_head) stay float, with a note.
    grid: a GGUF block grid (q8_0, q5_0, q4_0, q4_1, q4_k, q6_k; ``quantization.grids``) used
    in the search and for the codes, so ``slimkit export gguf`` copies them; it sets the
    bits, group size and symmetry (those fields are then not used); rows that do not split
    into its blocks get llama.cpp's fallback type.
    """

    family: ClassVar[str] = "quantize"
    packs_weights: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    n_grid: int = 20
    objective: str = "parent"
    clip: bool = True
    method: str = "rtn"
    max_tokens: int = 4096
    grid: str | None = None
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check every field; the message names the field and the values allowed."""
        if self.grid is not None and self.grid not in GRIDS:
            self.fail("grid", f"must be one of {', '.join(GRIDS)} (a GGUF block type) or None, got {self.grid!r}")
        if isinstance(self.bits, bool) or self.bits not in AWQ_BITS:
            self.fail("bits", f"must be one of {', '.join(map(str, AWQ_BITS))}, got {self.bits!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 8):
            self.fail("group_size", f"must be None (per output channel) or a positive multiple of 8 such as 32, 64 "
                                    f"or 128, got {gs!r}")
        for name in ("symmetric", "clip"):
            if not isinstance(getattr(self, name), bool):
                self.fail(name, f"must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or not 2 <= self.n_grid <= 1000:
            self.fail("n_grid", f"must be an integer from 2 to 1000 (AWQ uses 20), got {self.n_grid!r}")
        if self.objective not in OBJECTIVES:
            self.fail("objective", f"must be 'parent' (the paper's) or 'linear', got {self.objective!r}")
        if self.method not in METHODS:
            self.fail("method", f"must be 'rtn' or 'gptq', got {self.method!r}")
        mt = self.max_tokens
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            self.fail("max_tokens", f"must be a positive integer (e.g. 4096), got {mt!r}")
        self.check_name_patterns()


def _call_tokens(call: CapturedCall) -> int:
    x = call.args[0] if call.args else call.kwargs.get("hidden_states")
    return x.numel() // x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0


def _skip_reason(module: nn.Module, config: AWQ) -> str | None:
    problem = linear_problem(module, "a QuantLinear")
    if problem:
        return problem
    cols = in_features(module)
    if config.grid is not None:
        return grid_problem(config.grid, cols)
    if config.group_size is not None and cols % config.group_size:
        return f"in_features {cols} is not divisible by group_size {config.group_size}"
    return None


def _check_finite(name: str, module: nn.Module) -> None:
    if not module.weight.is_meta and not torch.isfinite(module.weight.detach()).all():
        raise DataError(f"layer {name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{name!r}])")


def _quantize(weight: torch.Tensor, stats: InputStats | None, config: AWQ, clip: bool) -> QuantizedWeight:
    """Codes of the (already scaled) ``weight``: clip search on the output error (if ``clip``), then RTN or GPTQ."""
    bits, gs, sym = config.bits, config.group_size, config.symmetric
    grid = _grid(config, weight.shape[1])
    if grid is not None:  # the clip search below measures slimkit's grid of the same bits and groups
        bits, gs, sym = grid.bits, grid.group_size, grid.symmetric
    if stats is None:  # no calibration tokens: plain RTN
        return rtn_on(weight, bits, gs, sym, grid)
    w = weight.detach().float()
    if config.method == "rtn" and grid is None:
        if clip:
            return mse_clip_scales(w, bits, gs, sym, gram=stats.gram)
        return quantize_weight(w, bits, group_size=gs, symmetric=sym)
    from slimkit.quantization.gptq import (
        gptq_quantize,  # written alongside; imported only when used
    )

    if clip:
        # Clamp each group to its chosen range; GPTQ's group min/max then start from it.
        rows, cols = w.shape
        n_groups = 1 if gs is None else cols // gs
        c = clip_factors(w, bits, gs, sym, gram=stats.gram).unsqueeze(-1)  # (rows, n_groups, 1)
        g = w.reshape(rows, n_groups, -1)
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        w = torch.minimum(torch.maximum(g, lo * c), hi * c).reshape(rows, cols)
    if config.method == "rtn":  # on a grid: the clipped weights rounded by the grid's own rule
        return grid.quantize(w)
    hessian = 2.0 * stats.gram / max(stats.sampled, 1)
    return gptq_quantize(w, hessian, bits=bits, group_size=gs, symmetric=sym, grid=grid).weight


def _grid(config: AWQ, cols: int) -> BlockGrid | None:
    """The GGUF grid a layer of ``cols`` inputs is quantized onto under ``config`` (None: slimkit's own grid)."""
    return None if config.grid is None else grid_for_columns(config.grid, cols)


def _short(names: Sequence[str]) -> str:
    return ",".join(n.rsplit(".", 1)[-1] for n in names)


@dataclass
class BlockScaling:
    """What ``scale_block`` did to one block.

    ``stats``: each target's input statistics after scaling (None: it received no token);
    ``alphas``: the α chosen per group (short layer names, e.g. "q_proj,k_proj,v_proj");
    ``unscaled``: reason -> groups left unscaled; ``no_tokens``: full names of layers no token reached.
    """

    stats: dict[str, InputStats | None]
    alphas: dict[str, float]
    unscaled: dict[str, list[str]]
    no_tokens: list[str]


@torch.no_grad()
def scale_block(block: nn.Module, calls: Sequence[CapturedCall], targets: dict[str, nn.Module], config: AWQ,
                block_name: str = "") -> BlockScaling:
    """Search and fold AWQ scales for every group of ``targets`` (block-relative names) in one float block.

    One pass over ``calls`` records each group's input statistics; then, group by group in
    execution order, the α search runs on the group's selected layers (on the parent
    module's output with ``objective="parent"``, its inputs recorded on an even
    subsample of the calls just before the search) and the scale is folded into the
    group's producer (checked on the block output; the float block's function is
    unchanged). Weights are not quantized here.
    """
    if not calls:
        raise DataError("the calibration data produced no input for the decoder blocks")
    prefix = f"{block_name}." if block_name else ""
    groups = [g for g in linear_groups(block, calls) if any(n in targets for n in g.names)]
    total = sum(_call_tokens(c) for c in calls)
    stride = 1 if config.method == "gptq" else max(1, math.ceil(total / config.max_tokens))
    stats = {g.names[0]: InputStats(in_features(block.get_submodule(g.names[0])), stride) for g in groups}
    # Whole calls for the parent objective (attention mixes a sequence's tokens), about max_tokens tokens.
    parent_calls = list(calls[::max(1, math.ceil(total / config.max_tokens))])
    seen = feed_inputs(block, calls, list(stats), lambda name, x: stats[name].add(x))
    result = BlockScaling({}, {}, {}, [])
    for g in groups:
        members = [n for n in g.names if n in targets]
        st = stats[g.names[0]]
        if seen[g.names[0]] == 0:
            result.no_tokens.extend(prefix + n for n in members)
            result.stats.update({n: None for n in members})
            continue
        if not torch.isfinite(st.gram).all() or not torch.isfinite(st.abs_sum).all():
            name = prefix + members[0]
            raise DataError(f"the input of {name} has NaN or inf on the calibration data; fix the model or "
                            f"the data, or ignore the layer (ignore=[{name!r}])")
        result.stats.update({n: st for n in members})
        key = _short(g.names)
        if g.producer is None:
            result.unscaled.setdefault("no producer to fold the scale into", []).extend(prefix + n for n in members)
            continue
        found = None
        layer_grid = _grid(config, in_features(targets[members[0]]))
        parent = group_parent(block, g.names) if config.objective == "parent" else None
        if parent is not None and parent not in g.names:  # a Linear parent: the Gram form is exact
            records = record_parent(block, parent_calls, parent)
            if records:
                found = search_scale_parent(block.get_submodule(parent) if parent else block,
                                            [targets[n] for n in members], records, st.mean_abs, bits=config.bits,
                                            group_size=config.group_size, symmetric=config.symmetric,
                                            n_grid=config.n_grid, grid=layer_grid)
        if found is None:
            found = search_scale([linear_weight(targets[n]) for n in members], st.gram, st.mean_abs, bits=config.bits,
                                 group_size=config.group_size, symmetric=config.symmetric, n_grid=config.n_grid,
                                 grid=layer_grid)
        if found.alpha > 0:
            if not fold_input_scale(block, g, found.scale, calls[0]):
                why = f"folding into {g.producer} changed the block output"
                result.unscaled.setdefault(why, []).extend(prefix + n for n in members)
                continue
            st.rescale(found.scale)
        result.alphas[key] = found.alpha
    return result


@register(AWQ)
def apply_awq(model: nn.Module, config: AWQ, ctx: Context) -> None:
    """AWQ-quantize the selected Linear layers of every decoder block of ``model``, in place.

    Every weight is checked before anything changes (NaN/inf -> DataError naming the
    layer; with a streamed checkpoint, each block when it is loaded). Layers that received
    no calibration token fall back to plain RTN, groups whose scale cannot be folded stay
    unscaled, both with a note; a summary note gives the α chosen per group and the time.
    """
    if ctx.data is None:
        raise DataError("AWQ needs calibration data (data=CalibrationData...) to measure activation magnitudes")
    start = time.perf_counter()
    selected = select_modules(model, (LinearLike,), config.include, config.ignore)
    blocks_name, _ = find_blocks(model)
    prefix = blocks_name + "."
    per_block: dict[str, list[str]] = {}  # block name -> block-relative target names
    outside, skipped = [], []
    for name, module in selected:
        if not name.startswith(prefix):
            outside.append(name)
            continue
        reason = _skip_reason(module, config)
        if reason:
            skipped.append(f"AWQ: skipped {name}: {reason}")
            continue
        _check_finite(name, module)
        block_name = prefix + name[len(prefix):].split(".", 1)[0]
        per_block.setdefault(block_name, []).append(name[len(block_name) + 1:])

    alphas: dict[str, list[float]] = {}  # group (short names) -> α per block
    unscaled: dict[str, list[str]] = {}  # why -> group names
    no_tokens: list[str] = []
    counts = {"layers": 0, "params": 0}

    def process(b: BlockInputs) -> None:
        rels = per_block.get(b.name, [])
        if not rels:
            return
        targets = {rel: b.block.get_submodule(rel) for rel in rels}
        for rel, module in targets.items():
            _check_finite(f"{b.name}.{rel}", module)  # a streamed block is only readable now
        scaled = scale_block(b.block, b.calls, targets, config, b.name)
        no_tokens.extend(scaled.no_tokens)
        for why, names in scaled.unscaled.items():
            unscaled.setdefault(why, []).extend(names)
        for key, a in scaled.alphas.items():
            alphas.setdefault(key, []).append(a)
        for rel, module in targets.items():
            qw = _quantize(linear_weight(module), scaled.stats.get(rel), config, config.clip and clip_searched(rel))
            new = QuantLinear.from_linear(module, weight=qw)
            new.train(module.training)
            set_submodule(b.block, rel, new)
            counts["layers"] += 1
            counts["params"] += module.weight.numel()

    n_blocks = run_blockwise(model, ctx.data, process, ctx, "AWQ")
    elapsed = time.perf_counter() - start

    for line in skipped:
        ctx.note(line)
    if outside:
        ctx.note(f"AWQ: left float {len(outside)} Linear layer(s) outside the decoder blocks ({', '.join(outside)}); "
                 "use RTN for them")
    if no_tokens:
        ctx.note(f"AWQ: no calibration token reached {', '.join(no_tokens)}; quantized with plain RTN instead")
    for why, names in unscaled.items():
        ctx.note(f"AWQ: left unscaled ({why}): {', '.join(names)}")
    summary = "; ".join(f"{k} {min(v):.2f}-{max(v):.2f} (mean {sum(v) / len(v):.2f})" for k, v in alphas.items())
    scheme = "symmetric" if config.symmetric else "asymmetric"
    granularity = "per output channel" if config.group_size is None else f"group size {config.group_size}"
    per_m = elapsed / max(counts["params"] / 1e6, 1e-9)
    if config.grid is not None:
        scheme, granularity = f"GGUF {config.grid} grid", "llama.cpp's blocks (q4_k -> q5_0, q6_k -> q8_0 where rows do not split)"
    ctx.note(f"AWQ: quantized {counts['layers']} Linear layer(s) in {n_blocks} block(s) to "
             f"{config.grid if config.grid is not None else f'int{config.bits}'} "
             f"({scheme}, {granularity}, {config.objective} objective, "
             f"clip {'on (not q/k)' if config.clip else 'off'}, {config.method}); "
             f"best α per group: {summary or 'none searched'}; {elapsed:.1f} s ({per_m:.2f} s per million parameters)")

