"""Weight-only quantized layers: QuantLinear and QuantEmbedding.

Both hold integer codes and float32 scales as buffers (so ``state_dict`` carries exactly
what is stored on disk) and dequantize on the fly in ``forward``: simple and exact; the
fast path is the ONNX export with real int8/int4 kernels.

Stored tensors (rows = out_features or num_embeddings, cols = in_features or embedding_dim):
- ``qweight``: 8 bit: the codes themselves, (rows, cols) int8 (symmetric) or uint8
  (asymmetric); 4/2 bit: uint8 (rows, ceil(cols·bits/8)) packed by ``primitives.pack``
  (first code in the low bits, signed codes offset by 2^(bits−1)).
- ``scale``: float32 (rows, n_groups); ``zero``: uint8 (rows, n_groups), asymmetric only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.quantization.primitives import (
    QuantizedWeight,
    code_dtype,
    dequantize_weight,
    pack,
    packed_size,
    qrange,
    quantize_weight,
    split_groups,
    unpack,
)


class _QuantWeightMixin:
    """Shared storage of a quantized (rows, cols) weight; the subclass sets ``_rows``/``_cols``."""

    bits: int
    group_size: int | None
    symmetric: bool

    def _init_storage(self, rows: int, cols: int, device: torch.device | str | None) -> None:
        qrange(self.bits, self.symmetric)  # raises for an impossible bits/symmetric pair
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits!r}")
        n_groups, _ = split_groups(cols, self.group_size)
        if self.bits == 8:
            qweight = torch.zeros(rows, cols, dtype=code_dtype(self.symmetric), device=device)
        else:
            qweight = torch.zeros(rows, packed_size(cols, self.bits), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float32, device=device))
        zero = None if self.symmetric else torch.zeros(rows, n_groups, dtype=torch.uint8, device=device)
        self.register_buffer("zero", zero)

    def _store(self, qw: QuantizedWeight) -> None:
        """Copy a ``QuantizedWeight`` into the buffers (packing below 8 bits)."""
        q = qw.q if self.bits == 8 else pack(qw.q, self.bits, symmetric=self.symmetric)
        self.qweight.copy_(q)
        self.scale.copy_(qw.scale)
        if self.zero is not None:
            self.zero.copy_(qw.zero)

    def _codes(self, qweight: torch.Tensor, cols: int) -> torch.Tensor:
        """Unpacked codes of (gathered rows of) ``qweight``."""
        return qweight if self.bits == 8 else unpack(qweight, self.bits, cols, symmetric=self.symmetric)

    def weight_bits_per_element(self) -> float:
        """Measured storage bits per weight element: bytes of qweight, scale and zero × 8 / (rows·cols)."""
        nbytes = sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)
        return nbytes * 8 / (self._rows * self._cols)

    def slimkit_param_counts(self) -> tuple[int, int]:
        """``(total, nonzero)`` of the logical weight; a bias is an nn.Parameter, counted by the normal walk."""
        with torch.no_grad():
            return self._rows * self._cols, int(torch.count_nonzero(self.dense_weight()))


@register_module_type
class QuantLinear(_QuantWeightMixin, SlimkitModule):
    """A Linear whose weight is stored as 8/4/2-bit codes with per-channel or per-group scales.

    ``forward`` dequantizes the weight to the input's dtype and calls ``F.linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._init_storage(out_features, in_features, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @property
    def _rows(self) -> int:
        return self.out_features

    @property
    def _cols(self) -> int:
        return self.in_features

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None, symmetric: bool = True
    ) -> QuantLinear:
        """Round-to-nearest quantize ``linear``'s weight; the bias is copied as a float Parameter."""
        with torch.no_grad():
            qw = quantize_weight(linear.weight, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                device=linear.weight.device,
            )
            mod._store(qw)
            if linear.bias is not None:
                # Keep the bias dtype (and independence from the old layer).
                mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return mod

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight, computed in float32 then cast to ``dtype``."""
        codes = self._codes(self.qweight, self.in_features)
        return dequantize_weight(codes, self.scale, self.zero, self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantLinear:
        """An empty QuantLinear of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            bias=bool(spec["bias"]),
            bits=int(spec["bits"]),
            group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"
        )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@register_module_type
class QuantEmbedding(_QuantWeightMixin, SlimkitModule):
    """An Embedding whose table is stored as 8/4/2-bit codes, one scale per row (or per row-group).

    ``forward`` gathers only the looked-up rows' codes and scales and dequantizes those,
    so no dense (num_embeddings, dim) table is ever built. The output dtype is the original
    table's (``dtype``), since integer token ids carry no dtype to follow.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.dtype = dtype
        self._init_storage(num_embeddings, embedding_dim, device)

    @property
    def _rows(self) -> int:
        return self.num_embeddings

    @property
    def _cols(self) -> int:
        return self.embedding_dim

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, bits: int = 8, group_size: int | None = None, symmetric: bool = True
    ) -> QuantEmbedding:
        """Round-to-nearest quantize ``embedding``'s table (groups run along the embedding dim)."""
        if embedding.max_norm is not None:
            # max_norm renormalizes the table in place during forward: impossible on codes.
            raise ValueError("an Embedding with max_norm cannot be quantized")
        with torch.no_grad():
            qw = quantize_weight(embedding.weight, bits, group_size=group_size, symmetric=symmetric)
            mod = cls(
                embedding.num_embeddings,
                embedding.embedding_dim,
                padding_idx=embedding.padding_idx,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                dtype=embedding.weight.dtype,
                device=embedding.weight.device,
            )
            mod._store(qw)
        return mod

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (num_embeddings, dim) table in ``dtype`` (default: the original dtype)."""
        codes = self._codes(self.qweight, self.embedding_dim)
        return dequantize_weight(codes, self.scale, self.zero, self.group_size).to(dtype or self.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        codes = self._codes(F.embedding(input, self.qweight), self.embedding_dim)  # (..., dim)
        scale = F.embedding(input, self.scale)  # (..., n_groups)
        zero = None if self.zero is None else F.embedding(input, self.zero)
        return dequantize_weight(codes, scale, zero, self.group_size).to(self.dtype)

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantEmbedding:
        """An empty QuantEmbedding of the shapes ``spec`` describes, ready for ``load_state_dict``."""
        dtype_name = spec.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"QuantEmbedding spec: unknown dtype {dtype_name!r}; known: {', '.join(_DTYPES)}")
        return cls(
            int(spec["num_embeddings"]),
            int(spec["embedding_dim"]),
            padding_idx=None if spec["padding_idx"] is None else int(spec["padding_idx"]),
            bits=int(spec["bits"]),
            group_size=None if spec["group_size"] is None else int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]),
            dtype=_DTYPES[dtype_name],
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, dtype={self.dtype}"
        )
