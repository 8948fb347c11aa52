"""Mixed precision: chosen layers stored and computed in float16 or bfloat16.

``CastPrecision(dtype="bfloat16", include=[...])`` replaces each selected Linear, Conv2d or
Embedding with a ``LowPrecision`` layer: its parameters live in the low dtype (half the
bytes on disk), its input is cast down, and its output is cast back to the dtype the rest
of the model runs in, so a float32 model with a few bf16 layers still runs end to end.
Per-layer *bit widths* (``{"re:.*mlp.*": 4, "default": 8}``) are the ``bits`` field of
RTN / StaticQuant / DynamicQuant; this config covers the float side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.linear_like import LinearLike, as_linear, linear_kind, linear_problem
from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.core.registry import Context, register
from slimkit.core.targets import (
    module_paths,
    select_modules,
    set_submodule,
    subclass_reason,
)

LOW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_KINDS = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}


def _constructor_args(module: nn.Module) -> dict[str, Any]:
    """JSON-able constructor arguments of a Linear, Conv2d or Embedding."""
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.Conv2d):
        return {
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
    return {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx}


@register_module_type
class LowPrecision(SlimkitModule):
    """A Linear/Conv2d/Embedding held in float16 or bfloat16, returning the surrounding model's dtype.

    ``inner`` is the layer itself in the low dtype; ``out_dtype`` is the dtype its output is
    cast back to (the layer's original dtype; for Linear/Conv2d the input's dtype).
    """

    def __init__(self, kind: str, args: dict[str, Any], dtype: str, out_dtype: str = "float32") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"LowPrecision wraps {', '.join(_KINDS)}, got {kind!r}")
        if dtype not in LOW_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(LOW_DTYPES)}, got {dtype!r}")
        self.kind, self.args, self.dtype_name, self.out_dtype_name = kind, dict(args), dtype, out_dtype
        kwargs = dict(args)
        for key in ("kernel_size", "stride", "dilation"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("padding"), list):
            kwargs["padding"] = tuple(kwargs["padding"])
        self.inner = _KINDS[kind](**kwargs, dtype=LOW_DTYPES[dtype])

    @classmethod
    def from_module(cls, module: nn.Module, dtype: str) -> LowPrecision:
        """A copy of ``module`` (Linear, Conv2d or Embedding) whose weights are cast to ``dtype``."""
        out_dtype = str(module.weight.dtype).removeprefix("torch.")
        new = cls(type(module).__name__, _constructor_args(module), dtype, out_dtype)
        with torch.no_grad():
            new.inner.load_state_dict({k: v.to(LOW_DTYPES[dtype]) for k, v in module.state_dict().items()})
        return new.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "Embedding":
            return self.inner(x).to(getattr(torch, self.out_dtype_name))
        return self.inner(x.to(LOW_DTYPES[self.dtype_name])).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight in its original dtype, read-only (for code reading ``.weight`` instead of calling it)."""
        return self.inner.weight.to(getattr(torch, self.out_dtype_name))

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias in the original dtype (None for an Embedding or a layer without one), read-only."""
        b = getattr(self.inner, "bias", None)
        return None if b is None else b.to(getattr(torch, self.out_dtype_name))

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {"kind": self.kind, "args": self.args, "dtype": self.dtype_name, "out_dtype": self.out_dtype_name}

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> LowPrecision:
        """An empty LowPrecision layer of the shapes ``spec`` describes."""
        return cls(str(spec["kind"]), dict(spec["args"]), str(spec["dtype"]), str(spec.get("out_dtype", "float32")))

    def extra_repr(self) -> str:
        return f"dtype={self.dtype_name}"


@dataclass(frozen=True)
class CastPrecision(Config):
    """Store and run the selected layers in float16 or bfloat16 (mixed precision).

    dtype: "float16" or "bfloat16". include / ignore: module name patterns; the selected
    Linear, Conv2d and Embedding layers are cast, other module types are left alone.
    """

    family: ClassVar[str] = "quantize"

    dtype: str = "bfloat16"
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check the dtype name and the patterns."""
        if self.dtype not in LOW_DTYPES:
            self.fail("dtype", f"must be one of {', '.join(LOW_DTYPES)}, got {self.dtype!r}")
        self.check_name_patterns()


@register(CastPrecision)
def apply_cast(model: nn.Module, config: CastPrecision, ctx: Context) -> None:
    """Replace the selected float layers with LowPrecision copies, in place; the others are noted.

    Linear-like layers (FalconLinear, Conv1D: ``core.linear_like``) are cast as the
    nn.Linear they compute; other subclasses (a scaled embedding, say) are skipped with a note.
    """
    targets = []
    for name, m in select_modules(model, (LinearLike, nn.Conv2d, nn.Embedding), config.include, config.ignore):
        if linear_kind(m) is not None:
            problem = linear_problem(m, "a LowPrecision layer")
        else:
            problem = None if type(m) in _KINDS.values() else subclass_reason(m, "a LowPrecision layer")
        if problem is None and not m.weight.is_floating_point():
            problem = f"its weight is {m.weight.dtype}, not float"
        if problem:
            ctx.note(f"CastPrecision: skipped {name}: {problem}")
        else:
            targets.append((name, m))
    paths = module_paths(model)
    for name, module in targets:
        new = LowPrecision.from_module(as_linear(module) if linear_kind(module) else module, config.dtype)
        new.train(module.training)
        for path in paths[id(module)]:
            set_submodule(model, path, new)
    ctx.note(f"CastPrecision: {len(targets)} layer(s) now stored and computed in {config.dtype}")
