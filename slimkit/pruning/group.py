"""Structured pruning's vocabulary: a Group of coupled slices that must lose the same units.

Removing one output filter of a conv removes a row of its weight, an entry of the
BatchNorm after it and a column of every layer that reads it; removing an attention head
removes ``head_dim`` rows of q, k and v and ``head_dim`` columns of o. A ``Group`` lists
those *members*: each is (module, dimension, index) where ``index[u]`` holds the channels
of that module's dimension that *unit* ``u`` owns (one channel for a filter, ``head_dim``
channels for a head, ``H*W`` flattened positions for a filter feeding a Linear through a
flatten). Pruning a group keeps a subset of its units in every member at once, so the
model stays consistent; ``Group.details()`` says what would be removed where.

Builders of groups (the dependency graph for plain modules, the transformer head and
neuron finders) only fill members; the slicing of every supported layer lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import UnsupportedError

OUT, IN = 0, 1  # member.dim: the output side (weight rows, norm features) or the input side (weight columns)


@dataclass
class Member:
    """One slice of a group: ``module`` (called ``name`` in the model) loses, along ``dim``, the channels of removed units.

    ``index`` is a LongTensor (units, channels_per_unit); ``role`` says why the module is
    coupled (e.g. "output filters", "input channels", "query heads"), for ``details``.
    """

    name: str
    module: nn.Module
    dim: int
    index: torch.Tensor
    role: str = ""

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """The sorted channels of this member's dimension that ``units`` own."""
        return torch.sort(self.index[units].reshape(-1)).values


@dataclass
class Group:
    """Coupled members that lose the same units; ``units`` of kind ``unit`` ("filter", "neuron", "head", "channel").

    ``root`` names the layer whose outputs define the units. ``on_prune`` callbacks run
    after slicing with the kept unit indices (to update e.g. an attention module's head
    count); ``notes`` carry what the builder wants the user to know (a boundary it stopped at).
    """

    root: str
    units: int
    unit: str = "channel"
    members: list[Member] = field(default_factory=list)
    on_prune: list[Callable[[torch.Tensor], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, module: nn.Module, dim: int, index: torch.Tensor, role: str = "") -> None:
        """Add a member; ``index`` must give every unit the same number of channels."""
        if index.dim() == 1:
            index = index.unsqueeze(1)
        if index.shape[0] != self.units:
            raise ValueError(f"{name}: index has {index.shape[0]} units, group {self.root!r} has {self.units}")
        self.members.append(Member(name, module, dim, index.long(), role))

    def details(self, removed: torch.Tensor | None = None) -> str:
        """A readable account of the group: its units and every coupled slice (with what ``removed`` would take)."""
        lines = [f"group {self.root!r}: {self.units} {self.unit}(s), {len(self.members)} coupled slice(s)"]
        for m in self.members:
            side = "out" if m.dim == OUT else "in"
            shape = tuple(m.module.weight.shape) if getattr(m.module, "weight", None) is not None else ()
            extra = ""
            if removed is not None:
                extra = f", removes {int(m.channels(removed).numel())} channel(s)"
            lines.append(f"  {m.name} [{type(m.module).__name__} {shape}] {side} dim, "
                         f"{m.index.shape[1]} channel(s) per {self.unit}{', ' + m.role if m.role else ''}{extra}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.details()

    def prune(self, keep_units: torch.Tensor) -> None:
        """Keep only ``keep_units`` (unit indices) in every member, then run ``on_prune``.

        Shorthand for ``prune_groups([self], [keep_units])``: when other groups share one
        of this group's modules (two concat branches feeding one conv), prune them together
        with ``prune_groups`` so their channel indices are renumbered too.
        """
        prune_groups([self], [keep_units])


def _dim_key(module: nn.Module, dim: int) -> int:
    """The physical dimension a member slices: a depthwise conv's IN and OUT sides are one dimension."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and \
            module.groups == module.in_channels == module.out_channels:
        return OUT
    return dim


def dim_size(module: nn.Module, dim: int) -> int:
    """How many channels ``module`` has along ``dim`` (OUT or IN) as ``slice_module`` counts them."""
    if isinstance(module, nn.Linear):
        return module.out_features if dim == OUT else module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if _dim_key(module, dim) == OUT else module.in_channels
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if dim == IN else module.num_embeddings
    raise UnsupportedError(f"{type(module).__name__} cannot be pruned structurally")


def prune_groups(groups: list[Group], keeps: list[torch.Tensor]) -> None:
    """Prune several groups at once: group ``i`` keeps units ``keeps[i]``; every module is sliced once.

    Groups may share a module dimension as long as they own disjoint channels of it (a
    concat's branches each own a slice of the next conv's inputs). All groups' indices are
    renumbered to the sliced modules, so pass every group that references a module being
    sliced, pruned or not (``keeps[i]`` = all units leaves group i unchanged but renumbers it).
    Every group is checked before anything is modified.
    """
    if len(groups) != len(keeps):
        raise ValueError(f"prune_groups got {len(groups)} groups and {len(keeps)} keep lists")
    kept_units = []
    for g, keep in zip(groups, keeps):
        keep = torch.sort(torch.as_tensor(keep, dtype=torch.long).reshape(-1).unique()).values
        if keep.numel() == 0:
            raise UnsupportedError(f"pruning would remove every {g.unit} of {g.root!r}")
        if keep.min() < 0 or keep.max() >= g.units:
            raise ValueError(f"group {g.root!r}: unit indices must lie in [0, {g.units}), got {keep.tolist()}")
        kept_units.append(keep)

    # (module id, physical dim) -> [module, name, dim, channels to remove]
    sliced: dict[tuple[int, int], list] = {}
    for g, keep in zip(groups, kept_units):
        if keep.numel() == g.units:
            continue
        removed = torch.ones(g.units, dtype=torch.bool)
        removed[keep] = False
        gone = removed.nonzero().reshape(-1)
        for m in g.members:
            key = (id(m.module), _dim_key(m.module, m.dim))
            entry = sliced.setdefault(key, [m.module, m.name, m.dim, []])
            entry[3].append(m.channels(gone))

    # Two groups claiming one channel would each renumber it differently: refuse up front.
    for key, (module, name, dim, _) in sliced.items():
        claims = torch.cat([m.index.reshape(-1) for g in groups for m in g.members
                            if (id(m.module), _dim_key(m.module, m.dim)) == key])
        if claims.unique().numel() != claims.numel():
            raise UnsupportedError(f"{name!r}: two groups claim the same channel of it; its groups overlap")

    # old channel -> new position (-1 = removed), per sliced module dimension
    maps: dict[tuple[int, int], torch.Tensor] = {}
    for key, (module, name, dim, parts) in sliced.items():
        size = dim_size(module, dim)
        gone = torch.cat(parts).unique()
        if gone.numel() >= size:
            raise UnsupportedError(f"pruning would remove every channel of {name!r}")
        keep_mask = torch.ones(size, dtype=torch.bool)
        keep_mask[gone] = False
        mapping = torch.full((size,), -1, dtype=torch.long)
        mapping[keep_mask] = torch.arange(int(keep_mask.sum()))
        maps[key] = mapping
    for key, (module, name, dim, _) in sliced.items():
        slice_module(module, dim, (maps[key] >= 0).nonzero().reshape(-1), name)

    changed = [keep.numel() != g.units for g, keep in zip(groups, kept_units)]
    for g, keep, pruned in zip(groups, kept_units, changed):
        for m in g.members:
            index = m.index[keep] if pruned else m.index
            mapping = maps.get((id(m.module), _dim_key(m.module, m.dim)))
            if mapping is not None:
                index = mapping[index]
                if (index < 0).any():
                    raise RuntimeError(f"group {g.root!r}: a kept channel of {m.name!r} was removed by another group "
                                       "(two groups claim the same channel)")
            m.index = index
        g.units = int(keep.numel())
    for g, keep, pruned in zip(groups, kept_units, changed):
        if pruned:
            for fn in g.on_prune:
                fn(keep)


def _keep_param(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(module, attr, None)
    if p is None:
        return
    new = p.data.index_select(dim, keep.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        setattr(module, attr, new)  # a buffer (running stats): assigning a tensor keeps it registered


@torch.no_grad()
def slice_module(module: nn.Module, dim: int, keep: torch.Tensor, name: str = "") -> None:
    """Keep only channels ``keep`` of ``module`` along ``dim`` (OUT or IN), updating its size attributes.

    Supports Linear, Conv1d/2d/3d (grouped only when depthwise: one channel per group),
    BatchNorm, LayerNorm over the last dim, GroupNorm-free norms, and Embedding (IN = the
    embedding dimension). Anything else is an UnsupportedError naming the module.
    """
    label = name or type(module).__name__
    if isinstance(module, nn.Linear):
        if dim == OUT:
            _keep_param(module, "weight", 0, keep)
            _keep_param(module, "bias", 0, keep)
            module.out_features = int(keep.numel())
        else:
            _keep_param(module, "weight", 1, keep)
            module.in_features = int(keep.numel())
        return
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            raise UnsupportedError(f"{label}: transposed convolutions cannot be pruned structurally yet")
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise UnsupportedError(f"{label}: grouped convolution (groups={module.groups}) is not supported; "
                                   "only depthwise (groups = channels) and ungrouped convs can be pruned")
        if dim == OUT or depthwise:
            _keep_param(module, "weight", 0, keep)
            _keep_param(module, "bias", 0, keep)
            module.out_channels = int(keep.numel())
            if depthwise:
                module.in_channels = module.groups = int(keep.numel())
        else:
            _keep_param(module, "weight", 1, keep)
            module.in_channels = int(keep.numel())
        return
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _keep_param(module, attr, 0, keep)
        module.num_features = int(keep.numel())
        return
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise UnsupportedError(f"{label}: LayerNorm over {module.normalized_shape} cannot be sliced")
        _keep_param(module, "weight", 0, keep)
        _keep_param(module, "bias", 0, keep)
        module.normalized_shape = (int(keep.numel()),)
        return
    if isinstance(module, nn.Embedding):
        if dim != IN:
            raise UnsupportedError(f"{label}: an Embedding can only lose embedding dimensions (IN), not rows")
        _keep_param(module, "weight", 1, keep)
        module.embedding_dim = int(keep.numel())
        return
    raise UnsupportedError(f"{label}: {type(module).__name__} cannot be pruned structurally; "
                           "ignore it or treat it as a boundary")


def unit_weights(member: Member, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The member's weight (or ``tensor``, shaped like it, e.g. its gradient) arranged per unit: (units, rest).

    Row ``u`` holds every element of the channels unit ``u`` owns, for importance scores.
    A norm member gives its affine weight (|gamma| is BN-scale importance); a member
    without a weight gives a zero-width tensor.
    """
    weight = getattr(member.module, "weight", None)
    if weight is None:
        return torch.zeros(member.index.shape[0], 0)
    w = (weight if tensor is None else tensor).detach()
    flat = member.index.reshape(-1).to(w.device)
    if isinstance(member.module, nn.Embedding):
        w = w.t()  # Embedding's IN side is its columns; put it first like every other layer's dim
        picked = w.index_select(0, flat)
    elif isinstance(member.module, nn.modules.conv._ConvNd) and member.dim == IN and member.module.groups > 1:
        picked = w.index_select(0, flat)  # depthwise: the channel's own kernel
    else:
        picked = w.index_select(member.dim, flat)
        if member.dim == IN:
            picked = picked.transpose(0, 1)
    return picked.reshape(member.index.shape[0], -1)  # (units, channels_per_unit * rest)
