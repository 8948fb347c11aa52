"""Attention heads and MLP neurons of transformers models as structured-pruning groups.

``find_groups(model, ("heads", "neurons"))`` recognises attention and MLP blocks by their
structure (child names and Linear shapes, no list of model classes) and returns one
``Group`` per block:

| block | unit | coupled slices (per unit) |
|---|---|---|
| BERT-style ``attention.self.{query,key,value}`` + ``attention.output.dense`` | head | ``head_size`` OUT rows of q, k, v; the same IN columns of the output dense |
| Llama/Qwen2/Mistral ``self_attn.{q,k,v,o}_proj`` (GQA) | key/value head with its query group | ``head_dim`` OUT rows of k and v; ``n_rep·head_dim`` OUT rows of q (its ``n_rep`` query heads) and IN columns of o |
| OPT ``self_attn.{q,k,v,out_proj}`` | head | as BERT |
| Llama ``mlp.{gate,up,down}_proj`` | neuron | one OUT row of gate and up, one IN column of down |
| BERT ``intermediate.dense`` + ``output.dense``; OPT ``fc1``/``fc2`` | neuron | one OUT row of the first, one IN column of the second |

With grouped-query attention query head ``i`` reads key/value head ``i // n_rep``
(``repeat_kv``), so a unit is a kv head and its ``n_rep`` consecutive query heads: the
number of query heads per kv head (``num_key_value_groups``) never changes. The residual
stream (hidden size), embeddings and the LM head are never members.

The forwards reshape with ``-1`` heads (``view(*shape, -1, head_dim)``), so slicing plus
the head-count attributes some modules keep (BERT's ``num_attention_heads`` and
``all_head_size``, OPT's ``num_heads``) is all a pruned block needs; ``head_dim`` and
``num_key_value_groups`` stay. Every attribute changed is recorded on the model
(``slimkit.pruning.resize.record_attributes``) so a checkpoint rebuilds.

Config (``sync_config``, run after every group's pruning): when every layer keeps the same
number of heads (or neurons), the fields of ``model.config`` that describe them are set —
``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (explicit, so it stays) and
``intermediate_size`` / ``ffn_dim`` — but only if building ``type(model)(config)`` on the
meta device gives exactly the pruned model's shapes, the same build slimkit's loader and
``from_pretrained`` do. BERT and OPT derive the head size as ``hidden_size /
num_attention_heads`` and so cannot express fewer heads in their config; for them (and
for any non-uniform pruning) the config keeps the dense sizes and the checkpoint's
shapes plus the recorded attributes rebuild the model (``resize_to_checkpoint``). A
pre-allocated ``StaticCache`` sizes itself from the config, so it needs uniform pruning;
the default dynamic cache works either way.

A block whose layout is not recognised (fused qkv as in GPT-2's ``c_attn``, a Linear that
is not a float ``nn.Linear``, a per-channel parameter beside the projections) is left
alone and named in ``groups.notes``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.pruning.group import IN, OUT, Group
from slimkit.core.structure import record_attributes

TARGETS = ("heads", "neurons")

# Child names of separate q/k/v projections, and of the output projection beside them.
_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
_OUT_NAMES = ("o_proj", "out_proj", "out_lin", "dense")
# Attributes of an attention module: head size; query-head count; kv-head count; q width.
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "dim_per_head")
_Q_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
_Q_WIDTH_ATTRS = ("all_head_size", "inner_dim")
# MLP layouts: gated (three Linear siblings) and two-layer (producer, consumer siblings).
_GATED_NAMES = (("gate_proj", "up_proj", "down_proj"),)
_PAIR_NAMES = (("fc1", "fc2"), ("lin1", "lin2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("wi", "wo"))
_MLP_WIDTH_ATTRS = ("intermediate_size", "ffn_dim")
# Config fields: per-head and MLP sizes (only those a config has are touched).
_CONFIG_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim")
_CONFIG_MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff")

_DENSE_KEY = "_slimkit_dense_config"  # model.__dict__ keys (plain attributes, never in the state dict)
_SYNC_KEY = "_slimkit_config_sync"


class TransformerGroups(list):
    """A list of ``Group`` plus ``notes``: the blocks left alone and why (named by module)."""

    def __init__(self, groups: Iterable[Group] = (), notes: Iterable[str] = ()):
        super().__init__(groups)
        self.notes: list[str] = list(notes)


@dataclass
class _Attention:
    """One recognised attention block: where its projections are and how heads map to channels."""

    root: str  # the block's name (BERT: the attention module holding ``self`` and ``output``)
    holder_name: str  # the module that owns q/k/v and the head-count attributes
    holder: nn.Module
    q: tuple[str, nn.Linear]
    k: tuple[str, nn.Linear]
    v: tuple[str, nn.Linear]
    o: tuple[str, nn.Linear]
    head_dim: int
    n_rep: int  # query heads per key/value head

    @property
    def n_kv(self) -> int:
        return self.k[1].out_features // self.head_dim

    @property
    def n_q(self) -> int:
        return self.q[1].out_features // self.head_dim


@dataclass
class _MLP:
    """One recognised MLP: the Linears whose outputs are the neurons, and the one that reads them."""

    root: str
    holder_name: str
    holder: nn.Module
    producers: list[tuple[str, nn.Linear]] = field(default_factory=list)
    consumer: tuple[str, nn.Linear] | None = None

    @property
    def width(self) -> int:
        return self.producers[0][1].out_features


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attr, value
    return None


def _linear_child(module: nn.Module, name: str) -> nn.Module | None:
    return getattr(module, name, None) if name in module._modules else None


def _not_linear(children: dict[str, nn.Module | None]) -> str:
    """'a (T), b (U) are' for the children that exist but are not float nn.Linear (quantized or custom); '' if none."""
    bad = [f"{n} ({type(m).__name__})" for n, m in children.items()
           if m is not None and (type(m) is not nn.Linear or not m.weight.is_floating_point())]
    return f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'}" if bad else ""


def _extra_channel_params(holder: nn.Module, skip: set[int], widths: set[int], head_dim: int) -> list[str]:
    """Parameterized children of ``holder`` (besides ``skip``) sized by the projected width: they would need slicing.

    A per-head parameter of ``head_dim`` entries (Qwen3's q_norm / k_norm, shared by all heads) is fine.
    """
    found = []
    for name, child in holder.named_children():
        if id(child) in skip:
            continue
        for pname, p in child.named_parameters():
            if p.dim() >= 1 and p.shape[0] in widths and p.shape[0] != head_dim:
                found.append(f"{name}.{pname}")
    return found


def _attention_at(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> _Attention | str | None:
    """The attention block whose q/k/v live in ``module``; a note string when its layout cannot be pruned."""
    for qn, kn, vn in _QKV_NAMES:
        q, k, v = (_linear_child(module, n) for n in (qn, kn, vn))
        if q is None or k is None or v is None:
            continue
        label = f"{name} ({type(module).__name__})"
        out_name, out, root = None, None, name
        for on in _OUT_NAMES:
            if _linear_child(module, on) is not None:
                out_name, out = _join(name, on), getattr(module, on)
                break
        if out is None and name:
            # BERT layout: the attention's parent holds ``output.dense`` beside this ``self`` module.
            parent_name = name.rpartition(".")[0]
            parent = parents.get(parent_name)
            output = _linear_child(parent, "output") if parent is not None else None
            dense = _linear_child(output, "dense") if output is not None else None
            if dense is not None:
                out_name, out, root = _join(parent_name, "output.dense"), dense, parent_name
        if out is None:
            return f"{label}: no output projection ({'/'.join(_OUT_NAMES)}) found; its heads are left alone"
        bad = _not_linear({qn: q, kn: k, vn: v, out_name: out})
        if bad:
            return (f"{label}: {bad} not a float nn.Linear; heads can be pruned only before "
                    "quantizing or replacing layers")
        head_dim = _int_attr(module, _HEAD_DIM_ATTRS)
        heads = _int_attr(module, _Q_HEAD_ATTRS)
        if head_dim is None and heads is not None and q.out_features % heads[1] == 0:
            head_dim = ("", q.out_features // heads[1])
        if head_dim is None:
            return f"{label}: no head size attribute ({'/'.join(_HEAD_DIM_ATTRS)}); its heads are left alone"
        hd = head_dim[1]
        if q.out_features % hd or k.out_features % hd or k.out_features != v.out_features:
            return (f"{label}: q/k/v widths {q.out_features}/{k.out_features}/{v.out_features} are not whole "
                    f"heads of {hd}; its heads are left alone")
        n_q, n_kv = q.out_features // hd, k.out_features // hd
        if n_q % n_kv:
            return f"{label}: {n_q} query heads do not split over {n_kv} key/value heads; left alone"
        n_rep = n_q // n_kv
        groups_attr = getattr(module, "num_key_value_groups", None)
        if isinstance(groups_attr, int) and groups_attr != n_rep:
            return (f"{label}: num_key_value_groups={groups_attr} does not match {n_q} query / {n_kv} "
                    "key/value heads; left alone")
        if out.in_features != q.out_features:
            return f"{label}: {out_name} reads {out.in_features} channels, q gives {q.out_features}; left alone"
        extra = _extra_channel_params(module, {id(q), id(k), id(v), id(out)}, {q.out_features, k.out_features}, hd)
        if extra:
            return f"{label}: {', '.join(extra)} are sized by the heads and not handled; its heads are left alone"
        return _Attention(root, name, module, (_join(name, qn), q), (_join(name, kn), k), (_join(name, vn), v),
                          (out_name, out), hd, n_rep)
    return None


def _mlp_at(name: str, module: nn.Module) -> _MLP | str | None:
    """The MLP whose Linears are children of ``module``; a note string when it cannot be pruned."""
    label = f"{name} ({type(module).__name__})"
    for gn, un, dn in _GATED_NAMES:
        gate, up, down = (_linear_child(module, n) for n in (gn, un, dn))
        if gate is None or up is None or down is None:
            continue
        bad = _not_linear({gn: gate, un: up, dn: down})
        if bad:
            return f"{label}: {bad} not a float nn.Linear; its neurons are left alone"
        if not gate.out_features == up.out_features == down.in_features:
            return f"{label}: {gn}/{un}/{dn} widths disagree; its neurons are left alone"
        return _MLP(name, name, module, [(_join(name, gn), gate), (_join(name, un), up)], (_join(name, dn), down))
    for pn, cn in _PAIR_NAMES:
        prod, cons = _linear_child(module, pn), _linear_child(module, cn)
        if prod is None or cons is None:
            continue
        bad = _not_linear({pn: prod, cn: cons})
        if bad:
            return f"{label}: {bad} not a float nn.Linear; its neurons are left alone"
        if prod.out_features != cons.in_features:
            return f"{label}: {pn} gives {prod.out_features} channels, {cn} reads {cons.in_features}; left alone"
        return _MLP(_join(name, pn), name, module, [(_join(name, pn), prod)], (_join(name, cn), cons))
    inter, output = _linear_child(module, "intermediate"), _linear_child(module, "output")
    if inter is not None and output is not None:
        # BERT layout: layer.intermediate.dense -> activation -> layer.output.dense (+ residual, LayerNorm).
        prod, cons = _linear_child(inter, "dense"), _linear_child(output, "dense")
        if prod is None or cons is None:
            return None
        bad = _not_linear({"intermediate.dense": prod, "output.dense": cons})
        if bad:
            return f"{label}: {bad} not a float nn.Linear; its neurons are left alone"
        if prod.out_features != cons.in_features:
            return None
        inter_name = _join(name, "intermediate")
        return _MLP(inter_name, inter_name, inter, [(_join(inter_name, "dense"), prod)],
                    (_join(name, "output.dense"), cons))
    return None


def _discover(model: nn.Module) -> tuple[list[_Attention], list[_MLP], list[str]]:
    """The recognised attention blocks, MLPs, and notes on blocks that look like one but are not handled."""
    modules = dict(model.named_modules())
    attentions: list[_Attention] = []
    mlps: list[_MLP] = []
    notes: list[str] = []
    covered: set[str] = set()  # names inside or around a recognised block
    for name, module in modules.items():
        found = _attention_at(name, module, modules)
        if isinstance(found, _Attention):
            attentions.append(found)
            covered.update({found.root, found.holder_name})
        elif isinstance(found, str):
            notes.append(found)
            covered.add(name)
        found_mlp = _mlp_at(name, module)
        if isinstance(found_mlp, _MLP):
            mlps.append(found_mlp)
            covered.update({found_mlp.root, found_mlp.holder_name})
        elif isinstance(found_mlp, str):
            notes.append(found_mlp)
            covered.add(name)
    # Blocks that are named like attention or an MLP but matched no layout: say so rather than skip silently.
    for name, module in modules.items():
        kind = type(module).__name__
        looks = ("Attention" in kind and "Output" not in kind) or "MLP" in kind or kind.endswith("FeedForward")
        if not looks or next(module.parameters(), None) is None:
            continue
        near = any(c == name or c.startswith(name + ".") or name.startswith(c + ".") for c in covered)
        if not near:
            notes.append(f"{name} ({kind}): layout not recognised (e.g. fused q/k/v); it is left alone")
            covered.add(name)
    return attentions, mlps, notes


def _record(model: nn.Module, module_name: str, attrs: dict[str, int]) -> None:
    """Record changed module attributes so a checkpoint's rebuild can set them again."""
    if attrs:
        record_attributes(model, module_name, attrs)


def _set_attrs(module: nn.Module, changes: dict[tuple[str, ...], tuple[int, int]]) -> dict[str, int]:
    """For each attribute family, set the attribute that holds the old value to the new one; returns what changed."""
    done = {}
    for names, (old, new) in changes.items():
        for attr in names:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(module, attr, new)
                done[attr] = new
    return done


def _head_group(model: nn.Module, att: _Attention) -> Group:
    hd, n_rep, n_kv = att.head_dim, att.n_rep, att.n_kv
    group = Group(att.root, n_kv, unit="head")
    kv_index = torch.arange(n_kv * hd).reshape(n_kv, hd)  # unit g: kv channels g*hd .. (g+1)*hd-1
    q_index = torch.arange(n_kv * n_rep * hd).reshape(n_kv, n_rep * hd)  # its n_rep query heads, contiguous
    group.add(*att.q, OUT, q_index, "query heads" if n_rep == 1 else f"{n_rep} query heads per kv head")
    group.add(*att.k, OUT, kv_index, "key heads")
    group.add(*att.v, OUT, kv_index, "value heads")
    group.add(*att.o, IN, q_index, "attention output inputs")
    if n_rep > 1:
        group.notes.append(f"grouped-query attention: each unit is one key/value head with its {n_rep} query heads "
                           f"(num_key_value_groups stays {n_rep})")
    state = {"n_kv": n_kv}

    def update(keep: torch.Tensor) -> None:
        old_kv, new_kv = state["n_kv"], int(keep.numel())
        state["n_kv"] = new_kv
        changed = _set_attrs(att.holder, {
            _Q_HEAD_ATTRS: (old_kv * n_rep, new_kv * n_rep),
            _KV_HEAD_ATTRS: (old_kv, new_kv),
            _Q_WIDTH_ATTRS: (old_kv * n_rep * hd, new_kv * n_rep * hd),
        })
        _record(model, att.holder_name, changed)
        sync_config(model)

    group.on_prune.append(update)
    return group


def _neuron_group(model: nn.Module, mlp: _MLP) -> Group:
    width = mlp.width
    group = Group(mlp.root, width, unit="neuron")
    index = torch.arange(width).unsqueeze(1)
    for name, layer in mlp.producers:
        group.add(name, layer, OUT, index, "neurons")
    group.add(*mlp.consumer, IN, index, "neuron inputs")
    state = {"width": width}

    def update(keep: torch.Tensor) -> None:
        old, new = state["width"], int(keep.numel())
        state["width"] = new
        _record(model, mlp.holder_name, _set_attrs(mlp.holder, {_MLP_WIDTH_ATTRS: (old, new)}))
        sync_config(model)

    group.on_prune.append(update)
    return group


def find_groups(model: nn.Module, targets: tuple[str, ...] = TARGETS) -> TransformerGroups:
    """One Group per attention block (``"heads"``) and per MLP (``"neurons"``) of ``model``, in module order.

    Roots: the attention module (``model.layers.0.self_attn``, BERT ``encoder.layer.0.attention``)
    and the MLP module or its first layer (``model.layers.0.mlp``, BERT
    ``encoder.layer.0.intermediate``, OPT ``model.decoder.layers.0.fc1``). Pruning a group
    updates the block's head-count attributes and ``model.config`` (see ``sync_config``).
    Blocks of an unrecognised layout are left out and named in the result's ``notes``.
    """
    if isinstance(targets, str):
        targets = (targets,)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"targets: {unknown or list(targets)} not valid for transformer blocks; "
                          f"choose from {list(TARGETS)}")
    attentions, mlps, notes = _discover(model)
    _snapshot_config(model)
    groups: list[Group] = []
    if "heads" in targets:
        groups += [_head_group(model, a) for a in attentions]
    if "neurons" in targets:
        groups += [_neuron_group(model, m) for m in mlps]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups.sort(key=lambda g: order.get(g.root, len(order)))
    if not groups:
        notes.append(f"{type(model).__name__}: no attention block or MLP of a known layout for targets {list(targets)}")
    return TransformerGroups(groups, notes)


# -- model.config --------------------------------------------------------------------------
def _snapshot_config(model: nn.Module) -> dict[str, object]:
    """The config's size fields before any pruning (kept on the model; the first call wins)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    fields = _CONFIG_HEAD_FIELDS + _CONFIG_MLP_FIELDS
    return model.__dict__.setdefault(_DENSE_KEY, {f: getattr(config, f) for f in fields if hasattr(config, f)})


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _rebuilds(model: nn.Module, values: dict[str, object], keys: list[str]) -> bool:
    """Whether ``type(model)(config with values)`` gives the model's shapes for the state-dict ``keys``.

    Built on the meta device (no memory, a few milliseconds), exactly as slimkit's loader and
    ``from_pretrained`` build the class from its config.
    """
    config = copy.deepcopy(model.config)
    for key, value in values.items():
        setattr(config, key, value)
    try:
        from slimkit.core.io import quiet_transformers

        quiet_transformers()
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # noqa: BLE001 - a config the class rejects (e.g. hidden size not divisible by heads)
        return False
    mine, theirs = _shapes(model), _shapes(fresh)
    return all(k in theirs and theirs[k] == mine[k] for k in keys)


def sync_config(model: nn.Module) -> list[str]:
    """Set ``model.config``'s head and MLP sizes when every layer agrees and the class rebuilds from them.

    Otherwise those fields keep their dense values (a checkpoint then rebuilds through
    ``resize_to_checkpoint``). Idempotent and cheap to call again; returns notes on what
    the config says, for the run's report.
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return []
    dense = _snapshot_config(model)
    attentions, mlps, _ = _discover(model)
    signature = (tuple((a.n_q, a.n_kv, a.head_dim) for a in attentions), tuple(m.width for m in mlps))
    cache = model.__dict__.setdefault(_SYNC_KEY, {})
    if signature not in cache:
        cache[signature] = _config_values(model, dense, attentions, mlps)
    accepted, notes = cache[signature]
    for key, value in {**dense, **accepted}.items():
        setattr(config, key, value)
    return list(notes)


def _config_values(model: nn.Module, dense: dict[str, object], attentions: list[_Attention],
                   mlps: list[_MLP]) -> tuple[dict[str, object], tuple[str, ...]]:
    """The config fields to set for the model's current shapes, and notes saying why (see ``sync_config``)."""
    notes: list[str] = []
    heads: dict[str, object] = {}
    counts = {(a.n_q, a.n_kv, a.head_dim) for a in attentions}
    if len(counts) == 1:
        n_q, n_kv, hd = counts.pop()
        wanted = {"num_attention_heads": n_q, "num_key_value_heads": n_kv}
        heads = {k: v for k, v in wanted.items() if k in dense}
        if any(dense[k] != v for k, v in heads.items()):
            heads["head_dim"] = hd  # explicit, so a rebuild does not derive it as hidden_size / heads
        else:
            heads = {}  # heads not pruned
    elif counts:
        notes.append(f"config keeps {_describe(dense, _CONFIG_HEAD_FIELDS)}: layers keep different head counts; "
                     "the checkpoint's shapes and recorded attributes rebuild the model")
    neurons: dict[str, object] = {}
    widths = {m.width for m in mlps}
    if len(widths) == 1:
        width = widths.pop()
        field_name = next((f for f in _CONFIG_MLP_FIELDS if isinstance(dense.get(f), int)), None)
        if field_name is not None and dense[field_name] != width:
            neurons = {field_name: width}
    elif widths:
        notes.append(f"config keeps {_describe(dense, _CONFIG_MLP_FIELDS)}: layers keep different MLP widths; "
                     "the checkpoint's shapes rebuild the model")
    head_keys = [f"{n}.weight" for a in attentions for n in (a.q[0], a.k[0], a.o[0])]
    mlp_keys = [f"{m.consumer[0]}.weight" for m in mlps] + [f"{n}.weight" for m in mlps for n, _ in m.producers]
    accepted: dict[str, object] = {}
    if heads and neurons and _rebuilds(model, {**dense, **heads, **neurons}, head_keys + mlp_keys):
        accepted = {**heads, **neurons}
    else:
        for part, keys, what in ((neurons, mlp_keys, "MLP width"), (heads, head_keys, "head counts")):
            # Each part alone, checked on its own layers only: the other may still need the checkpoint's shapes.
            if not part:
                continue
            if _rebuilds(model, {**dense, **accepted, **part}, keys):
                accepted.update(part)
            else:
                kept = tuple(k for k in part if k in dense)
                notes.append(f"config keeps {_describe(dense, kept)}: {type(model).__name__} cannot express the "
                             f"pruned {what} ({_describe(part, kept)}) in its config (e.g. its head size is "
                             "hidden_size / num_attention_heads); the checkpoint's shapes and recorded "
                             "attributes rebuild the model")
    if accepted:
        notes.insert(0, f"config: {_describe(accepted, tuple(accepted))} (every layer the same)")
    return accepted, tuple(notes)


def _describe(values: dict[str, object], fields: tuple[str, ...]) -> str:
    return ", ".join(f"{f}={values[f]}" for f in fields if f in values) or "its sizes"
