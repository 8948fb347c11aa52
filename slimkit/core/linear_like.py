"""Linear-like layers: the one definition of "a layer computing y = x·Wᵀ + b" and of its (out, in) weight.

Three kinds of module compute a Linear's function and are compressed like one:

- ``nn.Linear`` and its subclasses that keep its forward (e.g. torch's
  ``NonDynamicallyQuantizableLinear``, transformers' ``EsmFoldLinear``, a masked
  ``ParametrizedLinear``);
- subclasses whose own forward is known to compute the same product
  (``_EQUIVALENT_FORWARDS``: Falcon's ``FalconLinear`` is ``input @ W.T + b``);
- transformers' ``Conv1D`` (GPT-2, GPT-1, ImageGPT...): ``x @ W + b`` with the weight
  stored transposed, (in, out), and ``nf`` / ``nx`` for out / in features.

A subclass that overrides forward with anything else (a router, a grouped or fp32-output
Linear) is *not* linear-like: replacing it by a QuantLinear would silently change what it
computes. ``LinearLike`` selects every candidate (any nn.Linear subclass or Conv1D) so a
handler can say why it skips one (``linear_problem``) instead of letting it vanish.

Weights are always read and written here as (out, in): ``linear_weight`` is a view (a
transposed one for Conv1D, so in-place edits land in the layer's own layout),
``set_linear_weight`` copies into it, ``as_linear`` gives an exact ``nn.Linear``.

The embedding counterpart, ``embedding_scale``, accepts ``nn.Embedding`` and subclasses
whose forward only multiplies the looked-up rows by a constant (Gemma's
``GemmaTextScaledWordEmbedding``, BART's ``*ScaledWordEmbedding``), checked on the layer.

Only torch is imported: transformers classes are recognised by module and class name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Qualified names of nn.Linear subclasses whose overriding forward computes exactly x·Wᵀ + b.
_EQUIVALENT_FORWARDS = frozenset({
    "transformers.models.falcon.modeling_falcon.FalconLinear",  # input @ self.weight.T (+ self.bias)
})
# transformers' Conv1D: forward is torch.addmm(bias, x, weight) with weight (in, out).
_CONV1D = ("transformers.pytorch_utils", "Conv1D")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _conv1d_base(cls: type) -> type | None:
    """transformers' Conv1D class among ``cls``'s bases (without importing transformers), or None."""
    for base in cls.__mro__:
        if (base.__module__, base.__name__) == _CONV1D:
            return base
    return None


def linear_kind(module: nn.Module) -> str | None:
    """"linear" for any nn.Linear (subclasses too), "conv1d" for transformers' Conv1D (subclasses too), else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _conv1d_base(type(module)) is not None:
        return "conv1d"
    return None


def _forward_owner(cls: type) -> type:
    """The class in ``cls``'s MRO that defines the ``forward`` it runs."""
    for base in cls.__mro__:
        if "forward" in base.__dict__:
            return base
    return cls


def _unknown_forward(module: nn.Module) -> str | None:
    """The qualified name of a forward that overrides the family's own and is not known to be x·Wᵀ + b, or None."""
    kind = linear_kind(module)
    if kind is None:
        return None
    owner = _forward_owner(type(module))
    family = nn.Linear if kind == "linear" else _conv1d_base(type(module))
    if owner is family or _qualname(owner) in _EQUIVALENT_FORWARDS:
        return None
    return f"{_qualname(owner)}.forward"


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` computes y = x·Wᵀ + b from a float weight it holds (see the module docstring)."""
    if linear_kind(module) is None or _unknown_forward(module) is not None:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()


def linear_problem(module: nn.Module, replacement: str = "a compressed layer") -> str | None:
    """Why a Linear/Conv1D candidate cannot be replaced by ``replacement`` (a reason for a note), or None.

    Checks, in order: a forward that is not known to be x·Wᵀ + b, a non-float weight
    (already quantized by another library), a pruning mask (a parametrization) and
    ``torch.nn.utils.prune``'s ``weight_orig``. The meta device is the caller's business
    (streamed models are loaded block by block).
    """
    if linear_kind(module) is None:
        return f"it is a {type(module).__name__}, not a Linear-like layer"
    unknown = _unknown_forward(module)
    if unknown is not None:
        return (f"it is a {type(module).__name__}, whose forward ({unknown}) is not known to compute x·Wᵀ + b, "
                f"so {replacement} cannot stand in for it")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        what = (f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
                else type(weight).__name__)
        return f"its weight is {what}, not a float matrix (already quantized by another library?)"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return ("its weight holds a pruning mask (a parametrization): call slimkit.strip(model) first "
                f"to bake the mask in, then replace it by {replacement}")
    if hasattr(module, "weight_orig"):
        return ("it is pruned with torch.nn.utils.prune (weight_orig and a mask); call "
                "torch.nn.utils.prune.remove(module, 'weight') first")
    return None


class _LinearLikeMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, nn.Module) and linear_kind(obj) is not None

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and (issubclass(sub, nn.Linear) or _conv1d_base(sub) is not None)


class LinearLike(metaclass=_LinearLikeMeta):
    """Marker for ``isinstance`` and ``select_modules``: any nn.Linear (subclasses included) or transformers Conv1D.

    These are the *candidates*; ``is_linear_like`` / ``linear_problem`` say whether one
    really computes x·Wᵀ + b. Never instantiated.
    """

    def __new__(cls, *args, **kwargs):  # pragma: no cover - a marker only
        raise TypeError("LinearLike is a marker for isinstance checks, not a layer")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like layer."""
    kind = linear_kind(module)
    if kind == "linear":
        return module.out_features, module.in_features
    if kind == "conv1d":
        return module.nf, module.nx
    raise TypeError(f"{type(module).__name__} is not a Linear-like layer")


def in_features(module: nn.Module) -> int:
    """Input features of a Linear-like layer (Conv1D's ``nx``)."""
    return linear_shape(module)[1]


def out_features(module: nn.Module) -> int:
    """Output features of a Linear-like layer (Conv1D's ``nf``)."""
    return linear_shape(module)[0]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear-like layer: the weight itself, or for Conv1D its transposed *view*.

    In-place edits of the result (``div_``, ``mul_``, ``copy_``) change the layer in its
    own layout. A masked layer gives its masked weight (what forward uses).
    """
    kind = linear_kind(module)
    if kind == "linear":
        return module.weight
    if kind == "conv1d":
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a Linear-like layer")


@torch.no_grad()
def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an (out, in) ``weight`` into a Linear-like layer, in place, in its own layout, dtype and device."""
    target = linear_weight(module)
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(f"an (out, in) weight of shape {tuple(target.shape)} is needed for "
                         f"{type(module).__name__}, got {tuple(weight.shape)}")
    target.copy_(weight.to(device=target.device, dtype=target.dtype))


def as_linear(module: nn.Module) -> nn.Linear:
    """An exact ``nn.Linear`` computing what the Linear-like ``module`` computes.

    An ``nn.Linear`` is returned as is; a subclass gives a plain Linear sharing its weight
    and bias Parameters; a Conv1D a Linear holding its transposed weight (a copy) and its
    bias Parameter. Raises TypeError for a module that is not linear-like.
    """
    if type(module) is nn.Linear:
        return module
    if not is_linear_like(module):
        raise TypeError(f"{type(module).__name__} is not a Linear-like layer: {linear_problem(module)}")
    out_f, in_f = linear_shape(module)
    new = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta")
    if linear_kind(module) == "linear":
        new.weight = module.weight
    else:
        w = module.weight
        new.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    new.bias = module.bias
    new.train(module.training)
    return new


# --- parents that read a child's weight instead of calling it -------------------------------


def bypassed_forward(model: nn.Module, name: str) -> str | None:
    """Why the layer at ``name`` is never *called* by its parent (which reads its ``.weight``), or None.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` / ``out_proj.bias`` to
    ``F.multi_head_attention_forward`` and never runs ``out_proj``: a replacement that
    does more than hold a weight (quantizing its input) would be skipped silently there.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention never calls out_proj (it passes out_proj.weight to "
                "F.multi_head_attention_forward), so its input cannot be quantized; weight-only methods work")
    return None


# --- embeddings --------------------------------------------------------------------------


def _plain_embedding_forward(module: nn.Embedding) -> bool:
    return _forward_owner(type(module)) is nn.Embedding


@torch.no_grad()
def embedding_scale(module: nn.Module) -> float | None:
    """The constant an Embedding's forward multiplies the looked-up rows by: None for ``nn.Embedding``'s own forward.

    A subclass qualifies when it has an ``embed_scale`` (a number or a one-element tensor,
    e.g. Gemma's √hidden) and its forward is checked, on a few token ids, to equal
    ``F.embedding(ids, weight) * embed_scale`` (the scale cast to the table's dtype, as
    transformers does). Raises ValueError with the reason for any other subclass (TypeError
    for a module that is not an Embedding).
    """
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"it is a {type(module).__name__}, not an Embedding")
    if _plain_embedding_forward(module):
        return None
    owner = _qualname(_forward_owner(type(module)))
    raw = getattr(module, "embed_scale", None)
    if isinstance(raw, torch.Tensor) and raw.numel() == 1:
        scale = float(raw.detach().to(module.weight.dtype).float())
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        scale = float(torch.tensor(float(raw), dtype=module.weight.dtype))
    else:
        raise ValueError(f"it is a {type(module).__name__}, whose forward ({owner}.forward) is not a plain "
                         "table lookup (no embed_scale to reproduce)")
    if module.weight.is_meta:
        raise ValueError(f"it is a {type(module).__name__} on the meta device: its forward cannot be checked")
    ids = torch.arange(min(module.num_embeddings, 16), device=module.weight.device)
    got = module(ids)
    want = F.embedding(ids, module.weight, module.padding_idx) * torch.tensor(scale, dtype=module.weight.dtype,
                                                                             device=module.weight.device)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got, want):
        raise ValueError(f"it is a {type(module).__name__}, whose forward ({owner}.forward) is not the table "
                         f"lookup times embed_scale={scale:g}")
    return scale


def embedding_problem(module: nn.Module) -> str | None:
    """Why an Embedding (or subclass) cannot be stored as codes, or None (see ``embedding_scale``)."""
    try:
        embedding_scale(module)
    except ValueError as exc:
        return str(exc)
    if module.max_norm is not None:
        return "max_norm renormalizes the table during forward, which codes cannot do"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return "its weight holds a parametrization (a pruning mask?): call slimkit.strip(model) first"
    return None
