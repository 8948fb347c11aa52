"""Low-rank Conv2d: Tucker-2 (Kim et al. 2016) and CP (Lebedev et al. 2015) through tensorly.

A kernel K (C_out, C_in, kh, kw) is approximated by

- Tucker-2 on its two channel modes: K ≈ G ×₀ U_out ×₁ U_in with U_out (C_out, R_out),
  U_in (C_in, R_in), core G (R_out, R_in, kh, kw); run as 1×1 (C_in → R_in), kh×kw (R_in →
  R_out, the original stride / padding / dilation), 1×1 (R_out → C_out, the bias).
  Parameters C_in·R_in + R_out·R_in·kh·kw + R_out·C_out.
- CP of rank R: K[o, i, y, x] ≈ Σ_r λ_r A[o, r] B[i, r] V[y, r] H[x, r]; run as 1×1 (C_in → R),
  depthwise kh×1, depthwise 1×kw, 1×1 (R → C_out). Parameters R·(C_in + kh + kw + C_out).

The 1×1 convs keep the spatial size and the two others produce the original output size, so
per output pixel the MACs fall exactly as the parameters do (bias aside).

Ranks: by the rules of ``factorization.common`` (per channel mode for Tucker: ``rank_ratio`` of
each channel count, ``energy`` of each mode's unfolding, ``param_ratio`` with R_out / R_in in
the channels' proportion) or, for Tucker, ``vbmf``: the analytic empirical variational Bayesian
matrix factorization (Nakajima et al. 2013) of each unfolding, which estimates the noise level
and keeps the singular values above its threshold, as Kim et al. do.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.blockwise import check_finite
from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.core.registry import Context, register
from slimkit.core.targets import select_modules, set_submodule
from slimkit.factorization.allocation import LayerChoices, choose_by_budget
from slimkit.factorization.common import FactorizeRun, LowRankConfig
from slimkit.factorization.svd import rank_for_energy

# --- pure functions ------------------------------------------------------------------------


def _tensorly():
    try:
        import tensorly
        import tensorly.decomposition
    except ImportError:
        raise UnsupportedError("Tucker and CP need tensorly: pip install tensorly (or slimkit[factorize])") from None
    return tensorly


def unfold(kernel: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding of a 4-D kernel: (size of that mode, product of the others)."""
    return kernel.movedim(mode, 0).reshape(kernel.shape[mode], -1)


def tucker2_params(c_out: int, c_in: int, kh: int, kw: int, r_out: int, r_in: int) -> int:
    """Weights of a Tucker-2 factorized conv (no bias)."""
    return c_in * r_in + r_out * r_in * kh * kw + r_out * c_out


def cp_params(c_out: int, c_in: int, kh: int, kw: int, rank: int) -> int:
    """Weights of a CP factorized conv (no bias)."""
    return rank * (c_in + kh + kw + c_out)


def tucker2_factors(kernel: torch.Tensor, r_out: int, r_in: int, n_iter_max: int = 100
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_out (C_out, R_out), core (R_out, R_in, kh, kw), U_in (C_in, R_in)) by HOOI on modes 0 and 1, float64."""
    tl = _tensorly()
    c_out, c_in = kernel.shape[:2]
    if not (1 <= r_out <= c_out and 1 <= r_in <= c_in):
        raise ConfigError(f"Tucker ranks ({r_out}, {r_in}) must be in 1..{c_out} and 1..{c_in}")
    # The pytorch backend keeps the work on the kernel's device and under torch's thread count; numpy's
    # OpenBLAS threads ignore it, and on a busy 2-core machine made one digits-cnn HOOI take a minute, not 0.7 s.
    k = kernel.detach().double()
    with tl.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = tl.decomposition.partial_tucker(k, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                                   n_iter_max=n_iter_max, tol=1e-10)
    return u_out, core, u_in


def tucker2_kernel(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The kernel G ×₀ U_out ×₁ U_in the Tucker-2 factors stand for."""
    return torch.einsum("or,rsyx,is->oiyx", u_out, core, u_in)


def cp_factors(kernel: torch.Tensor, rank: int, n_iter_max: int = 200, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A·λ (C_out, R), B (C_in, R), V (kh, R), H (kw, R)) of a rank-``rank`` CP of the kernel, float64."""
    tl = _tensorly()
    k = kernel.detach().double()
    with tl.backend_context("pytorch"), warnings.catch_warnings():  # pytorch backend: see tucker2_factors
        # a rank above a mode's size: the SVD init fills the extra columns randomly (seeded), which is fine
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        cp = tl.decomposition.parafac(k, rank=rank, init="svd", n_iter_max=n_iter_max, tol=1e-10,
                                      normalize_factors=True, random_state=seed)
    a, b, v, h = cp.factors
    return a * cp.weights, b, v, h


def cp_kernel(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The kernel Σ_r a[:, r] ∘ b[:, r] ∘ v[:, r] ∘ h[:, r]."""
    return torch.einsum("or,ir,yr,xr->oiyx", a, b, v, h)


def _psi_tail(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The extra free energy of a component the EVB solution keeps (x above the threshold)."""
    tau = 0.5 * (x - (1 + alpha) + ((x - (1 + alpha)) ** 2 - 4 * alpha).clamp_min(0).sqrt())
    return torch.log(tau + 1) + alpha * torch.log(tau / alpha + 1) - tau


def evbmf_rank(matrix: torch.Tensor) -> int:
    """How many components the analytic empirical VB matrix factorization keeps (see ``evbmf``)."""
    return evbmf(matrix)[0]


def evbmf(matrix: torch.Tensor) -> tuple[int, float]:
    """(rank, noise variance σ²) of the analytic empirical VB matrix factorization (Nakajima et al. 2013).

    With L ≤ M the matrix's sides, α = L/M and singular values γ_h, the noise variance σ²
    minimises the free energy Σ_h ψ(γ_h² / (M σ²)), ψ(x) = x − ln x (+ the kept-component term
    above x̄ = (1 + τ̄)(1 + α/τ̄), τ̄ ≈ 2.5129 √α); the components with γ_h above
    √(M σ² x̄) are kept. σ² is searched (golden section on log σ²) between the paper's bounds.
    """
    y = matrix.detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    s2 = torch.linalg.svdvals(y).pow(2)
    if float(s2.sum()) == 0:
        return 0, 0.0
    upper = float(s2.sum()) / (rows * cols)
    # H̄, the largest rank the EVB solution can have; the noise floor comes from γ_{H̄+1} onwards (1-based),
    # i.e. s2[H̄:] here (0 <= H̄ <= rows - 1)
    h_bar = math.ceil(rows / (1 + alpha)) - 1
    lower = max(float(s2[h_bar]) / (cols * x_bar), float(s2[h_bar:].mean()) / cols, 1e-300)

    def free_energy(log_sigma2: float) -> float:
        x = s2 / (cols * math.exp(log_sigma2))
        energy = x - torch.log(x.clamp_min(1e-300))
        kept = x > x_bar
        energy[kept] += _psi_tail(x[kept], alpha)
        return float(energy.sum())

    lo, hi = math.log(lower), math.log(max(upper, lower))
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = free_energy(a), free_energy(b)
    for _ in range(100):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = free_energy(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = free_energy(b)
    sigma2 = math.exp((lo + hi) / 2)
    return int((s2 > cols * sigma2 * x_bar).sum()), sigma2


def tucker_ranks_for_params(c_out: int, c_in: int, kh: int, kw: int, ratio: float) -> tuple[int, int]:
    """The largest (R_out, R_in), in the channels' proportion, whose factors keep <= ``ratio`` of the weights.

    (1, 1) when even that holds more (the caller then skips the layer if it is no smaller than dense).
    """
    budget = ratio * c_out * c_in * kh * kw
    for r_out in range(c_out, 0, -1):
        r_in = max(1, round(r_out * c_in / c_out))
        if tucker2_params(c_out, c_in, kh, kw, r_out, r_in) <= budget:
            return r_out, r_in
    return 1, 1


def cp_rank_for_params(c_out: int, c_in: int, kh: int, kw: int, ratio: float) -> int:
    """The largest CP rank whose factors keep <= ``ratio`` of the weights (at least 1)."""
    return max(1, math.floor(ratio * c_out * c_in * kh * kw / (c_in + kh + kw + c_out)))


# --- the factorized layers -----------------------------------------------------------------


class _FactorizedConv(SlimkitModule):
    """Shared: the original conv's geometry, a forward through the children in order, the spec."""

    _children: tuple[str, ...] = ()

    def _geometry(self, conv_spec: dict[str, Any]) -> None:
        self.conv_spec = conv_spec
        self.in_channels, self.out_channels = conv_spec["in_channels"], conv_spec["out_channels"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._children:
            x = getattr(self, name)(x)
        return x

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``): the conv's geometry and the ranks."""
        return {**self.conv_spec, "ranks": list(self.ranks)}

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> _FactorizedConv:
        """An empty module of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        geometry = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "ranks"}
        return cls(geometry, *[int(r) for r in spec["ranks"]])

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, ranks={tuple(self.ranks)}"


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The construction arguments of a Conv2d that a factorization keeps."""
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": tuple(conv.kernel_size),
            "stride": tuple(conv.stride), "padding": tuple(conv.padding), "dilation": tuple(conv.dilation),
            "bias": conv.bias is not None}


@register_module_type
class TuckerConv2d(_FactorizedConv):
    """A Conv2d as Tucker-2: ``first`` 1×1 (C_in → R_in), ``core`` kh×kw (R_in → R_out), ``last`` 1×1 (+ bias)."""

    _children = ("first", "core", "last")

    def __init__(self, geometry: dict[str, Any], rank_out: int, rank_in: int) -> None:
        super().__init__()
        self._geometry(geometry)
        self.ranks = (rank_out, rank_in)
        g = geometry
        self.first = nn.Conv2d(g["in_channels"], rank_in, 1, bias=False)
        self.core = nn.Conv2d(rank_in, rank_out, g["kernel_size"], stride=g["stride"], padding=g["padding"],
                              dilation=g["dilation"], bias=False)
        self.last = nn.Conv2d(rank_out, g["out_channels"], 1, bias=g["bias"])

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank_out: int, rank_in: int) -> TuckerConv2d:
        """The Tucker-2 factorization of ``conv`` at ranks (R_out, R_in), on its device and dtype."""
        u_out, core, u_in = tucker2_factors(conv.weight, rank_out, rank_in)
        new = cls(conv_geometry(conv), rank_out, rank_in).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.first.weight.copy_(u_in.T[:, :, None, None])
            new.core.weight.copy_(core)
            new.last.weight.copy_(u_out[:, :, None, None])
            if conv.bias is not None:
                new.last.bias.copy_(conv.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The (C_out, C_in, kh, kw) kernel the factors multiply out to."""
        return tucker2_kernel(self.last.weight[:, :, 0, 0], self.core.weight, self.first.weight[:, :, 0, 0].T)


@register_module_type
class CPConv2d(_FactorizedConv):
    """A Conv2d as CP: ``first`` 1×1 (C_in → R), depthwise ``vertical`` kh×1 and ``horizontal`` 1×kw, ``last`` 1×1."""

    _children = ("first", "vertical", "horizontal", "last")

    def __init__(self, geometry: dict[str, Any], rank: int) -> None:
        super().__init__()
        self._geometry(geometry)
        self.ranks = (rank,)
        g = geometry
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel_size"], g["stride"], g["padding"], g["dilation"]
        self.first = nn.Conv2d(g["in_channels"], rank, 1, bias=False)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=rank,
                                  bias=False)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                                    groups=rank, bias=False)
        self.last = nn.Conv2d(rank, g["out_channels"], 1, bias=g["bias"])

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, n_iter_max: int = 200) -> CPConv2d:
        """The rank-``rank`` CP factorization of ``conv``, on its device and dtype."""
        a, b, v, h = cp_factors(conv.weight, rank, n_iter_max)
        new = cls(conv_geometry(conv), rank).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.first.weight.copy_(b.T[:, :, None, None])
            new.vertical.weight.copy_(v.T[:, None, :, None])
            new.horizontal.weight.copy_(h.T[:, None, None, :])
            new.last.weight.copy_(a[:, :, None, None])
            if conv.bias is not None:
                new.last.bias.copy_(conv.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The (C_out, C_in, kh, kw) kernel the factors multiply out to."""
        return cp_kernel(self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0].T,
                         self.vertical.weight[:, 0, :, 0].T, self.horizontal.weight[:, 0, 0, :].T)


# --- configs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ConvConfig(LowRankConfig):
    """Shared: Conv2d selection; convs with fewer than ``min_channels`` input or output channels are skipped."""

    min_channels: int = 4

    def validate(self) -> None:
        """The rank rule and selection (LowRankConfig) plus min_channels."""
        super().validate()
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 1:
            self.fail("min_channels", f"must be a positive integer, got {self.min_channels!r}")


@dataclass(frozen=True)
class Tucker(_ConvConfig):
    """Tucker-2 of Conv2d layers (1×1, kh×kw core, 1×1). A rank rule of ``LowRankConfig`` or ``vbmf: true``.

    ``rank`` sets R_out = R_in; ``rank_ratio`` and ``energy`` apply to each channel mode;
    ``param_ratio`` / ``budget`` keep that share of the weights. ``vbmf``: ranks estimated by
    EVBMF on each mode's unfolding (Kim et al. 2016). The first conv of a network (one or three
    input channels) is skipped by ``min_channels``: its 1×1 factor could save nothing.
    """

    extra_rules = ("vbmf",)

    vbmf: bool = False

    def validate(self) -> None:
        """Exactly one rank rule (vbmf counts as one) and valid settings."""
        if not isinstance(self.vbmf, bool):
            self.fail("vbmf", f"must be true or false, got {self.vbmf!r}")
        super().validate()


@dataclass(frozen=True)
class CP(_ConvConfig):
    """CP of Conv2d layers (1×1, depthwise kh×1, depthwise 1×kw, 1×1); rank / rank_ratio / param_ratio / budget.

    ``rank_ratio`` is of min(C_out, C_in). CP has no nested spectrum, so ``energy`` is refused.
    n_iter_max: ALS iterations of tensorly's ``parafac`` (SVD init, fixed seed).
    """

    n_iter_max: int = 200

    def validate(self) -> None:
        """The rank rule without energy, and n_iter_max."""
        super().validate()
        if self.energy:
            self.fail("energy", "CP has no nested spectrum to keep a share of; use rank, rank_ratio, param_ratio or "
                                "budget")
        if isinstance(self.n_iter_max, bool) or not isinstance(self.n_iter_max, int) or self.n_iter_max < 1:
            self.fail("n_iter_max", f"must be a positive integer, got {self.n_iter_max!r}")


# --- handlers ------------------------------------------------------------------------------


def _conv_candidates(model: nn.Module, config: _ConvConfig, run: FactorizeRun) -> list[tuple[str, nn.Conv2d]]:
    from torch.nn.utils import parametrize

    factor_children = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, _FactorizedConv)
                       for c in m._children}
    selected = select_modules(model, (nn.Conv2d,), config.include, config.ignore)
    if not selected:
        raise UnsupportedError(f"{type(config).__name__} factorizes Conv2d layers and {type(model).__name__} has none "
                               "selected; use SVD for Linear layers")
    chosen = []
    for name, conv in selected:
        kh, kw = conv.kernel_size
        if name in factor_children:
            continue
        if parametrize.is_parametrized(conv) or hasattr(conv, "weight_orig"):
            run.skip(name, "its weight is masked (pruning); strip the mask first")
        elif type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
            run.skip(name, "only plain Conv2d layers with groups=1 and zero padding are factorized")
        elif kh * kw == 1:
            run.skip(name, "a 1x1 conv is a matrix: factorize it with SVD")
        elif min(conv.in_channels, conv.out_channels) < config.min_channels:
            run.skip(name, f"too small to gain: {conv.in_channels} -> {conv.out_channels} channels, below "
                           f"min_channels {config.min_channels}")
        else:
            check_finite(name, conv)
            chosen.append((name, conv))
    return chosen


def _dense(conv: nn.Conv2d) -> int:
    return conv.weight.numel()


def _break_even_rank(conv: nn.Conv2d, label: str) -> int:
    """The largest fixed ``rank`` (R_out = R_in for Tucker) whose factors are smaller than the dense kernel (0: none)."""
    c_out, c_in, kh, kw = conv.weight.shape
    if label == "CP":
        return (_dense(conv) - 1) // (c_in + kh + kw + c_out)
    return max((r for r in range(1, min(c_out, c_in) + 1) if tucker2_params(c_out, c_in, kh, kw, r, r) < _dense(conv)),
               default=0)


def _tucker_ranks(conv: nn.Conv2d, config: Tucker) -> tuple[int, int]:
    c_out, c_in, kh, kw = conv.weight.shape
    rule = config.rule()
    if rule == "rank":
        return config.rank, config.rank
    if rule == "rank_ratio":
        return max(1, math.floor(config.rank_ratio * c_out)), max(1, math.floor(config.rank_ratio * c_in))
    if rule == "param_ratio":
        return tucker_ranks_for_params(c_out, c_in, kh, kw, config.param_ratio)
    w = conv.weight.detach()
    if rule == "energy":
        return tuple(rank_for_energy(torch.linalg.svdvals(unfold(w.double(), m)), config.energy) for m in (0, 1))
    return tuple(max(1, evbmf_rank(unfold(w, m))) for m in (0, 1))  # vbmf


def _cp_rank(conv: nn.Conv2d, config: CP) -> int:
    c_out, c_in, kh, kw = conv.weight.shape
    rule = config.rule()
    if rule == "rank":
        return config.rank
    if rule == "rank_ratio":
        return max(1, math.floor(config.rank_ratio * min(c_out, c_in)))
    return cp_rank_for_params(c_out, c_in, kh, kw, config.param_ratio)


def _apply_conv(model: nn.Module, config: _ConvConfig, ctx: Context, label: str, ranks_of, params_of, build,
                ranks_for_ratio) -> None:
    start = time.perf_counter()
    run = FactorizeRun(label)
    chosen = _conv_candidates(model, config, run)
    if config.rule() == "rank":
        for name, conv in chosen:
            c_out, c_in = conv.out_channels, conv.in_channels
            if label == "Tucker" and config.rank > min(c_out, c_in):
                raise ConfigError(f"Tucker.rank: {config.rank} is above the channels of {name} ({c_in} -> {c_out}); "
                                  "lower it or ignore the layer")
            if params_of(conv, ranks_of(conv, config)) >= _dense(conv) and not config.force:
                raise ConfigError(f"{label}.rank: {config.rank} makes {name} no smaller than dense "
                                  f"({params_of(conv, ranks_of(conv, config)):,} >= {_dense(conv):,} weights; its "
                                  f"break-even rank is {_break_even_rank(conv, label)}); lower the rank, ignore the "
                                  "layer, or set force: true")
    if config.rule() == "budget":
        layers = [LayerChoices(name, _dense(conv),
                               [(r, params_of(conv, r), lambda c=conv, r=r: build(c, r, config))
                                for r in sorted({ranks_for_ratio(conv, g) for g in config.sensitivity_grid})])
                  for name, conv in chosen]
        picked = choose_by_budget(model, layers, config.budget, ctx.data, config.sensitivity_batches, ctx, label)
        plan = [(name, conv, picked[name]) for name, conv in chosen if name in picked]
        if len(plan) < len(chosen):
            run.notes.append(f"{label}: {len(chosen) - len(plan)} conv(s) kept dense, the budget was met without them")
    else:
        plan = [(name, conv, ranks_of(conv, config)) for name, conv in chosen]
    for name, conv, ranks in plan:
        params = params_of(conv, ranks)
        if params >= _dense(conv) and not config.force:
            run.skip(name, f"ranks {ranks} from {config.rule()} would hold {params:,} weights, no fewer than the "
                           f"dense {_dense(conv):,}")
            continue
        set_submodule(model, name, build(conv, ranks, config))
        run.record(name, ranks, _dense(conv), params)
    rule = config.rule()
    run.finish(ctx, time.perf_counter() - start, rule if rule == "vbmf" else f"{rule} {getattr(config, rule)}")


@register(Tucker)
def apply_tucker(model: nn.Module, config: Tucker, ctx: Context) -> None:
    """Replace the selected Conv2d layers of ``model`` by ``TuckerConv2d``, in place."""
    _tensorly()
    _apply_conv(model, config, ctx, "Tucker", _tucker_ranks,
                lambda conv, r: tucker2_params(*conv.weight.shape, *r),
                lambda conv, r, cfg: TuckerConv2d.from_conv(conv, *r),
                lambda conv, g: tucker_ranks_for_params(*conv.weight.shape, g))


@register(CP)
def apply_cp(model: nn.Module, config: CP, ctx: Context) -> None:
    """Replace the selected Conv2d layers of ``model`` by ``CPConv2d``, in place."""
    _tensorly()
    _apply_conv(model, config, ctx, "CP", _cp_rank,
                lambda conv, r: cp_params(*conv.weight.shape, r),
                lambda conv, r, cfg: CPConv2d.from_conv(conv, r, cfg.n_iter_max),
                lambda conv, g: cp_rank_for_params(*conv.weight.shape, g))

