"""Integer matmul kernels for QuantLinear, taken per layer only where measured to win on this machine.

QuantLinear's reference forward dequantizes its weight on every call (exact, and what every
kernel here is tested against). PyTorch ships real integer kernels for some layouts:

- ``int8pack``: ``aten._weight_int8pack_mm`` — int8 weight-only, one scale per output
  channel (symmetric, no groups), float activations;
- ``int4pack``: ``aten._weight_int4pack_mm_for_cpu`` — 4-bit group-wise (group 32..256,
  symmetric or with a zero point), the codes repacked once into torch's tiled layout;
- ``int_mm``: ``torch._int_mm`` — W8A8: int8 activations quantized at run time (per token,
  per tensor, or with the layer's static scale) times int8 weights, int32 accumulation.

- ``blocked``: not an integer kernel but a faster exact path for many rows: the weight is
  dequantized a block of output rows at a time (4-bit codes unpacked by shift-and-mask into a
  reused buffer, scale and zero applied in place) and multiplied while the block is still in cache. Its
  output is the reference's in fp32; it exists because dequantizing the whole weight on
  every call costs 2–7× an fp32 prefill for int4.

Whether a path is faster depends on the ISA, the shape and the number of rows. Measured on
an AMD EPYC with AVX-512 VNNI + BF16 (2 threads, 4096×4096), ``int8pack`` at one row takes
0.12× the fp32 ``F.linear`` time with bf16 activations but 2.5× with fp32 activations; on
an AMD EPYC with AVX2 only, bf16 activations give 0.24× (int8pack) and 0.36× (int4pack) at
one row, fp32 activations 4.7× and 4.9×, and at 256 rows every integer kernel loses to
fp32 (≥ 1.9×) while ``blocked`` comes within 1.0–1.3×. So nothing is assumed: the first
time a layer of a given layout runs (or ``prepare_kernels`` is called), each fitting path
is timed against the reference on this machine at one row (decode) and at
``PREFILL_ROWS`` rows (prefill), its output is checked against the reference, and the
fastest path per regime is kept (it must beat the reference by ``MIN_GAIN``). The timings
are cached per layout, ISA and thread count for the life of the process.

Integer kernels are offered with bf16 activations on every CPU (first where the CPU
computes bf16 in hardware, AVX512_BF16 / AMX) and with fp32 activations: bf16 rounds each
input to 8 significant bits, which the agreement check bounds (2% relative) and the
report's measured quality includes. ``SLIMKIT_KERNELS`` (or ``set_kernel_policy``):
``auto`` (default, measured), ``reference`` (never a kernel), ``force`` (the first fitting
integer kernel with fp32 activations, unmeasured: for tests on machines where kernels lose).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from slimkit.core.errors import ConfigError
from slimkit.core.machine import cpu_isa, has_native_bf16
from slimkit.core.measure import fastest_ms
from slimkit.quantization.primitives import quantize, scale_zero_from_range

POLICIES = ("auto", "reference", "force")
PREFILL_ROWS = 256  # rows of the prefill probe (the reports' 1×256 prefill); decode is probed at one row
SCREEN_ROWS = 64  # prefill paths are first timed once here; those within SCREEN_SLACK of the best go on to 256
SCREEN_SLACK = 2.0
SMALL_ROWS = 16  # inputs with at most this many rows take the decode-regime choice
MIN_GAIN = 0.9  # a kernel must take at most this fraction of the reference's time
INT4_GROUPS = (32, 64, 128, 256)  # group sizes aten's CPU int4 kernel takes

_policy = os.environ.get("SLIMKIT_KERNELS", "auto")
_probe_cache: dict[tuple, LayerPlan] = {}


def set_kernel_policy(policy: str) -> None:
    """Choose how QuantLinear runs: 'auto' (measured kernels), 'reference' (always dequantize), 'force'."""
    global _policy
    if policy not in POLICIES:
        raise ConfigError(f"kernel policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    _policy = policy


def kernel_policy_name() -> str:
    """The policy in force ('auto' unless set by ``SLIMKIT_KERNELS`` or ``set_kernel_policy``)."""
    return _policy if _policy in POLICIES else "auto"


@contextlib.contextmanager
def kernel_policy(policy: str) -> Iterator[None]:
    """Run a block under ``policy`` and restore the previous one."""
    before = _policy
    set_kernel_policy(policy)
    try:
        yield
    finally:
        set_kernel_policy(before if before in POLICIES else "auto")


# --- the maths: pure functions -----------------------------------------------------------------


def int4pack_codes(codes: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """slimkit's 4-bit codes (out, in) as the unsigned 0..15 int32 values aten's int4 packer takes.

    Symmetric codes −8..7 are stored offset by 8; asymmetric codes are already 0..15.
    """
    return (codes.to(torch.int32) + 8) if symmetric else codes.to(torch.int32)


def int4pack_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(groups, out, 2) float32 [scale, offset] so that aten's ``(u − 8)·scale + offset`` equals slimkit's weight.

    slimkit: w = (q − z)·s with u = q + 8 (symmetric, z = 0) or u = q (asymmetric); so the
    offset is 0 for symmetric codes and (8 − z)·s for asymmetric ones.
    """
    s = scale.float()
    offset = torch.zeros_like(s) if zero is None else (8.0 - zero.float()) * s
    return torch.stack([s, offset], dim=-1).transpose(0, 1).contiguous()


def int8_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of ``x`` on an 8-bit grid as int8 plus the zero point in that int8 frame (None when symmetric).

    Asymmetric codes 0..255 are shifted by −128 into int8 (and so is their zero point), so
    ``(codes − zero)`` is unchanged and one int8×int8 kernel serves both.
    """
    q = quantize(x, scale, zero, 8, symmetric)
    if symmetric:
        return q.to(torch.int8), None
    return (q.to(torch.int16) - 128).to(torch.int8), zero.to(torch.int32) - 128


def int_mm_output(acc: torch.Tensor, x_zero: torch.Tensor | None, w_row_sums: torch.Tensor,
                  x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Float (M, N) output of an int8 product: (acc − z_x·Σ_k W[n, k])·s_x·s_w[n].

    ``acc``: int32 (M, N) = codes_x @ codes_wᵀ; ``x_zero``/``x_scale`` broadcast over rows
    ((M, 1) per token or scalars); ``w_row_sums``/``w_scale``: (N,).
    """
    if x_zero is not None:
        acc = acc - x_zero.to(torch.int32) * w_row_sums.to(torch.int32)
    return acc.float() * x_scale.float() * w_scale.float()


# --- prepared kernels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One way to run a layer: the kernel and the dtype its activations are cast to."""

    name: str  # "int8pack", "int4pack", "int_mm", "blocked"
    act_dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        """E.g. 'int8pack (bf16 activations)'."""
        if self.name == "int_mm":
            return "int_mm (int8 activations)"
        if self.name == "blocked":
            return "dequantize-blocked (fp32)"
        return f"{self.name} ({'bf16' if self.act_dtype == torch.bfloat16 else 'fp32'} activations)"


def _has_op(name: str) -> bool:
    """Whether this torch build has ``torch.<name>`` or ``torch.ops.aten.<name>`` (older builds lack the int4 ones)."""
    return hasattr(torch, name) if name == "_int_mm" else hasattr(torch.ops.aten, name)


def candidates(layer: Any) -> list[KernelSpec]:
    """The paths whose layout fits ``layer`` (a QuantLinear) and that this torch has: integer kernels
    (bf16 activations first where the CPU computes bf16 natively), then ``blocked``."""
    if layer.g_idx is not None or layer.qweight.device.type != "cpu":
        return []
    return integer_kernels(layer) + ([KernelSpec("blocked")] if blocked_fits(layer) else [])


def integer_kernels(layer: Any) -> list[KernelSpec]:
    """The integer kernels (int8pack, int4pack, int_mm) that fit ``layer`` in this torch."""
    if layer.bits not in (4, 8):
        return []
    native = has_native_bf16()
    acts = [torch.bfloat16, torch.float32] if native else [torch.float32, torch.bfloat16]
    if layer.act_mode is not None:
        fits = (layer.bits == 8 and layer.symmetric and layer.group_size is None and layer.act_bits == 8
                and _has_op("_int_mm"))
        return [KernelSpec("int_mm")] if fits else []
    if layer.bits == 8 and layer.symmetric and layer.group_size is None and _has_op("_weight_int8pack_mm"):
        return [KernelSpec("int8pack", a) for a in acts]
    if (layer.bits == 4 and layer.group_size in INT4_GROUPS and layer.out_features % 16 == 0
            and layer.in_features % layer.group_size == 0 and _has_op("_weight_int4pack_mm_for_cpu")
            and _has_op("_convert_weight_to_int4pack_for_cpu")):
        return [KernelSpec("int4pack", a) for a in acts]
    return []


def blocked_fits(layer: Any) -> bool:
    """Whether the blocked dequantize path takes this layout: codes of 8 bits and up one per byte,
    or 2/4-bit codes packed whole into bytes (the table maps one byte to its codes)."""
    return layer.bits >= 8 or (layer.bits in (2, 4) and layer.in_features % (8 // layer.bits) == 0)


BLOCK_BYTES = 2**21  # fp32 bytes of one dequantized block (2 MiB: stays in L2/L3 while multiplied)


def unpack_bytes_into(packed: torch.Tensor, codes: torch.Tensor, bits: int, scratch: torch.Tensor,
                      shift: int = 0) -> torch.Tensor:
    """Write the codes of ``packed`` (rows, bytes) uint8 minus ``shift`` into ``codes`` (rows, bytes·8/bits)
    float32, lowest bits first as ``pack`` stores them; ``scratch`` is a uint8 (rows, bytes) buffer.

    One shift-and-mask per code position over whole rows (uint8, vectorized), then a strided
    int→float copy: 4× faster here than a gather through a 256-entry table. ``shift`` (< 2^bits)
    is subtracted in uint8, wrapping, and read back as int8: symmetric codes come out signed
    with no float pass.
    """
    per_byte, mask = 8 // bits, 2**bits - 1
    interleaved = codes.view(packed.shape[0], packed.shape[1], per_byte)
    signed = scratch.view(torch.int8)
    for i in range(per_byte):
        if i:
            torch.bitwise_right_shift(packed, bits * i, out=scratch).bitwise_and_(mask)
        else:
            torch.bitwise_and(packed, mask, out=scratch)
        if shift:
            scratch.sub_(shift)
        interleaved[..., i].copy_(signed if shift else scratch)
    return codes


_workspace = threading.local()  # per thread: blocks of one layer at a time


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused flat buffer of at least ``numel`` elements. Fresh multi-MB tensors cost page faults on
    every call (glibc maps them anew), which measured as most of a small layer's dequantize time."""
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_workspace, name, buf)
    return buf[:numel]


class _Blocked:
    """``F.linear(quantize_input(x), W)`` with W dequantized ``rows`` output rows at a time into cache."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.group = layer.group_size or layer.in_features
        self.packed = layer.bits < 8
        self.scale = layer.scale.float().unsqueeze(-1)  # (out, groups, 1)
        # (q - z)·s: packed symmetric codes are stored as q + 2^(b-1), undone while unpacking (in
        # uint8, no float pass); a zero point becomes an in-place add of −z·s after the multiply.
        self.shift = 2 ** (layer.bits - 1) if self.packed and layer.symmetric else 0
        self.offset = None if layer.zero is None else (-layer.zero.float() * layer.scale.float()).unsqueeze(-1)
        self.rows = max(16, min(layer.out_features, BLOCK_BYTES // (4 * layer.in_features)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, cols = self.layer, self.layer.in_features
        x = layer.quantize_input(x.float())
        out = torch.empty(x.shape[0], layer.out_features, dtype=torch.float32)
        for start in range(0, layer.out_features, self.rows):
            rows = slice(start, start + self.rows)
            q = layer.qweight[rows]
            n = q.shape[0]
            codes = _scratch("codes", n * cols, torch.float32).view(n, cols)
            if self.packed:
                unpack_bytes_into(q, codes, layer.bits, _scratch("bytes", q.numel(), torch.uint8).view(q.shape),
                                  self.shift)
            else:
                codes.copy_(q)
            grouped = codes.view(n, -1, self.group).mul_(self.scale[rows])
            if self.offset is not None:
                grouped.add_(self.offset[rows])  # (measured: 4× faster than one broadcast addcmul here)
            torch.matmul(x, codes.t(), out=out[:, rows])
        return out


class _Prepared:
    """A kernel bound to one layer's tensors: ``(x2d float) -> y2d float32`` without the bias."""

    def __init__(self, spec: KernelSpec, layer: Any) -> None:
        self.spec = spec
        act = spec.act_dtype
        if spec.name == "int8pack":
            self.codes = layer.qweight  # already int8 (out, in): used in place, no copy
            self.scale = layer.scale[:, 0].to(act).contiguous()
        elif spec.name == "int4pack":
            # Repacked once into aten's tiled layout (a second copy of the codes: 0.5 byte per weight).
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                int4pack_codes(layer.codes(), layer.symmetric).contiguous(), 1)
            self.group_size = layer.group_size
            self.scales_zeros = int4pack_scales_and_zeros(layer.scale, layer.zero).to(act)
        elif spec.name == "blocked":
            self.blocked = _Blocked(layer)
        else:  # int_mm
            self.codes_t = layer.qweight.t()  # (in, out) view: _int_mm takes it as it is
            self.row_sums = layer.qweight.to(torch.int32).sum(dim=1)
            self.w_scale = layer.scale[:, 0].float()
            self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        name = self.spec.name
        if name == "int8pack":
            return torch.ops.aten._weight_int8pack_mm(x.to(self.spec.act_dtype), self.codes, self.scale)
        if name == "int4pack":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.spec.act_dtype), self.packed,
                                                              self.group_size, self.scales_zeros)
        if name == "blocked":
            return self.blocked(x)
        return self._int_mm(x)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x = x.float()
        if layer.input_multiplier is not None:
            x = x * layer.input_multiplier
        sym = layer.act_symmetric
        if layer.act_mode == "static":
            scale, zero = layer.act_scale, layer.act_zero
        elif layer.act_mode == "dynamic_token":
            scale, zero = scale_zero_from_range(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), 8, sym)
        else:
            lo, hi = torch.aminmax(x)
            scale, zero = scale_zero_from_range(lo, hi, 8, sym)
        codes, x_zero = int8_rows(x, scale, None if sym else zero, sym)
        acc = torch._int_mm(codes, self.codes_t)
        return int_mm_output(acc, x_zero, self.row_sums, scale, self.w_scale)


# --- choosing by measurement ---------------------------------------------------------------------


@dataclass
class LayerPlan:
    """The path a layer takes at decode (≤ SMALL_ROWS rows) and at prefill, with the timings that chose it."""

    decode: KernelSpec | None
    prefill: KernelSpec | None
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # rows label -> path -> ms
    reason: str = ""
    shape: tuple[int, int] = (0, 0)  # (out, in)

    def label(self) -> str:
        """E.g. 'decode: int8pack (bf16 activations), prefill: reference (dequantize)'."""
        name = lambda s: "reference (dequantize)" if s is None else s.label  # noqa: E731
        if self.decode == self.prefill:
            return name(self.decode) + (f" — {self.reason}" if self.reason else "")
        return f"decode: {name(self.decode)}, prefill: {name(self.prefill)}"


class _Bound:
    """A plan bound to one layer's tensors; stale once those tensors are replaced or written in place."""

    __slots__ = ("plan", "decode", "prefill", "tensors", "versions", "threads", "policy")

    def __init__(self, plan: LayerPlan, layer: Any) -> None:
        prepared = {s: _Prepared(s, layer) for s in {plan.decode, plan.prefill} if s is not None}
        self.plan, self.decode, self.prefill = plan, prepared.get(plan.decode), prepared.get(plan.prefill)
        self.tensors = _watched(layer)
        self.versions = tuple(t._version for t in self.tensors if t is not None)
        self.threads = torch.get_num_threads()
        self.policy = _policy

    def fresh(self, layer: Any) -> bool:
        """Whether the layer still holds the same tensors, unmodified, at the same thread count and policy."""
        now = _watched(layer)
        return (self.policy == _policy and all(a is b for a, b in zip(now, self.tensors))
                and self.versions == tuple(t._version for t in now if t is not None)
                and self.threads == torch.get_num_threads())


def _watched(layer: Any) -> tuple:
    # load_state_dict writes in place (the version moves); .to()/.half() replace the tensors.
    return layer.qweight, layer.scale, layer.zero, layer.input_multiplier


def _signature(layer: Any) -> tuple:
    return (layer.out_features, layer.in_features, layer.bits, layer.group_size, layer.symmetric, layer.act_mode,
            layer.act_symmetric, layer.input_multiplier is not None, torch.get_num_threads(), cpu_isa())


def _time_path(label: str, fn: Callable[[], Any]) -> float:
    """Median milliseconds of one path (``label`` names it; tests replace this to fix the timings)."""
    return fastest_ms(fn)


def _agrees(y: torch.Tensor, ref: torch.Tensor, act_dtype: torch.dtype) -> bool:
    """Whether a kernel's output is the reference's up to its activation rounding (a wrong kernel is never taken)."""
    tol = 2e-2 if act_dtype == torch.bfloat16 else 1e-3
    err = (y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
    return bool(torch.isfinite(y).all()) and float(err) <= tol


def _measure(layer: Any, specs: list[KernelSpec]) -> LayerPlan:
    """Time the reference and every fitting path at 1 and PREFILL_ROWS rows; keep the fastest per regime.

    Prefill paths are screened by one run at SCREEN_ROWS first (an fp32-activation integer
    kernel can take seconds at 256 rows); the reference is always timed in full.
    """
    gen = torch.Generator().manual_seed(0)
    plan = LayerPlan(None, None, shape=(layer.out_features, layer.in_features))
    prepared = {s: _Prepared(s, layer) for s in specs}
    dense = layer.dense_weight()  # the float layer's cost, for the report's "why" (not kept)
    agreeing = dict(prepared)
    for regime, rows in (("decode", 1), ("screen", SCREEN_ROWS), ("prefill", PREFILL_ROWS)):
        x = torch.randn(rows, layer.in_features, generator=gen)
        with torch.no_grad():
            if regime == "screen":
                once = {s: _run_once_ms(s.label, lambda k=k: k(x)) for s, k in agreeing.items()}
                once["reference"] = _run_once_ms("reference", lambda: layer.reference_forward(x))
                best = min(once.values())
                agreeing = {s: k for s, k in agreeing.items() if once[s] <= SCREEN_SLACK * best}
                plan.timings_ms[f"{rows} rows, one run"] = {
                    ("reference" if s == "reference" else s.label): ms for s, ms in once.items()}
                continue
            ref = layer.reference_forward(x)
            bias = 0 if layer.bias is None else layer.bias.detach().float()
            times = {"reference": _time_path("reference", lambda: layer.reference_forward(x)),
                     "fp32 F.linear": _time_path("fp32 F.linear", lambda: F.linear(x, dense))}
            for spec, kernel in list(agreeing.items()):
                if _agrees(kernel(x) + bias, ref, spec.act_dtype):
                    times[spec.label] = _time_path(spec.label, lambda k=kernel: k(x))
                else:
                    del agreeing[spec]  # a wrong path is never timed again, never taken
        plan.timings_ms[f"{rows} row{'s' if rows > 1 else ''}"] = times
        best = min(agreeing, key=lambda s: times.get(s.label, float("inf")), default=None)
        if best is not None and times.get(best.label, float("inf")) <= MIN_GAIN * times["reference"]:
            setattr(plan, regime, best)
    if plan.decode is None and plan.prefill is None:
        plan.reason = f"no kernel beat it on {cpu_isa()}"
    no_integer = _no_fit_reason(layer)
    if no_integer:
        plan.reason = "; ".join(r for r in (plan.reason, no_integer) if r)
    return plan


def _run_once_ms(label: str, fn: Callable[[], Any]) -> float:
    """One timed run after one warm-up (a screen, not a measurement to report; ``label`` names the path)."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def plan_layer(layer: Any) -> LayerPlan:
    """The plan for ``layer`` under the current policy: measured once per layout (cached), forced, or none."""
    specs = candidates(layer)
    policy = kernel_policy_name()
    if policy == "reference" or not specs:
        reason = "policy 'reference'" if policy == "reference" else _no_fit_reason(layer)
        return LayerPlan(None, None, reason=reason)
    if policy == "force":
        ints = [s for s in specs if s.name != "blocked"] or specs
        forced = next((s for s in ints if s.act_dtype == torch.float32), ints[0])
        return LayerPlan(forced, forced, reason="forced")
    key = _signature(layer)
    if key not in _probe_cache:
        _probe_cache[key] = _measure(layer, specs)
    return _probe_cache[key]


def _no_fit_reason(layer: Any) -> str:
    """Why no path but the reference fits ``layer``, or why no integer kernel does ("" when one does)."""
    if layer.g_idx is not None:
        return "act-order columns fit no kernel"
    if layer.qweight.device.type != "cpu":
        return "the kernels are CPU kernels"
    if integer_kernels(layer):
        return ""
    ops = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm")
    if not any(_has_op(op) for op in ops):
        return f"this torch ({torch.__version__}) has no integer kernels"
    if layer.bits not in (4, 8):
        return f"no {layer.bits}-bit integer kernel"
    if layer.bits == 4:
        return f"group size {layer.group_size} and shape {layer.out_features}x{layer.in_features} fit no int4 kernel"
    return "this layout fits no integer kernel in this torch"


def _bound(layer: Any) -> _Bound:
    bound = layer.__dict__.get("_kernel_bound")
    if bound is None or not bound.fresh(layer):
        bound = _Bound(plan_layer(layer), layer)
        layer.__dict__["_kernel_bound"] = bound  # a plain attribute: never saved, never a buffer
    return bound


def run_kernel(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` through the layer's chosen kernel, or None when the reference path must run.

    The reference runs under autograd, ONNX export, tracing and torch.export (kernels have no
    gradient and no ONNX form), for inputs off the CPU or not float32/bf16, and whenever no
    kernel was measured to win for this number of rows.
    """
    if _policy == "reference" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_exporting():
        return None
    if torch.compiler.is_compiling() and "_kernel_bound" not in layer.__dict__:
        return None  # no probing inside a compiled graph; a layer run eagerly first keeps its plan
    bound = _bound(layer)
    x2 = x.reshape(-1, layer.in_features)
    kernel = bound.decode if x2.shape[0] <= SMALL_ROWS else bound.prefill
    if kernel is None:
        return None
    y = kernel(x2)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def prepare_kernels(model: torch.nn.Module) -> dict[str, LayerPlan]:
    """Decide (measuring where needed) the path of every kernel-capable quantized Linear of ``model``.

    Returns ``{layer name: plan}`` for every layer that has a ``reference_forward`` (QuantLinear),
    so a report can print which path each layer takes.
    """
    plans = {}
    for name, module in model.named_modules():
        if hasattr(module, "reference_forward") and hasattr(module, "qweight"):
            plans[name] = _bound(module).plan
    return plans


def decode_timings(plans: dict[str, LayerPlan], regime: str = "decode") -> list[str]:
    """One line per measured layer shape: the chosen path's time beside fp32 ``F.linear``'s, at one row
    (``regime`` "decode") or at PREFILL_ROWS rows ("prefill")."""
    rows = "1 row" if regime == "decode" else f"{PREFILL_ROWS} rows"
    lines: dict[tuple, str] = {}
    for plan in plans.values():
        times = plan.timings_ms.get(rows)
        if not times or plan.shape in lines:
            continue
        spec = getattr(plan, regime)
        path = "reference" if spec is None else spec.label
        lines[plan.shape] = (f"{plan.shape[0]}x{plan.shape[1]}: {path} {times[path] * 1e3:.1f} us vs fp32 F.linear "
                             f"{times['fp32 F.linear'] * 1e3:.1f} us")
    return list(lines.values())


def kernel_summary(plans: dict[str, LayerPlan]) -> list[tuple[str, int]]:
    """``[(path label, number of layers)]``, most common first: one line per distinct path."""
    counts: dict[str, int] = {}
    for plan in plans.values():
        counts[plan.label()] = counts.get(plan.label(), 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def clear_probe_cache() -> None:
    """Forget every measured choice (tests; or after changing threads deliberately)."""
    _probe_cache.clear()

