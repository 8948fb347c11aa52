"""The channel dependency graph of a plain nn.Module: which slices must be pruned together.

The model is traced with ``torch.fx`` and its example input's shapes are propagated
(``ShapeProp``); then every tensor of the graph gets, along its *channel dimension*, one
label per channel. A label is a variable: Conv, Linear and Embedding outputs create fresh
ones (they are the *producers* whose output channels can go); operations that keep
channels pass the labels on, and operations that tie channels together merge them
(union-find):

- Conv -> BatchNorm -> activation / pool / dropout / pad / upsample -> next Conv or Linear:
  the labels flow through, the BN gets an OUT member and the consumer an IN member;
- a depthwise conv (groups = channels) passes its input channels through (one member);
- ``a + b`` (and -, *, /): position i of both operands is one channel, so the producers
  of the two sides merge into one group (a residual block and its 1x1 downsample);
- ``torch.cat`` along the channel dim: each input's labels keep their offset slice, so
  each branch's producer owns its part of the next layer's inputs;
- flatten / view / reshape that merges the channel dim with the dims after it (conv ->
  flatten -> Linear): each channel owns ``H*W`` consecutive input columns of the Linear
  (the sizes come from the shape propagation); global pooling keeps one column each;
- permute / transpose move the channel dim; mean / sum over other dims keep it.

A *unit* of a group is one equivalence class of labels; the group's members are every
module slice whose channels carry the group's labels. Anything the graph does not
understand between a producer and its consumers (a view that splits channels, matmul,
indexing, a custom or grouped layer, a parameter used directly, weights tied between
modules, the model's output) makes the labels it touches *fixed*: a group with a fixed
unit is dropped and ``dropped`` says why, naming the op. Modules that the graph treats as
opaque (not traceable, not understood) are listed in ``boundaries``.

A model whose forward cannot be traced is retraced with the failing submodule as an
opaque leaf (reported as a boundary); a top-level forward that cannot be traced is an
UnsupportedError naming the model class.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimkit.core.errors import DataError, UnsupportedError
from slimkit.pruning.group import IN, OUT, Group

# Modules that act per element or per channel and keep the channel count.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Functions and tensor methods that keep channels (their first argument is the data).
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate, F.pad, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
    torch.clamp, torch.clip, torch.square, torch.sqrt, torch.rsqrt, operator.neg, operator.pos, torch.neg,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs", "neg", "exp",
    "sqrt", "rsqrt", "square", "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as",
    "detach", "cpu", "cuda", "requires_grad_",
}
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
# Ops that only read metadata (sizes, dtype): they neither move nor read channel values.
_HARMLESS_METHODS = {"size", "dim", "numel", "type", "ndimension"}
_HARMLESS_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


@dataclass
class _Labels:
    """The channel labels of one tensor: ``ids[i]`` labels index ``i`` of dimension ``dim``."""

    dim: int
    ids: list[int]


class _Vars:
    """Union-find over channel labels, each optionally *fixed* (cannot be pruned) with a reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: dict[int, str] = {}
        self.producer: dict[int, str] = {}  # label -> the module whose output channel it is

    def new(self, n: int, producer: str | None = None, fixed: str | None = None) -> list[int]:
        start = len(self.parent)
        ids = list(range(start, start + n))
        self.parent.extend(ids)
        for i in ids:
            if producer is not None:
                self.producer[i] = producer
            if fixed is not None:
                self.fixed[i] = fixed
        return ids

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the older label stays the root
        return min(ra, rb)

    def fix(self, ids: Iterable[int], reason: str) -> None:
        for i in ids:
            self.fixed.setdefault(i, reason)


class _Tracer(fx.Tracer):
    """An fx tracer that keeps ``leaves`` opaque and remembers the innermost submodule whose forward failed."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from slimkit.core.modules import SlimkitModule

        if module_qualified_name in self.leaves or isinstance(m, SlimkitModule):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost non-leaf module sees the exception first.
            if self.failed_at is None and name and not self.is_leaf_module(m, name):
                self.failed_at = name
            raise


def trace(model: nn.Module, max_retries: int = 32) -> tuple[fx.GraphModule, dict[str, str]]:
    """``model`` as an fx GraphModule, plus the submodules made opaque leaves because they failed to trace.

    Returns ``(graph_module, {module name: why it could not be traced})``. Raises
    UnsupportedError naming the model class when its own forward cannot be traced.
    """
    leaves: dict[str, str] = {}
    for _ in range(max_retries):
        tracer = _Tracer(set(leaves))
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: retry with the failing module as a leaf
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            if tracer.failed_at is None or tracer.failed_at in leaves:
                raise UnsupportedError(
                    f"cannot trace {type(model).__name__}.forward with torch.fx ({reason}); structured pruning "
                    "needs a traceable forward: move data-dependent control flow into a submodule (it is then "
                    "kept whole) or prune the traceable part") from None
            leaves[tracer.failed_at] = reason
            continue
        return fx.GraphModule(tracer.root, graph, type(model).__name__), leaves
    raise UnsupportedError(f"cannot trace {type(model).__name__}: more than {max_retries} submodules failed to trace")


def _qualified(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if module.startswith("torch") or module == "_operator":
        module = {"_operator": "operator", "torch.nn.functional": "F"}.get(module, module.split(".")[0])
    return f"{module}.{name}" if module else name


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return _qualified(node.target)
    return f"{node.op} {node.target}"


def _shape(node: Any) -> tuple[int, ...] | None:
    """The output shape ShapeProp recorded for ``node`` when it is a single tensor, else None."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class DependencyGraph:
    """The prunable channel groups of a plain nn.Module, found by tracing it on ``example_input``.

    ``groups``: one ``Group`` per set of coupled output channels (root = the first producer
    in graph order). ``dropped``: ``(producer, reason)`` for producers whose channels cannot
    be pruned. ``boundaries``: ``(module, reason)`` for modules the graph stops at (opaque,
    untraceable, or feeding the model output). ``explain()`` renders all three.
    ``example_input``: a tensor, a tuple of tensors (positional) or a dict (keyword inputs).
    """

    def __init__(self, model: nn.Module, example_input: Any) -> None:
        self.model = model
        self.groups: list[Group] = []
        self.dropped: list[tuple[str, str]] = []
        self.boundaries: list[tuple[str, str]] = []
        self._vars = _Vars()
        self._labels: dict[fx.Node, _Labels | None] = {}
        # (module name, dim) -> {position: label}; insertion order = graph order
        self._members: dict[tuple[str, int], dict[int, int]] = {}
        self._roles: dict[tuple[str, int], str] = {}
        self._producer_labels: dict[str, list[int]] = {}
        self._direct: dict[str, str] = {}  # module -> why its parameters cannot change shape
        self._output_labels: list[int] = []

        gm, untraceable = trace(model)
        self._gm = gm
        self._modules = dict(gm.named_modules())
        for name, reason in untraceable.items():
            self._boundary(name, f"could not be traced ({reason}); kept whole")
        self._propagate_shapes(example_input)
        self._find_tied_parameters()
        for node in gm.graph.nodes:
            self._visit(node)
        self._build_groups()

    # -- setup ---------------------------------------------------------------------------
    def _propagate_shapes(self, example_input: Any) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        placeholders = [n for n in self._gm.graph.nodes if n.op == "placeholder"]
        if isinstance(example_input, torch.Tensor):
            args = [example_input]
        elif isinstance(example_input, (tuple, list)):
            args = list(example_input)
        elif isinstance(example_input, dict):
            args = []
            for p in placeholders:
                if p.target in example_input:
                    args.append(example_input[p.target])
                elif p.args:
                    args.append(p.args[0])  # the forward's default value
                else:
                    raise DataError(f"example input has no {p.target!r}, an argument of "
                                    f"{type(self.model).__name__}.forward")
        else:
            raise DataError(f"example input must be a tensor, a tuple of tensors or a dict, "
                            f"got {type(example_input).__name__}")
        if len(args) > len(placeholders):
            raise DataError(f"example input has {len(args)} tensors, {type(self.model).__name__}.forward takes "
                            f"{len(placeholders)}")
        for p in placeholders[len(args):]:
            if not p.args:
                raise DataError(f"example input does not give {p.target!r}, an argument of "
                                f"{type(self.model).__name__}.forward")
            args.append(p.args[0])
        was_training = self.model.training
        self.model.eval()  # train mode would update BatchNorm statistics
        try:
            with torch.no_grad():
                ShapeProp(self._gm).propagate(*args)
        except Exception as exc:  # noqa: BLE001 - whatever the model raised, the input is what to fix
            raise DataError(f"{type(self.model).__name__} failed on the example input "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                            "give an example input of the shape the model takes") from None
        finally:
            self.model.train(was_training)

    def _find_tied_parameters(self) -> None:
        owners: dict[int, list[str]] = {}
        for mname, module in self.model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        for names in owners.values():
            if len({n.rpartition(".")[0] for n in names}) > 1:
                for n in names:
                    self._direct.setdefault(n.rpartition(".")[0], f"its parameter is tied to {', '.join(names)}")

    def _boundary(self, name: str, reason: str) -> None:
        if (name, reason) not in self.boundaries:
            self.boundaries.append((name, reason))

    # -- labels ----------------------------------------------------------------------------
    def _get(self, x: Any) -> _Labels | None:
        return self._labels.get(x) if isinstance(x, fx.Node) else None

    def _attach(self, name: str, dim: int, labels: list[int], role: str) -> None:
        """Record that channel i of ``name``'s ``dim`` carries ``labels[i]`` (a second call unites them)."""
        slots = self._members.setdefault((name, dim), {})
        self._roles.setdefault((name, dim), role)
        for pos, lab in enumerate(labels):
            if pos in slots:
                self._vars.union(slots[pos], lab)  # a module applied twice: both inputs share its channels
            else:
                slots[pos] = lab

    def _fix_inputs(self, node: fx.Node, why: str) -> None:
        for inp in node.all_input_nodes:
            lab = self._get(inp)
            if lab is not None:
                self._vars.fix(lab.ids, why)

    def _unknown(self, node: fx.Node, what: str | None = None) -> None:
        """Fix every channel label reaching ``node`` (an op the graph does not understand); its output gets none."""
        what = what or _op_name(node, self._modules)
        self._fix_inputs(node, f"its channels reach {what} (node {node.name!r}), which the dependency graph cannot "
                               "follow")
        self._labels[node] = None

    def _pass(self, node: fx.Node, src: Any) -> None:
        """Output keeps ``src``'s labels when its channel dim keeps its size, else unknown."""
        lab = self._get(src)
        out = _shape(node)
        if lab is None:
            self._labels[node] = None
            return
        in_shape = _shape(src)
        if out is None or in_shape is None or len(out) != len(in_shape) or out[lab.dim] != in_shape[lab.dim]:
            self._unknown(node)
            return
        self._labels[node] = lab

    # -- the walk --------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._labels[node] = None
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            self._direct.setdefault(owner, f"its parameter {node.target!r} is used directly (node {node.name!r})")
            self._labels[node] = None
        elif node.op == "call_module":
            self._visit_module(node, self._modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node)
        elif node.op == "output":
            for inp in node.all_input_nodes:
                lab = self._get(inp)
                if lab is not None:
                    self._vars.fix(lab.ids, "it is part of the model's output")
                    self._output_labels.extend(lab.ids)

    def _visit_module(self, node: fx.Node, module: nn.Module) -> None:
        name = str(node.target)
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        lab = self._get(x)
        out = _shape(node)
        if isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            if module.transposed or (module.groups > 1 and not depthwise):
                why = "transposed" if module.transposed else f"grouped (groups={module.groups})"
                self._boundary(name, f"{why} convolution: its channels are not pruned")
                self._unknown(node)
                return
            if lab is not None and lab.dim != 1:
                self._unknown(node)
                lab = None
            if depthwise:
                if lab is not None:
                    self._attach(name, OUT, lab.ids, "depthwise filters (in = out)")
                self._labels[node] = lab
                return
            if lab is not None:
                self._attach(name, IN, lab.ids, "input channels")
            self._labels[node] = _Labels(1, self._produce(name, module.out_channels, "output filters"))
        elif isinstance(module, nn.Linear):
            if lab is not None:
                if _shape(x) is None or lab.dim != len(_shape(x)) - 1:
                    self._unknown(node, f"{name} (Linear) reading another dim than the channels")
                else:
                    self._attach(name, IN, lab.ids, "input features")
            self._labels[node] = _Labels(len(out) - 1, self._produce(name, module.out_features, "output neurons"))
        elif isinstance(module, nn.Embedding):
            self._labels[node] = _Labels(len(out) - 1, self._produce(name, module.embedding_dim, "embedding dims",
                                                                     dim=IN))
        elif isinstance(module, _BATCHNORMS):
            if lab is not None and lab.dim == 1:
                self._attach(name, OUT, lab.ids, "norm features")
                self._labels[node] = lab
            elif lab is not None:
                self._unknown(node)
            else:
                self._labels[node] = None
        elif isinstance(module, nn.LayerNorm):
            if lab is None:
                self._labels[node] = None
            elif len(module.normalized_shape) == 1 and lab.dim == len(_shape(x)) - 1:
                self._attach(name, OUT, lab.ids, "norm features")
                self._labels[node] = lab
            else:
                self._unknown(node, f"{name} (LayerNorm over {tuple(module.normalized_shape)})")
        elif isinstance(module, nn.PReLU) and module.num_parameters > 1:
            self._boundary(name, "PReLU with one slope per channel cannot be sliced")
            self._unknown(node)
        elif isinstance(module, _ELEMENTWISE_MODULES):
            self._pass(node, x)
        elif isinstance(module, nn.Flatten):
            self._reshape(node, x)
        elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            self._softmax(node, x, module.dim)
        else:
            if not any(n == name for n, _ in self.boundaries):
                self._boundary(name, f"{type(module).__name__} is not understood by the dependency graph; "
                                     "channels entering it are not pruned")
            self._unknown(node)

    def _produce(self, name: str, n: int, role: str, dim: int = OUT) -> list[int]:
        """The output-channel labels of producer ``name`` (the same ones at every call of it)."""
        if name not in self._producer_labels:
            self._producer_labels[name] = self._vars.new(n, producer=name)
            self._attach(name, dim, self._producer_labels[name], role)
        return self._producer_labels[name]

    def _visit_function(self, node: fx.Node) -> None:
        target, method = node.target, node.op == "call_method"
        first = node.args[0] if node.args else None
        if (method and target in _HARMLESS_METHODS) or \
                (target is getattr and len(node.args) > 1 and node.args[1] in _HARMLESS_ATTRS):
            self._labels[node] = None
            return
        if not any(self._get(i) is not None for i in node.all_input_nodes):
            self._labels[node] = None  # nothing prunable flows here
            return
        if (method and target in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE_FUNCTIONS):
            self._pass(node, first)
        elif (method and target in _BINARY_METHODS) or (not method and target in _BINARY_FUNCTIONS):
            operands = [a for a in list(node.args[:2]) + [node.kwargs.get("other")] if a is not None]
            self._merge(node, operands)
        elif not method and target in _CAT_FUNCTIONS:
            self._cat(node)
        elif (method and target in _RESHAPE_METHODS) or (not method and target in _RESHAPE_FUNCTIONS):
            self._reshape(node, first)
        elif (method and target in ("permute", "transpose")) or (not method and target in (torch.permute,
                                                                                           torch.transpose)):
            self._permute(node, first)
        elif (method and target in _REDUCE_METHODS) or (not method and target in _REDUCE_FUNCTIONS):
            self._reduce(node, first)
        elif (method and target in ("softmax", "log_softmax")) or (not method and target in (F.softmax,
                                                                                              F.log_softmax,
                                                                                              torch.softmax)):
            self._softmax(node, first, _arg(node, 1, "dim"))
        elif target is operator.getitem and _shape(node) is not None and _shape(node) == _shape(first):
            self._labels[node] = self._get(first)  # x[:] / x[...] selects everything
        else:
            self._unknown(node)

    def _merge(self, node: fx.Node, operands: list[Any]) -> None:
        """Elementwise binary op: position i of every operand (after broadcasting) is one channel."""
        out = _shape(node)
        if out is None:
            self._unknown(node)
            return
        aligned: list[tuple[_Labels, int]] = []
        for a in operands:
            lab = self._get(a)
            if lab is not None:
                aligned.append((lab, lab.dim + len(out) - len(_shape(a))))
        dims = {d for _, d in aligned}
        if len(dims) != 1:
            self._unknown(node, f"{_op_name(node, self._modules)} combining different channel dims")
            return
        d = dims.pop()
        for a in operands:
            shape = _shape(a)
            if shape is None or self._get(a) is not None:
                continue
            k = d - (len(out) - len(shape))
            if k >= 0 and shape[k] > 1:
                # A tensor whose channels are not tracked (a parameter, an input) is added to ours:
                # pruning our side alone would break the shapes.
                self._unknown(node, f"{_op_name(node, self._modules)} with an untracked tensor ({a})")
                return
        ids = list(aligned[0][0].ids)
        for lab, _ in aligned[1:]:
            if len(lab.ids) != len(ids):
                self._unknown(node, f"{_op_name(node, self._modules)} broadcasting one channel over many")
                return
            ids = [self._vars.union(a, b) for a, b in zip(ids, lab.ids)]
        self._labels[node] = _Labels(d, ids)

    def _cat(self, node: fx.Node) -> None:
        tensors = _arg(node, 0, "tensors")
        out = _shape(node)
        if not isinstance(tensors, (list, tuple)) or out is None:
            self._unknown(node)
            return
        cat_dim = int(_arg(node, 1, "dim", 0)) % len(out)
        labelled = [self._get(t) for t in tensors]
        dims = {lab.dim for lab in labelled if lab is not None}
        if len(dims) != 1 or any(_shape(t) is None or len(_shape(t)) != len(out) for t in tensors):
            self._unknown(node)
            return
        d = dims.pop()
        if cat_dim == d:
            ids: list[int] = []
            for t, lab in zip(tensors, labelled):
                ids.extend(lab.ids if lab is not None else self._vars.new(
                    _shape(t)[d], fixed=f"it is concatenated with untracked channels ({t})"))
            self._labels[node] = _Labels(d, ids)
        else:
            self._merge(node, list(tensors))

    def _reshape(self, node: fx.Node, src: Any) -> None:
        """A view that keeps the channel dim, or merges it with the dims after it (flatten), is followed."""
        lab, shape, out = self._get(src), _shape(src), _shape(node)
        if lab is None:
            self._labels[node] = None
            return
        if shape is None or out is None:
            self._unknown(node)
            return
        d, size = lab.dim, shape[lab.dim]
        before = math.prod(shape[:d])
        for k in range(len(out)):
            if math.prod(out[:k]) != before:
                continue
            if out[k] == size:
                self._labels[node] = _Labels(k, lab.ids)
                return
            if out[k] % size == 0:
                # The channel dim merged with the next dims: each channel owns `repeat` consecutive positions.
                repeat = out[k] // size
                if repeat in [math.prod(shape[d + 1:j]) for j in range(d + 2, len(shape) + 1)]:
                    self._labels[node] = _Labels(k, [i for i in lab.ids for _ in range(repeat)])
                    return
        self._unknown(node, f"{_op_name(node, self._modules)} {shape} -> {out}, which splits or mixes channels")

    def _permute(self, node: fx.Node, src: Any) -> None:
        lab, shape = self._get(src), _shape(src)
        if lab is None or shape is None:
            self._unknown(node)
            return
        n = len(shape)
        if node.target in ("permute", torch.permute):
            dims = node.args[1:] if node.op == "call_method" else _arg(node, 1, "dims")
            if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            dims = [int(x) % n for x in dims]
            new = dims.index(lab.dim)
        else:
            a, b = int(_arg(node, 1, "dim0")) % n, int(_arg(node, 2, "dim1")) % n
            new = b if lab.dim == a else a if lab.dim == b else lab.dim
        self._labels[node] = _Labels(new, lab.ids)

    def _reduce(self, node: fx.Node, src: Any) -> None:
        lab, shape = self._get(src), _shape(src)
        dims = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if lab is None or shape is None or dims is None:
            self._unknown(node)
            return
        dims = [int(x) % len(shape) for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if lab.dim in dims:
            self._unknown(node, f"{_op_name(node, self._modules)} over the channel dim")
            return
        new = lab.dim if keepdim else lab.dim - sum(1 for x in dims if x < lab.dim)
        self._labels[node] = _Labels(new, lab.ids)

    def _softmax(self, node: fx.Node, src: Any, dim: Any) -> None:
        lab, shape = self._get(src), _shape(src)
        if lab is None:
            self._labels[node] = None
        elif shape is None or dim is None or int(dim) % len(shape) == lab.dim:
            self._unknown(node, f"{_op_name(node, self._modules)} across channels")
        else:
            self._pass(node, src)

    # -- groups ----------------------------------------------------------------------------
    def _build_groups(self) -> None:
        v = self._vars
        for name, why in self._direct.items():
            for (mname, _), slots in self._members.items():
                if mname == name:
                    v.fix(slots.values(), why)
        fixed: dict[int, str] = {}
        for lab, why in v.fixed.items():
            fixed.setdefault(v.find(lab), why)
        output_classes = {v.find(lab) for lab in self._output_labels}
        for lab, producer in v.producer.items():
            if v.find(lab) in output_classes:
                self._boundary(producer, "its output reaches the model's output")

        # Producers whose labels share a class form one group (union-find over producer names,
        # the earliest producer in graph order as the root).
        order = {p: i for i, p in enumerate(self._producer_labels)}
        prod_parent = {p: p for p in self._producer_labels}

        def find(p: str) -> str:
            while prod_parent[p] != p:
                p = prod_parent[p]
            return p

        owner: dict[int, str] = {}
        for p, labs in self._producer_labels.items():
            for lab in labs:
                c = v.find(lab)
                if c not in owner:
                    owner[c] = p
                    continue
                a, b = find(owner[c]), find(p)
                if a != b:
                    first, second = sorted((a, b), key=order.__getitem__)
                    prod_parent[second] = first
        components: dict[str, list[str]] = {}
        for p in self._producer_labels:
            components.setdefault(find(p), []).append(p)
        component_of = {c: find(p) for c, p in owner.items()}  # class -> its group's root

        # One pass over every member slot: positions per (group root, member, class).
        slots_of: dict[str, dict[tuple[str, int], dict[int, list[int]]]] = {r: {} for r in components}
        for key, slots in self._members.items():
            for pos, lab in slots.items():
                c = v.find(lab)
                root = component_of.get(c)
                if root is not None:
                    slots_of[root].setdefault(key, {}).setdefault(c, []).append(pos)

        for root, producers in components.items():
            classes = sorted({v.find(lab) for p in producers for lab in self._producer_labels[p]})
            reasons = []
            for c in classes:
                if c in fixed and fixed[c] not in reasons:
                    reasons.append(fixed[c])
            if reasons:
                self.dropped.append((root, "; ".join(reasons[:3])))
                continue
            group = self._group(root, producers, classes, slots_of[root])
            if group is not None:
                self.groups.append(group)

    def _group(self, root: str, producers: list[str], classes: list[int],
               slots: dict[tuple[str, int], dict[int, list[int]]]) -> Group | None:
        # Order units by the root producer's channel order.
        root_key = (root, OUT) if (root, OUT) in self._members else (root, IN)
        first_pos = {c: min(pos) for c, pos in slots[root_key].items()}
        classes = sorted(classes, key=lambda c: first_pos.get(c, 1 << 30))
        module = self._modules[root]
        kind = "filter" if isinstance(module, nn.modules.conv._ConvNd) else \
            "neuron" if isinstance(module, nn.Linear) else "channel"
        group = Group(root=root, units=len(classes), unit=kind)
        for (name, dim), per_class in slots.items():
            per_unit = [sorted(per_class.get(c, ())) for c in classes]
            if len({len(p) for p in per_unit}) != 1:
                self.dropped.append((root, (f"{name} holds an uneven number of channels per {kind} "
                                            "(e.g. a concat feeding an addition); not supported")))
                return None
            index = torch.tensor(per_unit, dtype=torch.long)
            role = self._roles[(name, dim)]
            if index.shape[1] > 1 and role == "input features":
                role = f"input columns ({index.shape[1]} per {kind}, through a flatten)"
            group.add(name, self._modules[name], dim, index, role)
        if len(producers) > 1:
            group.notes.append(f"{len(producers)} producers share these channels (residual additions): "
                               f"{', '.join(producers)}")
        return group

    def explain(self) -> str:
        """Every group with its coupled slices, then the producers that cannot be pruned and the boundaries."""
        lines = [g.details() for g in self.groups]
        if not self.groups:
            lines.append("no prunable group")
        lines += [f"not prunable: {name}: {why}" for name, why in self.dropped]
        lines += [f"boundary: {name}: {why}" for name, why in self.boundaries]
        return "\n".join(lines)


def build_groups(model: nn.Module, example_input: Any) -> list[Group]:
    """The prunable channel groups of ``model`` (see ``DependencyGraph``), traced on ``example_input``."""
    return DependencyGraph(model, example_input).groups
