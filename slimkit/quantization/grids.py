"""GGUF block grids: llama.cpp's weight formats as grids slimkit's quantizers round onto.

A grid fixes, for each row of a (rows, cols) weight, which values the codes may stand for.
RTN, GPTQ and AWQ normally use slimkit's min/max grid (``primitives.scale_zero_from_range``);
given a ``BlockGrid`` they choose the parameters llama.cpp's formats can hold, so exporting
the result to that GGUF type copies the codes and parameters without rounding anything again.

Every grid works on runs of ``span`` consecutive columns ("blocks"; K-quants' super-blocks);
inside a run, each ``group_size`` columns share one scale (and offset). fp16(x) below is
round-to-nearest-even to float16, the precision the file stores.

- q8_0: span = group = 32. d = fp16(max|x| / 127); codes round(x / d) in [-127, 127]; x̂ = d·q.
- q4_0: span = group = 32. m = the value of largest |x| (sign kept), d = fp16(m / -8), codes
  round(x / d) in [-8, 7]; x̂ = d·q. The extreme maps to -8 exactly, so d < 0 when m > 0.
- q5_0: as q4_0 with d = fp16(m / -16), codes in [-16, 15].
- q4_1: span = group = 32. lo = min(x, 0), hi = max(x, 0); d = fp16((hi - lo) / 15),
  b = fp16(lo); x̂ = d·q + b, codes round((x - b) / d) in [0, 15].
- q4_k: super-blocks of 256 columns, 8 groups of 32. Per group the min/max range (0 included)
  gives s_j = (hi - lo) / 15 and o_j = -lo; then D = fp16(max_j s_j / 63),
  M = fp16(max_j o_j / 63), sc_j = clamp(round(s_j / D), 1, 63) and m_j = clamp(round(o_j / M), 0, 63)
  (6-bit sub-scales); x̂ = D·sc_j·q − M·m_j, codes in [0, 15].
- q6_k: super-blocks of 256, 16 groups of 16. Per group t_j = (signed extreme) / -32; then
  D = fp16(max_j |t_j| / 127), sc_j = clamp(round(t_j / D), -127, 127) (never 0: ±1 at least);
  x̂ = D·sc_j·q, codes round(x / (D·sc_j)) in [-32, 31].

slimkit holds these as a ``QuantizedWeight``: per group ``scale`` = d (or D·sc_j) and, for the
offset grids (q4_1, q4_k), a float32 ``zero`` z = -b / d (or M·m_j / (D·sc_j)), so the usual
x̂ = (q − z)·s gives the same value up to float32 rounding. ``export.gguf_blocks`` recovers
(D, sc_j, M, m_j) from those numbers and checks them before copying.

A row whose length is not a multiple of ``span`` cannot use the grid; llama.cpp then writes
another type (q4_k -> q5_0, q6_k -> q8_0: ``fallback``), and so does slimkit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.errors import ConfigError, DataError
from slimkit.quantization.primitives import QuantizedWeight, code_dtype

QK_K = 256  # K-quant super-block length


def fp16_value(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 (ties to even), returned as float32; raises if it overflows."""
    h = x.float().to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise DataError("a block scale overflows float16 (|value| > 65504): the weights are too large for GGUF's "
                        "fp16 block scales")
    return h.float()


def signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """Per row of the last dim, the entry of largest magnitude with its sign (the first one on ties, as llama.cpp)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


@dataclass(frozen=True)
class BlockGrid:
    """One GGUF weight format seen as a quantization grid (see the module docstring for each rule)."""

    name: str
    bits: int
    group_size: int  # columns sharing a scale
    span: int  # columns whose parameters are chosen together (a block, or a K-quant super-block)
    symmetric: bool  # signed codes, no offset; else unsigned codes with a float offset per group
    qmin: int
    qmax: int
    fallback: str | None = None  # the grid llama.cpp uses for rows not a multiple of span

    @property
    def searchable(self) -> bool:
        """True for the grids with one scale per block and no offset (q8_0, q5_0, q4_0)."""
        return self.symmetric and self.span == self.group_size

    @property
    def float_zero(self) -> bool:
        """True when groups carry a fractional zero point (an offset the int grid cannot hold)."""
        return not self.symmetric

    def fits(self, cols: int) -> bool:
        """Whether a row of ``cols`` values splits into whole blocks of this grid."""
        return cols > 0 and cols % self.span == 0

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero of each group of ``w`` (rows, span): float32 (rows, span // group_size) each.

        ``zero`` is None for the symmetric grids. The caller sets pruned weights to 0 first
        when their zeros must count (0 is always inside the offset grids' range).
        """
        if w.dim() != 2 or w.shape[1] != self.span:
            raise ValueError(f"{self.name} parameters are chosen over {self.span} columns, got shape {tuple(w.shape)}")
        return _PARAMS[self.name](w.detach().float(), self)

    def quantize_codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Codes of ``w`` (..., group_size) against per-group ``scale``/``zero`` broadcast over the last dim."""
        x = w.float() / scale.float()
        if zero is not None:
            x = x + zero.float()
        return torch.round(x).clamp(self.qmin, self.qmax).to(code_dtype(self.symmetric, self.bits))

    def zero_code(self, zero: torch.Tensor | None) -> torch.Tensor | int:
        """The code nearest to the value 0 in each group (exactly 0 on the symmetric grids)."""
        if zero is None:
            return 0
        return torch.round(zero).clamp(self.qmin, self.qmax)

    def quantize(self, w: torch.Tensor, search: bool = False) -> QuantizedWeight:
        """Round-to-nearest quantization of a 2-D weight onto this grid, block by block.

        ``search`` (the one-scale grids q8_0, q5_0, q4_0): each block's scale is the one of
        ``mse_scale_search`` instead of llama.cpp's extreme-value rule (still a valid block).
        """
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise DataError("weight contains NaN or inf; quantization needs finite values")
        rows, cols = w.shape
        if not self.fits(cols):
            raise ConfigError(f"a row of {cols} values does not split into {self.name} blocks of {self.span}")
        wf = w.detach().float()
        blocks = wf.reshape(rows * (cols // self.span), self.span)
        scale, zero = self.params(blocks)
        if search:
            if not self.searchable:
                raise ConfigError(f"a scale search is offered on the one-scale grids (q8_0, q5_0, q4_0), not {self.name}")
            scale = mse_scale_search(blocks, scale, self)
        n = self.span // self.group_size
        g = blocks.reshape(-1, n, self.group_size)
        q = self.quantize_codes(g, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1))
        return QuantizedWeight(
            q=q.reshape(rows, cols),
            scale=scale.reshape(rows, cols // self.group_size).contiguous(),
            zero=None if zero is None else zero.reshape(rows, cols // self.group_size).contiguous(),
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
        )


SEARCH_FACTORS = torch.linspace(1.0, 0.7, 31)  # fractions of the extreme-value scale tried by the search


def mse_scale_search(blocks: torch.Tensor, scale: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Per block (rows of ``blocks``, (n, span)), the fp16 scale among fp16(``scale``·f), f in ``SEARCH_FACTORS``,
    whose rounding onto ``grid`` has the least squared error (the first on ties: f = 1, llama.cpp's own, when
    nothing is better). A smaller scale clips the extreme value but rounds the rest more finely."""
    x = blocks.float().unsqueeze(1)  # (n, 1, span)
    cand = fp16_value(scale.reshape(-1, 1) * SEARCH_FACTORS.unsqueeze(0))  # (n, F)
    cand = torch.where(cand != 0, cand, torch.ones_like(cand))
    q = torch.round(x / cand.unsqueeze(-1)).clamp(grid.qmin, grid.qmax)
    err = (q * cand.unsqueeze(-1) - x).pow(2).sum(-1)  # (n, F)
    best = err.argmin(dim=1, keepdim=True)  # argmin returns the first minimum
    return cand.gather(1, best).reshape(scale.shape)


def _nonzero_scale(d: torch.Tensor) -> torch.Tensor:
    """An all-zero block gets d = 1 (its codes are 0), never a 0 that quantizing would divide by."""
    return torch.where(d != 0, d, torch.ones_like(d))


def _params_q8_0(w: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, None]:
    d = fp16_value(w.abs().amax(dim=-1, keepdim=True) / 127.0)
    return _nonzero_scale(d), None


def _params_signed_extreme(w: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, None]:
    d = fp16_value(signed_extreme(w).unsqueeze(-1) / float(grid.qmin))  # m / -8 (q4_0), m / -16 (q5_0)
    return _nonzero_scale(d), None


def _params_q4_1(w: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0.0)
    d = _nonzero_scale(fp16_value((hi - lo) / grid.qmax))
    b = fp16_value(lo)
    return d, -b / d


def _params_q4_k(w: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
    rows = w.shape[0]
    n = grid.span // grid.group_size
    g = w.reshape(rows, n, grid.group_size)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    s = (hi - lo) / grid.qmax  # (rows, 8) sub-block scales before 6-bit rounding
    o = -lo  # offsets, >= 0
    D = _nonzero_scale(fp16_value(s.amax(dim=-1, keepdim=True) / 63.0))
    M = fp16_value(o.amax(dim=-1, keepdim=True) / 63.0)
    sc = torch.round(s / D).clamp(1, 63)
    m = torch.where(M > 0, torch.round(o / torch.where(M > 0, M, torch.ones_like(M))), torch.zeros_like(o)).clamp(0, 63)
    scale = D * sc  # exact in float32: 11-bit mantissa times a 6-bit integer
    offset = M * m
    return scale, offset / scale


def _params_q6_k(w: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, None]:
    rows = w.shape[0]
    n = grid.span // grid.group_size
    t = signed_extreme(w.reshape(rows, n, grid.group_size)) / float(grid.qmin)  # (rows, 16) signed scales
    D = _nonzero_scale(fp16_value(t.abs().amax(dim=-1, keepdim=True) / 127.0))
    sc = torch.round(t / D).clamp(-127, 127)
    sc = torch.where(sc == 0, torch.where(t < 0, -1.0, 1.0), sc)  # a 0 sub-scale would divide by zero
    return D * sc, None


_PARAMS = {"q8_0": _params_q8_0, "q4_0": _params_signed_extreme, "q5_0": _params_signed_extreme,
           "q4_1": _params_q4_1, "q4_k": _params_q4_k, "q6_k": _params_q6_k}

GRIDS: dict[str, BlockGrid] = {
    "q8_0": BlockGrid("q8_0", 8, 32, 32, True, -127, 127),
    "q5_0": BlockGrid("q5_0", 5, 32, 32, True, -16, 15),
    "q4_0": BlockGrid("q4_0", 4, 32, 32, True, -8, 7),
    "q4_1": BlockGrid("q4_1", 4, 32, 32, False, 0, 15),
    "q4_k": BlockGrid("q4_k", 4, 32, QK_K, False, 0, 15, fallback="q5_0"),
    "q6_k": BlockGrid("q6_k", 6, 16, QK_K, True, -32, 31, fallback="q8_0"),
}


def get_grid(name: str) -> BlockGrid:
    """The grid called ``name`` (ConfigError listing the known ones otherwise)."""
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}")
    return GRIDS[name]


def grid_for_columns(name: str, cols: int) -> BlockGrid:
    """The grid a row of ``cols`` values gets: ``name``'s, or its llama.cpp fallback when the row does not fit.

    Raises ConfigError when neither fits (the row is not a multiple of 32).
    """
    grid = get_grid(name)
    if grid.fits(cols):
        return grid
    if grid.fallback is not None and GRIDS[grid.fallback].fits(cols):
        return GRIDS[grid.fallback]
    raise ConfigError(f"a row of {cols} values fits no {name} block (blocks of {grid.span}"
                      + (f", fallback {grid.fallback} blocks of {GRIDS[grid.fallback].span}" if grid.fallback else "")
                      + "); GGUF block types need rows that are a multiple of 32")


def grid_problem(name: str, cols: int) -> str | None:
    """Why a layer of ``cols`` inputs cannot be quantized onto grid ``name`` (not even its fallback), or None."""
    try:
        grid_for_columns(name, cols)
    except ConfigError as exc:
        return str(exc)
    return None
