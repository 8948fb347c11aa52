"""Rebuild a structurally pruned model from its checkpoint: resize layers, restore recorded attributes.

Structured pruning changes layer sizes, so a freshly built architecture no longer matches
the saved state dict. Two things make it reload:

- ``resize_to_checkpoint(model, shapes, structure)`` replaces every Linear, Conv, BatchNorm,
  LayerNorm and Embedding whose parameter shapes differ from the checkpoint's (the
  safetensors header gives them without reading any data) by a fresh module of the
  checkpoint's shapes, keeping its other settings, dtype and device; then it sets the
  attributes recorded at prune time (``structure``: module name -> {attribute: value},
  e.g. an attention module's head count), which shapes alone do not determine.
- ``core.structure.record_attributes(model, name, {...})`` is how pruning code records those
  attributes (JSON-able values, kept in ``model.__dict__["_slimkit_structure"]``);
  ``structure_of(model)`` reads them back for the checkpoint.

Zoo models with an architecture config (digits-cnn) also get the config updated
(``sync_arch_config``) so the zoo builder alone rebuilds the pruned shape.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from slimkit.core.errors import ModelLoadError
from slimkit.core.structure import STRUCTURE_ATTR, record_attributes, structure_of  # noqa: F401 (re-exported)
from slimkit.core.targets import set_submodule

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _shape(value: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _resized(name: str, module: nn.Module, want: dict[str, tuple[int, ...]]) -> nn.Module:
    """A fresh module like ``module`` whose parameters and buffers have the shapes in ``want``."""
    ref = module.weight if getattr(module, "weight", None) is not None else next(
        (t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
         if t.is_floating_point()), None)
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    t = type(module)
    if t is nn.Linear:
        out_f, in_f = want["weight"]
        new: nn.Module = nn.Linear(in_f, out_f, bias=module.bias is not None, **kw)
    elif t in _CONVS and not module.transposed:
        out_c, in_per_group = want["weight"][:2]
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = out_c if depthwise else module.groups
        if depthwise and in_per_group != 1:
            raise ModelLoadError(f"{name}: checkpoint weight {want['weight']} does not fit a depthwise convolution")
        new = t(in_per_group * groups, out_c, module.kernel_size, stride=module.stride, padding=module.padding,
                dilation=module.dilation, groups=groups, bias=module.bias is not None,
                padding_mode=module.padding_mode, **kw)
    elif t in _BNS:
        size = next(want[k][0] for k in ("weight", "running_mean", "bias", "running_var") if k in want)
        new = t(size, eps=module.eps, momentum=module.momentum, affine=module.affine,
                track_running_stats=module.track_running_stats, **kw)
    elif t is nn.LayerNorm:
        shape = want.get("weight") or want.get("bias")
        if shape is None:
            raise ModelLoadError(f"{name}: a LayerNorm without affine parameters has no shape to take")
        new = nn.LayerNorm(shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                           bias=module.bias is not None, **kw)
    elif t is nn.Embedding:
        num, dim = want["weight"]
        new = nn.Embedding(num, dim, padding_idx=module.padding_idx, max_norm=module.max_norm,
                           norm_type=module.norm_type, scale_grad_by_freq=module.scale_grad_by_freq,
                           sparse=module.sparse, **kw)
    else:
        raise ModelLoadError(f"checkpoint shapes of {name!r} ({type(module).__name__}) differ from the built "
                             "architecture and slimkit cannot resize that layer type")
    new.train(module.training)
    return new


def resize_to_checkpoint(model: nn.Module, shapes: Mapping[str, Sequence[int]],
                         structure: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Resize ``model``'s layers to a checkpoint's tensor ``shapes`` (state-dict name -> shape); returns the names.

    Every module whose own parameters or buffers differ in shape from ``shapes`` is
    replaced by a fresh module of the checkpoint's shapes (its values are then loaded from
    the checkpoint); names absent from ``shapes`` are left alone (a strict load reports
    them). Then each ``structure`` entry's attributes are set on its module and recorded on
    the model, so saving it again keeps them. ModelLoadError names a module that cannot be
    resized or a structure entry naming a module the model lacks.
    """
    replaced: dict[int, nn.Module] = {}
    changed: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replaced:  # the same module reached by a second path
            set_submodule(model, name, replaced[id(module)])
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        want: dict[str, tuple[int, ...]] = {}
        differs = False
        for attr, tensor in own:
            key = f"{name}.{attr}" if name else attr
            if key in shapes:
                want[attr] = _shape(shapes[key])
                differs |= want[attr] != tuple(tensor.shape)
        if not differs:
            continue
        if not name:
            raise ModelLoadError(f"the checkpoint's shapes of {type(model).__name__}'s own parameters differ "
                                 "from the built model's")
        new = _resized(name, module, want)
        for attr, tensor in list(new.named_parameters(recurse=False)) + list(new.named_buffers(recurse=False)):
            if attr in want and tuple(tensor.shape) != want[attr]:
                raise ModelLoadError(f"{name}.{attr}: checkpoint shape {want[attr]} cannot be rebuilt "
                                     f"(a {type(module).__name__} of that size has {tuple(tensor.shape)})")
        replaced[id(module)] = new
        set_submodule(model, name, new)
        changed.append(name)
    for name, attrs in (structure or {}).items():
        try:
            target = model.get_submodule(name) if name else model
        except AttributeError:
            raise ModelLoadError(f"recorded structure names module {name!r}, which the rebuilt model lacks") from None
        for attr, value in attrs.items():
            setattr(target, attr, copy.deepcopy(value))
        record_attributes(model, name, attrs)
    return changed


def sync_arch_config(model: nn.Module) -> bool:
    """Update a built-in model's architecture config to its current layer sizes; True when it has one.

    A model rebuilt from an architecture config (``arch_config()``, e.g. the zoo's CNN) must
    name its pruned widths there so the builder alone rebuilds the pruned model; such a model
    says how through its own ``sync_arch_config()`` method.
    """
    sync = getattr(model, "sync_arch_config", None)
    if callable(sync):
        sync()
        return True
    return False
