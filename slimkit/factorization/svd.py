"""Low-rank factorization of a Linear weight: the maths (pure functions), for issue 7.

W is (out, in), a Linear's weight; it is replaced by two factors A (out, r) and B (r, in),
i.e. two smaller Linear layers x -> B x -> A (B x). A rank-r factorization has r·(out + in)
parameters, so it is smaller only for r < out·in / (out + in) (``break_even_rank``).

- Plain truncated SVD: W = U Σ Vᵀ, A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ — the best rank-r
  approximation of W in Frobenius norm (Eckart–Young), blind to the inputs.
- Activation-aware, whitened (SVD-LLM, Wang et al. 2024): minimise the *output* error
  ‖(W − W') Xᵀ‖_F over calibration inputs X (tokens, in). With G = XᵀX = L Lᵀ (Cholesky,
  L lower), ‖(W − W') Xᵀ‖²_F = ‖(W − W') L‖²_F, so truncate the SVD of W L = U Σ Vᵀ and map
  back: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ L⁻¹. A singular G (dead or duplicate input features)
  is regularised by adding λ·mean(diag G)·I, λ raised until the Cholesky succeeds.
- Activation-aware, scaled (ASVD, Yuan et al. 2023): S = diag(mean|X_j|^α); truncate W S,
  then B ← B S⁻¹.

The pure functions come first; then ``FactorizedLinear`` (the two-Linear replacement that
checkpoints rebuild), the ``SVD`` config and its handler, which collects the calibration
statistics of every selected layer in one pass over the data, picks each layer's rank by the
config's rule (``factorization.common``; a ``budget`` by measured sensitivity,
``factorization.allocation``) and swaps the layers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.blockwise import check_finite
from slimkit.core.calibration import _model_device, _to, run_model, trim_padding
from slimkit.core.errors import ConfigError, DataError
from slimkit.core.linear_like import LinearLike, as_linear, linear_problem, linear_shape
from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.core.registry import Context, register
from slimkit.core.targets import select_modules, set_submodule
from slimkit.factorization.allocation import LayerChoices, choose_by_budget
from slimkit.factorization.common import FactorizeRun, LowRankConfig


@dataclasses.dataclass(frozen=True)
class LowRankFactors:
    """W ≈ a @ b: ``a`` (out, rank), ``b`` (rank, in); ``damping`` is the λ a whitened factorization needed (0 if none)."""

    a: torch.Tensor
    b: torch.Tensor
    damping: float = 0.0

    @property
    def rank(self) -> int:
        """The inner dimension r."""
        return self.a.shape[1]


def break_even_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense (out, in) matrix (0 if none)."""
    dense = out_features * in_features
    return max(0, (dense - 1) // (out_features + in_features))


def rank_for_param_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The rank whose factors keep about ``ratio`` of the dense parameters (at least 1): r = ⌊ratio·mn/(m+n)⌋."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"parameter ratio must be in (0, 1], got {ratio!r}")
    return max(1, math.floor(ratio * out_features * in_features / (out_features + in_features)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose top singular values hold ``energy`` of Σ s² (0 < energy <= 1)."""
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    s2 = singular_values.double().pow(2)
    total = s2.sum()
    if total == 0:
        return 1
    cumulative = torch.cumsum(s2, 0) / total
    # The small tolerance keeps energy=1.0 from demanding rounding noise in the tail.
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


def _check_rank(rank: int, weight: torch.Tensor) -> None:
    full = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"rank must be an integer in 1..{full} for a {tuple(weight.shape)} weight, got {rank!r}")


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """The SVD U Σ Vᵀ of W·T (float64), from which factors of any rank are sliced.

    T is I (plain), the Cholesky factor L of XᵀX (whitened) or diag(s) (scaled); the right
    factor is mapped back by T⁻¹. ``damping`` is the λ the Cholesky factor needed.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    dtype: torch.dtype
    lower: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    damping: float = 0.0

    @property
    def full_rank(self) -> int:
        """min(out, in): the largest rank there is."""
        return self.s.shape[0]

    def factors(self, rank: int) -> LowRankFactors:
        """The rank-``rank`` factors A (out, r), B (r, in) in the weight's dtype."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.full_rank:
            raise ConfigError(f"rank must be an integer in 1..{self.full_rank}, got {rank!r}")
        root = self.s[:rank].sqrt()
        a, b = self.u[:, :rank] * root, root[:, None] * self.vh[:rank]
        if self.lower is not None:
            # b · L⁻¹ by a triangular solve (Lᵀ bᵀ' = bᵀ), never an explicit inverse.
            b = torch.linalg.solve_triangular(self.lower.T, b.T, upper=True).T
        if self.scale is not None:
            b = b / self.scale
        return LowRankFactors(a.to(self.dtype), b.to(self.dtype), self.damping)


def plain_spectrum(weight: torch.Tensor) -> Spectrum:
    """The SVD of ``weight`` itself (computed in float64)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return Spectrum(u, s, vh, weight.dtype)


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor) -> Spectrum:
    """SVD-LLM: the SVD of W·L with L Lᵀ = ``gram`` (XᵀX, in × in), damped when singular."""
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise DataError(f"Gram matrix {tuple(gram.shape)} does not match the weight's {weight.shape[1]} inputs")
    lower, damping = gram_cholesky(gram)
    u, s, vh = torch.linalg.svd(weight.detach().double() @ lower, full_matrices=False)
    return Spectrum(u, s, vh, weight.dtype, lower=lower, damping=damping)


def scaled_spectrum(weight: torch.Tensor, mean_abs_input: torch.Tensor, alpha: float = 0.5) -> Spectrum:
    """ASVD: the SVD of W·diag(s), s_j = mean|X_j|^alpha."""
    if mean_abs_input.shape != (weight.shape[1],):
        raise DataError(f"input statistics {tuple(mean_abs_input.shape)} do not match the weight's {weight.shape[1]} inputs")
    s_in = mean_abs_input.detach().double().clamp_min(1e-8).pow(alpha)  # a dead input gets a tiny, finite scale
    u, s, vh = torch.linalg.svd(weight.detach().double() * s_in, full_matrices=False)
    return Spectrum(u, s, vh, weight.dtype, scale=s_in)


def truncated_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Plain truncated SVD: the best rank-``rank`` approximation of ``weight`` (computed in float64)."""
    _check_rank(rank, weight)
    return plain_spectrum(weight).factors(rank)


def gram_cholesky(gram: torch.Tensor, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of ``gram`` (= XᵀX), damped by λ·mean(diag)·I when needed; returns (L, λ).

    λ starts at 0, then 1e-6 and grows 10× per failure; DataError after ``max_tries``.
    """
    g = gram.detach().double()
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise DataError(f"a Gram matrix must be square, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise DataError("the activation Gram matrix holds NaN or inf: check the calibration data")
    scale = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    damping = 0.0
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(g + damping * scale * eye)
        if int(info) == 0:
            return factor, damping
        damping = 1e-6 * 10**attempt
    raise DataError(f"the activation Gram matrix is not positive definite even with damping {damping:g}: "
                    "the layer's inputs are degenerate; use more calibration data or plain SVD")


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRankFactors:
    """SVD-LLM: the rank-``rank`` W' minimising ‖(W − W') Xᵀ‖_F, from ``gram`` = XᵀX (in × in)."""
    _check_rank(rank, weight)
    return whitened_spectrum(weight, gram).factors(rank)


def scaled_svd(weight: torch.Tensor, mean_abs_input: torch.Tensor, rank: int, alpha: float = 0.5) -> LowRankFactors:
    """ASVD: truncate W·diag(s) with s_j = mean|X_j|^alpha, then undo the scale on the right factor."""
    _check_rank(rank, weight)
    return scaled_spectrum(weight, mean_abs_input, alpha).factors(rank)


def accumulate_input_stats(stats: dict[str, Any] | None, x: torch.Tensor, gram: bool = True) -> dict[str, Any]:
    """Add a batch of layer inputs ``x`` (..., in) to running float64 sums: XᵀX, Σ|x| and the token count."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    if stats is None:
        stats = {"abs_sum": torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), "tokens": 0}
        if gram:
            stats["gram"] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    if gram:
        stats["gram"].addmm_(x.T, x)
    stats["abs_sum"].add_(x.abs().sum(0))
    stats["tokens"] += x.shape[0]
    return stats


def round_rank(rank: int, multiple: int) -> int:
    """``rank`` rounded down to a multiple of ``multiple`` (kept when below one multiple)."""
    return rank if rank < multiple else rank - rank % multiple


# --- the factorized layer ------------------------------------------------------------------


@register_module_type
class FactorizedLinear(SlimkitModule):
    """A Linear (out, in) stored as two: ``first`` (in -> rank, no bias) then ``second`` (rank -> out, bias).

    y = second(first(x)) = A (B x) + bias with B = first.weight, A = second.weight. Both are
    plain ``nn.Linear`` layers, so a later step (quantization, say) and the ONNX export see
    two ordinary MatMuls. ``weight`` (the product A·B) and ``bias`` are read-only views for
    code that reads a Linear's tensors instead of calling it (``nn.MultiheadAttention``'s
    out_proj, ``nn.TransformerEncoderLayer``'s fast path); nothing extra is stored.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factors: LowRankFactors, bias: torch.Tensor | None) -> FactorizedLinear:
        """The layer computing ``factors.a @ factors.b`` (+ ``bias``), on the factors' device and dtype."""
        a, b = factors.a, factors.b
        new = cls(b.shape[1], a.shape[0], factors.rank, bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            new.first.weight.copy_(b)
            new.second.weight.copy_(a)
            if bias is not None:
                new.second.bias.copy_(bias.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight the two factors multiply out to."""
        return self.second.weight @ self.first.weight

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) product of the factors in their dtype, recomputed on each access (not stored)."""
        return self.dense_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias (``second``'s), or None."""
        return self.second.bias

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``): the rank is recorded here."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> FactorizedLinear:
        """An empty FactorizedLinear of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        return cls(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]), bias=bool(spec["bias"]))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# --- config --------------------------------------------------------------------------------

WHITENINGS = ("cholesky", "scale")


@dataclass(frozen=True)
class SVD(LowRankConfig):
    """Low-rank factorization of Linear layers: W (out, in) -> two Linears through ``rank`` features.

    Rank rule: exactly one of rank / rank_ratio / param_ratio / energy / budget
    (``factorization.common``). activation_aware: truncate so that the layer's *output* on
    the calibration inputs changes least, not its weight: whitening "cholesky" is SVD-LLM
    (exact for the Frobenius output error), "scale" is ASVD (diag(mean|x|^alpha)). Needs
    calibration data, as does ``budget``. rank_multiple: round the ranks a relative rule picks
    down to a multiple of this (8 or 16 suits CPU matmul kernels). include / ignore: module
    name patterns (default every Linear). A layer whose weight is tied to another module
    (e.g. lm_head and the embeddings) is skipped: factorizing it would untie and grow it.
    """

    activation_aware: bool = False
    whitening: str = "cholesky"
    alpha: float = 0.5
    rank_multiple: int = 1

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Calibration data is needed when activation-aware or allocating a budget."""
        return self.activation_aware or self.budget > 0

    def validate(self) -> None:
        """The rank rule (see LowRankConfig) plus the SVD settings."""
        super().validate()
        if not isinstance(self.activation_aware, bool):
            self.fail("activation_aware", f"must be true or false, got {self.activation_aware!r}")
        if self.whitening not in WHITENINGS:
            self.fail("whitening", f"must be one of {', '.join(WHITENINGS)}, got {self.whitening!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 2:
            self.fail("alpha", f"must be a number in (0, 2], got {self.alpha!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            self.fail("rank_multiple", f"must be a positive integer, got {self.rank_multiple!r}")


# --- handler -------------------------------------------------------------------------------


def _candidates(model: nn.Module, config: SVD, run: FactorizeRun) -> list[tuple[str, nn.Linear]]:
    """The selected Linear-like layers that can be factorized, as exact nn.Linear views; the others are skipped.

    Linear-like (``core.linear_like``): nn.Linear, subclasses computing x·Wᵀ + b
    (FalconLinear) and transformers' Conv1D, the last two handed on as ``as_linear`` (a
    plain Linear of the same (out, in) weight) so the factorization sees one layout.
    """
    from torch.nn.utils import parametrize

    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    factor_children = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, FactorizedLinear)
                       for c in ("first", "second")}
    chosen = []
    for name, module in select_modules(model, (LinearLike,), config.include, config.ignore):
        if name in factor_children:
            continue  # already a factor: factorizing it again cannot gain (its rank is already below break-even)
        if parametrize.is_parametrized(module):
            run.skip(name, "its weight is parametrized (a pruning mask?); call slimkit.strip(model) first")
        elif (problem := linear_problem(module, "a FactorizedLinear")) is not None:
            run.skip(name, problem)
        elif module.weight.is_meta:
            run.skip(name, "its weight is not loaded (meta)")
        elif uses.get(id(module.weight), 0) > 1:
            run.skip(name, "its weight is tied to another module; factorizing it would untie it and add parameters")
        elif break_even_rank(*linear_shape(module)) < 1:
            out_f, in_f = linear_shape(module)
            run.skip(name, f"too small to gain: a {out_f}x{in_f} weight is no larger than any rank-1 factorization")
        else:
            check_finite(name, module)
            chosen.append((name, as_linear(module)))
    return chosen


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], data: Any, gram: bool) -> dict[str, dict[str, Any]]:
    """Per named layer, the float64 sums of ``accumulate_input_stats`` over every calibration batch (one pass).

    Where a batch has an ``attention_mask`` matching the layer input's (batch, tokens), the
    padding positions are left out.
    """
    stats: dict[str, dict[str, Any]] = {}
    padding: list[torch.Tensor | None] = [None]  # the current batch's attention mask

    def hook_for(name: str):
        def hook(_module, args):
            x, mask = args[0], padding[0]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]  # padding tokens are not inputs the layer must reproduce
            stats[name] = accumulate_input_stats(stats.get(name), x, gram)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            batch = trim_padding(_to(batch, device))
            padding[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _spectrum(name: str, linear: nn.Linear, config: SVD, stats: dict[str, dict[str, Any]],
              run: FactorizeRun) -> Spectrum:
    if not config.activation_aware:
        return plain_spectrum(linear.weight)
    layer_stats = stats.get(name)
    if layer_stats is None or layer_stats["tokens"] == 0:
        run.notes.append(f"SVD: {name} received no calibration inputs; plain SVD used")
        return plain_spectrum(linear.weight)
    if config.whitening == "scale":
        return scaled_spectrum(linear.weight, layer_stats["abs_sum"] / layer_stats["tokens"], config.alpha)
    spectrum = whitened_spectrum(linear.weight, layer_stats["gram"])
    if spectrum.damping:
        run.notes.append(f"SVD: the input covariance of {name} is singular (dead or duplicate features); "
                         f"regularised with {spectrum.damping:g} x its mean diagonal")
    return spectrum


def _rank_by_rule(linear: nn.Linear, spectrum: Spectrum, config: SVD) -> int:
    out, inp = linear.out_features, linear.in_features
    rule = config.rule()
    if rule == "rank":
        return config.rank
    if rule == "rank_ratio":
        rank = max(1, math.floor(config.rank_ratio * spectrum.full_rank))
    elif rule == "param_ratio":
        rank = rank_for_param_ratio(out, inp, config.param_ratio)
    else:
        rank = rank_for_energy(spectrum.s, config.energy)
    return round_rank(rank, config.rank_multiple)


def _check_fixed_rank(chosen: list[tuple[str, nn.Linear]], config: SVD) -> None:
    for name, linear in chosen:
        full, even = min(linear.out_features, linear.in_features), break_even_rank(linear.out_features,
                                                                                  linear.in_features)
        if config.rank > full:
            raise ConfigError(f"SVD.rank: {config.rank} is above the full rank {full} of {name} "
                              f"({linear.out_features}x{linear.in_features}); ignore it or lower the rank")
        if config.rank > even and not config.force:
            raise ConfigError(f"SVD.rank: {config.rank} is above the break-even rank {even} of {name}: its two "
                              "factors would hold more parameters than the dense layer; lower the rank, ignore "
                              "the layer, or set force: true")


def _replace(model: nn.Module, name: str, linear: nn.Linear, spectrum: Spectrum, rank: int, run: FactorizeRun) -> None:
    factors = spectrum.factors(rank)
    set_submodule(model, name, FactorizedLinear.from_factors(factors, linear.bias))
    run.record(name, rank, linear.weight.numel(), rank * (linear.in_features + linear.out_features))


@register(SVD)
def apply_svd(model: nn.Module, config: SVD, ctx: Context) -> None:
    """Replace the selected Linear layers of ``model`` by ``FactorizedLinear`` pairs, in place."""
    start = time.perf_counter()
    label = "SVD"
    run = FactorizeRun(label)
    chosen = _candidates(model, config, run)
    if config.rule() == "rank":
        _check_fixed_rank(chosen, config)
    if config.needs_data and ctx.data is None:
        raise DataError("SVD with activation_aware or a budget needs calibration data (data=CalibrationData..., "
                        "or a recipe 'calibration' section)")
    stats = {}
    if config.activation_aware and chosen:
        stats = collect_input_stats(model, [n for n, _ in chosen], ctx.data, gram=config.whitening == "cholesky")
    spectra = {name: _spectrum(name, linear, config, stats, run) for name, linear in chosen}
    if config.rule() == "budget":
        layers = []
        for name, linear in chosen:
            spectrum, bias = spectra[name], linear.bias
            ranks = sorted({round_rank(rank_for_param_ratio(linear.out_features, linear.in_features, g),
                                       config.rank_multiple) for g in config.sensitivity_grid})
            options = [(r, r * (linear.in_features + linear.out_features),
                        lambda s=spectrum, r=r, b=bias: FactorizedLinear.from_factors(s.factors(r), b)) for r in ranks]
            layers.append(LayerChoices(name, linear.weight.numel(), options))
        ranks = choose_by_budget(model, layers, config.budget, ctx.data, config.sensitivity_batches, ctx, label)
        dense = [name for name, _ in chosen if name not in ranks]
        for name, linear in chosen:
            if name in ranks:
                _replace(model, name, linear, spectra[name], ranks[name], run)
        if dense:
            run.notes.append(f"{label}: {len(dense)} layer(s) kept dense, the budget was met without them: "
                             + ", ".join(dense))
    else:
        for name, linear in chosen:
            rank = _rank_by_rule(linear, spectra[name], config)
            even = break_even_rank(linear.out_features, linear.in_features)
            if rank > even and not config.force:
                run.skip(name, f"rank {rank} from {config.rule()} is above its break-even rank {even}: the "
                               "factors would be no smaller")
                continue
            _replace(model, name, linear, spectra[name], rank, run)
    kind = "activation-aware, " + ("SVD-LLM whitening" if config.whitening == "cholesky" else
                                   f"ASVD scaling alpha {config.alpha:g}") if config.activation_aware else "plain"
    run.finish(ctx, time.perf_counter() - start, f"{kind}, {config.rule()} {getattr(config, config.rule()):g}")
