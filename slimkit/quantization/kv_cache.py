"""int8 and int4 KV-cache quantization for long contexts: the maths, a transformers ``Cache``, and a perplexity.

Layout (per token, per head, over ``head_dim``; optionally in groups of ``group_size`` along it):

- **int8**, symmetric: int8 codes in [−127, 127], one scale per group, ``x̂ = q · s``,
  ``s = max|x| / 127``.
- **int4**, asymmetric: codes in [0, 15] packed two per byte along ``head_dim`` (the first
  code in the low nibble: ``primitives.pack``'s order), one scale and one offset per group,
  ``x̂ = q · s + m``, ``m = min x``, ``s = (max x − m) / 15``. The offset is the group's
  minimum itself, not an integer zero point, so the grid spans the group's range exactly
  (an integer zero point would stretch it to include 0).

Scales and offsets are stored in float16 (or bfloat16) rounded *outward* (the offset down,
the scale up), so the stored grid still covers every value and no code is ever clipped:
each element's error is at most half its stored scale, ``|x − x̂| ≤ s/2`` (plus float32
rounding in the arithmetic). Bits per element: int8 ``8 + 16/g``, int4 ``4 + 32/g``, with
``g`` the group size (``head_dim`` by default): at head_dim 32 that is 8.5 and 5 bits, so
0.266× and 0.156× the bytes of a float32 cache.

Why per token and not per channel (KIVI, transformers' ``QuantizedCache``): a token's
groups depend on nothing but that token, so new tokens are quantized once, on arrival, and
appended; nothing is ever re-quantized, and no full-precision residual window is needed to
collect a group along the sequence. A residual window of the most recent tokens in the
model's dtype can still be asked for (``residual``), but it costs memory: at 1024 tokens
and head_dim 32, each fp32 residual token adds (128 − 34) / (1024 · 128) ≈ 0.00072 to the
int8 ratio (0.266 + 0.00072·r), so int8 meets a 0.27× budget only with ``residual ≤ 6``;
the default is 0.

The tokens of the current forward call are returned to attention as they came (exact),
beside the dequantized past, as transformers' own quantized caches do: only what was
*stored* from earlier calls is read back quantized.

``make_kv_cache(spec, model)`` builds the cache for a model ("int8", "int4"; None / "none" /
"fp32" give None, the model's own float cache); ``kv_cache_nbytes`` counts every tensor any
cache holds (transformers' DynamicCache and QuantizedCache backends included);
``kv_cache_perplexity`` feeds a sequence in chunks so that later chunks attend over the
quantized past.

Importing this module does not import transformers; the ``Cache`` classes
(``QuantizedKVCache``, ``QuantizedKVLayer``) are built on first access.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError, UnsupportedError, closest
from slimkit.quantization.primitives import dequantize, quantize, split_groups
from slimkit.tasks.generation import cache_keyword, returned_cache

#: KV-cache specs ``make_kv_cache`` accepts; "none" and "fp32" (like None) mean the model's own float cache.
SPECS = ("none", "fp32", "int8", "int4")
KV_BITS = (8, 4)
SCALE_DTYPES = (torch.float16, torch.bfloat16)

# Also public, built on first access (module __getattr__): QuantizedKVCache, QuantizedKVLayer.
__all__ = [
    "SPECS",
    "QuantizedKV",
    "dequantize_kv",
    "kv_bits_per_element",
    "kv_cache_nbytes",
    "kv_cache_nll",
    "kv_cache_perplexity",
    "kv_nbytes_per_token",
    "make_kv_cache",
    "quantize_kv",
]


# ---------------------------------------------------------------------------------------
# The maths: pure functions of tensors
# ---------------------------------------------------------------------------------------


def _check_layout(head_dim: int, bits: int, group_size: int | None, scale_dtype: torch.dtype) -> tuple[int, int]:
    """``(n_groups, group_size)`` after checking the layout is one this module stores."""
    if bits not in KV_BITS:
        raise ConfigError(f"KV-cache bits must be one of {KV_BITS}, got {bits!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype}")
    n_groups, gs = split_groups(head_dim, group_size)
    if bits == 4 and gs % 2:
        raise ConfigError(f"int4 packs two codes per byte: the group size must be even, got {gs}")
    return n_groups, gs


def _round_outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """float32 ``x`` in ``dtype``, rounded up (``up``) or down instead of to nearest, so the stored grid covers x."""
    y = x.to(dtype)
    wrong = y.float() < x if up else y.float() > x
    if bool(wrong.any()):
        y = torch.where(wrong, torch.nextafter(y, torch.full_like(y, math.inf if up else -math.inf)), y)
    return y


@dataclass(frozen=True, eq=False)
class QuantizedKV:
    """Quantized keys or values: per-token codes and per-(token, head, group) scale (and offset).

    ``codes``: (..., tokens, head_dim) int8 at 8 bit; (..., tokens, head_dim / 2) uint8 at 4 bit,
    two codes per byte (first in the low nibble). ``scale``: (..., tokens, n_groups) in
    ``scale_dtype``. ``zero``: the offset ``m`` (the value of code 0), same shape and dtype;
    None at 8 bit (symmetric). Every tensor has the token axis at dim −2, so a cache appends
    new tokens with one ``cat`` per tensor (``append``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    head_dim: int
    group_size: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every stored tensor (codes, scale, and zero when there is one)."""
        return (self.codes, self.scale) if self.zero is None else (self.codes, self.scale, self.zero)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedKV:
        """The same layout with ``fn`` applied to every stored tensor (index_select on the batch, slicing tokens)."""
        return QuantizedKV(fn(self.codes), fn(self.scale), None if self.zero is None else fn(self.zero),
                           self.bits, self.head_dim, self.group_size)

    def append(self, other: QuantizedKV) -> QuantizedKV:
        """These tokens followed by ``other``'s (same layout), along the token axis."""
        if (other.bits, other.head_dim, other.group_size) != (self.bits, self.head_dim, self.group_size):
            raise ValueError("cannot append quantized states of a different layout")
        def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, b], dim=-2)

        return QuantizedKV(cat(self.codes, other.codes), cat(self.scale, other.scale),
                           None if self.zero is None else cat(self.zero, other.zero),
                           self.bits, self.head_dim, self.group_size)

    @property
    def tokens(self) -> int:
        """Number of tokens stored."""
        return int(self.codes.shape[-2])

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (..., tokens, head_dim) values these codes stand for, in ``dtype``."""
        return dequantize_kv(self, dtype)


def _check_finite(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> None:
    """DataError unless the stored scale (and offset) are finite: NaN/inf input, or values beyond ``dtype``'s range."""
    if bool(torch.isfinite(scale).all()) and (zero is None or bool(torch.isfinite(zero).all())):
        return
    if not bool(torch.isfinite(x).all()):
        raise DataError("keys/values contain NaN or inf; quantization needs finite values")
    raise DataError(f"keys/values exceed {dtype}'s range (max |x| = {float(x.detach().abs().amax()):.4g}); "
                    "quantize with scale_dtype=torch.bfloat16")


def quantize_kv(x: torch.Tensor, bits: int = 8, *, group_size: int | None = None,
                scale_dtype: torch.dtype = torch.float16) -> QuantizedKV:
    """Quantize keys or values ``x`` (batch, heads, tokens, head_dim) per token and head, over head_dim.

    ``bits`` 8: symmetric int8 codes with one scale per group; 4: asymmetric codes packed two per
    byte with one scale and one offset per group. ``group_size`` None: one group per (token,
    head), the whole head_dim; else groups of ``group_size`` consecutive head_dim entries
    (which must divide head_dim; even at 4 bit). Scale and offset are stored in ``scale_dtype``
    rounded outward, so every element satisfies ``|x − x̂| ≤ s/2`` (see the module docstring).
    Any leading dimensions are allowed; the last two must be (tokens, head_dim).

    Raises DataError for NaN/inf input, or values beyond ``scale_dtype``'s range (float16:
    65504; use bfloat16 then).
    """
    if x.dim() < 2:
        raise ValueError(f"expected (..., tokens, head_dim), got shape {tuple(x.shape)}")
    head_dim = int(x.shape[-1])
    n_groups, gs = _check_layout(head_dim, bits, group_size, scale_dtype)
    xg = x.detach().float().reshape(*x.shape[:-1], n_groups, gs)  # (..., tokens, n_groups, gs)
    # Few, whole-tensor ops: this runs on every new token of every layer while decoding.
    if bits == 8:
        scale = _round_outward(xg.abs().amax(dim=-1) / 127, scale_dtype, up=True)
        zero = None
        _check_finite(x, scale, zero, scale_dtype)
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero group: codes 0, exact
        q = quantize(xg, scale.float().unsqueeze(-1), None, 8, True)  # int8 in [-127, 127], never clipped
        codes = q.reshape(x.shape)
    else:
        lo, hi = torch.aminmax(xg, dim=-1)
        zero = _round_outward(lo, scale_dtype, up=False)
        m = zero.float()
        scale = _round_outward((hi - m) / 15, scale_dtype, up=True)
        _check_finite(x, scale, zero, scale_dtype)
        scale = torch.where(scale > 0, scale, 1.0)  # a constant group: every code 0
        q = quantize(xg - m.unsqueeze(-1), scale.float().unsqueeze(-1), None, 4, False)  # uint8 in [0, 15]
        codes = _pack4(q.reshape(x.shape))
    return QuantizedKV(codes.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous(),
                       bits, head_dim, gs)


# primitives.pack / unpack define the 4-bit layout (first code in the low nibble) through a general
# int64 bit stream; here it runs on every new token and on the whole past at every step, where the
# same bytes by nibble shifts are ~70x faster (tests check both give identical bytes and codes).


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """``primitives.pack(codes, 4, symmetric=False)`` for uint8 codes in [0, 15] and an even last dim."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``primitives.unpack(packed, 4, head_dim, symmetric=False)``: uint8 codes (..., head_dim)."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1)  # first code in the low nibble
    return codes.reshape(*packed.shape[:-1], head_dim)


def dequantize_kv(q: QuantizedKV, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (..., tokens, head_dim) values of ``q`` in ``dtype``: ``q·s`` (int8) or ``q·s + m`` (int4).

    ``out``: a tensor of that shape (a slice of a larger one is fine) to write into instead of
    allocating: the cache writes the past straight into the keys it returns to attention.
    """
    codes = q.codes if q.bits == 8 else _unpack4(q.codes, q.head_dim)
    grouped_shape = (*codes.shape[:-1], q.head_dim // q.group_size, q.group_size)
    grouped = codes.reshape(grouped_shape)
    if out is not None and out.dtype == torch.float32:
        target = out.view(grouped_shape)
        torch.mul(grouped, q.scale.float().unsqueeze(-1), out=target)  # int8/uint8 x float32 -> float32
        if q.zero is not None:
            target.add_(q.zero.float().unsqueeze(-1))
        return out
    x = dequantize(grouped, q.scale.unsqueeze(-1))
    if q.zero is not None:
        x = x + q.zero.float().unsqueeze(-1)
    x = x.reshape(*codes.shape[:-1], q.head_dim)
    return x.to(dtype) if out is None else out.copy_(x)


def kv_bits_per_element(bits: int, head_dim: int, group_size: int | None = None,
                        scale_dtype: torch.dtype = torch.float16) -> float:
    """Stored bits per cached element: codes + scale (+ offset at 4 bit) per group."""
    _, gs = _check_layout(head_dim, bits, group_size, scale_dtype)
    per_group = torch.finfo(scale_dtype).bits * (1 if bits == 8 else 2)
    return bits + per_group / gs


def kv_nbytes_per_token(bits: int, head_dim: int, group_size: int | None = None,
                        scale_dtype: torch.dtype = torch.float16) -> int:
    """Exact bytes one (token, head) of keys *or* values occupies: ``head_dim·bits/8`` + the group parameters."""
    n_groups, _ = _check_layout(head_dim, bits, group_size, scale_dtype)
    param_bytes = torch.finfo(scale_dtype).bits // 8 * (1 if bits == 8 else 2)
    return head_dim * bits // 8 + n_groups * param_bytes


# ---------------------------------------------------------------------------------------
# The transformers Cache (classes built on first access: transformers is imported then)
# ---------------------------------------------------------------------------------------


@functools.cache
def _cache_classes() -> dict[str, type]:
    from transformers.cache_utils import BaseQuantizedLayer, Cache

    class QuantizedKVLayer(BaseQuantizedLayer):
        """One decoder layer's keys and values, quantized per token on arrival (``quantize_kv``) and appended.

        Subclasses transformers' ``BaseQuantizedLayer`` (its states in ``_quantized_keys`` /
        ``_quantized_values``, the length in ``cumulative_length``) the way its FP8 layer does: the
        quantized states are appendable, so there is no re-quantization. ``keys`` / ``values``
        hold the optional full-precision residual window: the last ``residual`` tokens, each
        quantized when it leaves the window. Tokens can be cropped and batch rows selected or
        reordered exactly (no requantization: every token's codes are its own).
        """

        is_croppable = True

        def __init__(self, bits: int = 8, group_size: int | None = None, residual: int = 0,
                     scale_dtype: torch.dtype = torch.float16):
            super().__init__()
            if not isinstance(residual, int) or isinstance(residual, bool) or residual < 0:
                raise ConfigError(f"residual must be an integer >= 0 (tokens kept in full precision), got {residual!r}")
            if bits not in KV_BITS or scale_dtype not in SCALE_DTYPES:
                _check_layout(2, bits, None, scale_dtype)  # raises the ConfigError naming the bad one
            self.bits, self.group_size, self.residual, self.scale_dtype = bits, group_size, residual, scale_dtype

        def __repr__(self) -> str:
            return (f"QuantizedKVLayer(bits={self.bits}, group_size={self.group_size}, residual={self.residual}, "
                    f"tokens={self.cumulative_length})")

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            # Empty, correctly shaped residual windows (not transformers' 1-D torch.tensor([])).
            self.keys, self.values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
            self.is_initialized = True

        def _quantize(self, tensor: torch.Tensor) -> QuantizedKV:
            return quantize_kv(tensor, self.bits, group_size=self.group_size, scale_dtype=self.scale_dtype)

        def _dequantize(self, q_tensor: QuantizedKV) -> torch.Tensor:
            return dequantize_kv(q_tensor, self.dtype)

        def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Quantize leaving keys and values (one call on both: half the small ops per decoding step) and append."""
            if keys.shape == values.shape:
                both = self._quantize(torch.stack([keys, values]))
                q_k, q_v = both.map(lambda t: t[0]), both.map(lambda t: t[1])
            else:  # e.g. a model whose values have another head_dim
                q_k, q_v = self._quantize(keys), self._quantize(values)
            if self._quantized_keys is None:  # own storage, not views of the stacked pair
                q_k, q_v = q_k.map(torch.clone), q_v.map(torch.clone)
            else:
                q_k, q_v = self._quantized_keys.append(q_k), self._quantized_values.append(q_v)
            self._quantized_keys, self._quantized_values = q_k, q_v

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            """Store the new states and return (keys, values) for attention: dequantized past, residual, new (exact)."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            keys_out = self._assemble(self._quantized_keys, self.keys, key_states)
            values_out = self._assemble(self._quantized_values, self.values, value_states)

            # What leaves the residual window is quantized once and appended; the window keeps the rest.
            window_k, window_v = key_states, value_states
            if self.keys.shape[-2]:
                window_k = torch.cat([self.keys, key_states], dim=-2)
                window_v = torch.cat([self.values, value_states], dim=-2)
            leaving = window_k.shape[-2] - self.residual
            if leaving > 0:
                self._store(window_k[..., :leaving, :], window_v[..., :leaving, :])
                window_k, window_v = window_k[..., leaving:, :], window_v[..., leaving:, :]
            # clone: a slice (or the caller's tensor) would keep more storage alive than the window
            self.keys, self.values = window_k.clone(), window_v.clone()
            return keys_out, values_out

        def _assemble(self, quantized: QuantizedKV | None, window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            """[dequantized past | residual window | new] as one tensor, each part written in place once."""
            n_q = 0 if quantized is None else quantized.tokens
            n_w, n_new = window.shape[-2], new.shape[-2]
            out = new.new_empty((*new.shape[:-2], n_q + n_w + n_new, new.shape[-1]))
            if n_q:
                dequantize_kv(quantized, out=out[..., :n_q, :])
            if n_w:
                out[..., n_q:n_q + n_w, :] = window
            out[..., n_q + n_w:, :] = new
            return out

        def _map_states(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
            """Apply ``fn`` to every stored tensor (quantized and residual) alike."""
            if self._quantized_keys is not None:
                self._quantized_keys = self._quantized_keys.map(fn)
                self._quantized_values = self._quantized_values.map(fn)
            if self.keys is not None:
                self.keys, self.values = fn(self.keys), fn(self.values)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            """Reorder the batch rows for beam search (exact: each row's codes are its own)."""
            if self.is_initialized:
                self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Repeat each batch row ``repeats`` times."""
            if self.is_initialized:
                self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep only the batch rows ``indices``."""
            if self.is_initialized:
                self._map_states(lambda t: t[indices, ...])

        def crop(self, tokens_to_remove: int) -> None:
            """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers' DynamicLayer takes)."""
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
            n = min(-tokens_to_remove, self.cumulative_length)
            if n == 0 or not self.is_initialized:
                return
            from_window = min(n, self.keys.shape[-2])
            if from_window:
                keep = self.keys.shape[-2] - from_window
                self.keys, self.values = self.keys[..., :keep, :].clone(), self.values[..., :keep, :].clone()
            rest = n - from_window
            if rest and self._quantized_keys is not None:
                keep = self._quantized_keys.tokens - rest
                self._quantized_keys = self._quantized_keys.map(lambda t: t[..., :keep, :].clone())
                self._quantized_values = self._quantized_values.map(lambda t: t[..., :keep, :].clone())
            self.cumulative_length -= n

        def offload(self) -> None:
            if self.is_initialized:
                self._map_states(lambda t: t.to("cpu", non_blocking=True))

        def prefetch(self) -> None:
            if self.is_initialized:
                self._map_states(lambda t: t.to(self.device, non_blocking=True))

    class QuantizedKVCache(Cache):
        """A ``Cache`` of ``QuantizedKVLayer``: one per decoder layer of a full-attention model.

        ``QuantizedKVCache(config, bits=8)`` (a model's config, or the model); pass it as
        ``model(ids, cache=c, use_cache=True)`` (``past_key_values=`` in older transformers) or
        ``model.generate(..., past_key_values=c)``. Sliding-window or linear-attention layers are
        refused (UnsupportedError): their windows would need cropping that is not written here.
        """

        def __init__(self, config: Any, bits: int = 8, group_size: int | None = None, residual: int = 0,
                     scale_dtype: torch.dtype = torch.float16):
            config = getattr(config, "config", config)  # a model is accepted for its config
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            kinds = set(_layer_types(text))
            if kinds - {"full_attention"}:
                raise UnsupportedError(f"the quantized KV cache handles full-attention layers only; this model has "
                                       f"{sorted(kinds - {'full_attention'})}")
            head_dim = _head_dim(text)
            _check_layout(head_dim, bits, group_size, scale_dtype)
            layers = [QuantizedKVLayer(bits, group_size, residual, scale_dtype) for _ in range(text.num_hidden_layers)]
            super().__init__(layers=layers)
            self.bits, self.group_size, self.residual, self.head_dim = bits, group_size, residual, head_dim

        def __repr__(self) -> str:
            return (f"QuantizedKVCache(bits={self.bits}, group_size={self.group_size}, residual={self.residual}, "
                    f"layers={len(self.layers)})")

    QuantizedKVLayer.__module__ = QuantizedKVCache.__module__ = __name__
    return {"QuantizedKVLayer": QuantizedKVLayer, "QuantizedKVCache": QuantizedKVCache}


def __getattr__(name: str) -> Any:
    if name in ("QuantizedKVLayer", "QuantizedKVCache"):
        return _cache_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _layer_types(config: Any) -> list[str]:
    """The attention type of each decoder layer (transformers' own reading where it has one)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(config)[0])
    except (ImportError, AttributeError, TypeError):  # older transformers: read the config fields directly
        types = getattr(config, "layer_types", None)
        if types is not None:
            return list(types)
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def make_kv_cache(spec: str | None, model: Any, *, group_size: int | None = None, residual: int = 0,
                  scale_dtype: torch.dtype = torch.float16) -> Any:
    """A fresh KV cache for ``model`` (or its config) by name, or None for the model's own float cache.

    ``spec``: None, "none" or "fp32" -> None (pass nothing; transformers makes its DynamicCache);
    "int8" -> symmetric int8, 8.5 bits per element at head_dim 32; "int4" -> asymmetric int4,
    5 bits per element at head_dim 32. ``group_size``, ``residual`` and ``scale_dtype``: see
    ``quantize_kv`` and ``QuantizedKVLayer``. A cache holds one sequence's (batch's) state:
    make a new one per generation. Raises ConfigError naming the valid specs for any other spec.
    """
    if spec is not None and not isinstance(spec, str):
        raise ConfigError(f"a KV-cache spec is a string, one of {', '.join(SPECS)} (or None), got "
                          f"{type(spec).__name__}")
    name = "none" if spec is None else spec.strip().lower()
    if name not in SPECS:
        raise ConfigError(f"unknown KV-cache spec {spec!r}; choose one of {', '.join(SPECS)}{closest(name, SPECS)}")
    if name in ("none", "fp32"):
        return None
    bits = 8 if name == "int8" else 4
    return _cache_classes()["QuantizedKVCache"](model, bits=bits, group_size=group_size, residual=residual,
                                                scale_dtype=scale_dtype)


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every plain tensor reachable from ``obj``: attributes, containers, and the inner tensors of tensor
    subclasses (optimum-quanto's packed tensors, through ``__tensor_flatten__``)."""
    if depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)):
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None and type(obj) not in (torch.Tensor, nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            for n in names:
                yield from _tensors_in(getattr(obj, n), depth + 1)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)
    elif isinstance(obj, QuantizedKV):
        yield from obj.tensors()
    elif hasattr(obj, "__dict__") and not inspect.isclass(obj) and not callable(obj):
        yield from _tensors_in(vars(obj), depth + 1)


def kv_cache_nbytes(cache: Any) -> int:
    """Bytes of memory held by every tensor a cache stores, over all its layers.

    Works for any transformers ``Cache`` (DynamicCache, QuantizedCache with the quanto / HQQ
    backends, ``QuantizedKVCache``): each layer's attributes are walked (containers, HQQ's
    metadata dict, quanto's tensor subclasses down to their plain tensors) and each storage is
    counted once, whole (a view keeps its whole storage alive). 0 for an empty cache or None.
    """
    if cache is None:
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0
    for layer in getattr(cache, "layers", [cache]):
        for t in _tensors_in(vars(layer) if hasattr(layer, "__dict__") else layer):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


CacheSpec = str | None | Callable[[], Any]


def _fresh_cache(spec: CacheSpec, model: nn.Module) -> Any:
    return spec() if callable(spec) else make_kv_cache(spec, model)


@torch.no_grad()
def kv_cache_nll(model: nn.Module, token_ids: torch.Tensor, spec: CacheSpec = None,
                 chunk: int = 128) -> tuple[float, int]:
    """(summed next-token NLL in nats, tokens predicted) of ``token_ids`` fed ``chunk`` tokens at a time with a cache.

    ``token_ids`` (windows, n): each row an independent sequence, all fed together as one
    batch through one cache. ``spec`` is a ``make_kv_cache`` spec or a callable returning a fresh
    transformers ``Cache`` (a peer's). Every chunk after the first attends over the earlier
    chunks through the cache, i.e. reads them quantized; its own tokens are exact.
    """
    if token_ids.dim() != 2 or token_ids.shape[1] < 2:
        raise DataError(f"token_ids must be (windows, n) with n >= 2, got shape {tuple(token_ids.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = token_ids.to(device=device, dtype=torch.long)
        cache, kwarg = _fresh_cache(spec, model), cache_keyword(model)
        n = ids.shape[1]
        total = 0.0
        for start in range(0, n - 1, chunk):  # the last token is only a target
            stop = min(start + chunk, n - 1)
            out = model(input_ids=ids[:, start:stop], use_cache=True, **{kwarg: cache})
            cache = returned_cache(out)
            logits = out.logits.float()
            targets = ids[:, start + 1:stop + 1]
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum"))
        return total, ids.shape[0] * (n - 1)
    finally:
        model.train(was_training)


def kv_cache_perplexity(model: nn.Module, token_ids: torch.Tensor, spec: CacheSpec = None, chunk: int = 128) -> float:
    """Perplexity of ``token_ids`` (1, n) (or (windows, n), pooled) fed in chunks of ``chunk`` through a KV cache.

    The attention of each chunk over the earlier ones reads the cache, so a quantized cache
    (``spec`` "int8" / "int4", or a callable returning a peer's ``Cache``) shows its error here.
    With ``spec`` None the model's own float cache is used, and the result equals the one-shot
    full-forward perplexity (up to float rounding).
    """
    nll, count = kv_cache_nll(model, token_ids, spec, chunk)
    return math.exp(nll / count)
