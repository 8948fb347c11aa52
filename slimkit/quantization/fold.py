"""BatchNorm folding: merge an eval-mode BatchNorm2d into the Conv2d that feeds it.

With the BN's running statistics (μ, σ²), affine parameters (γ, β) and ε, per output channel c:

    k_c = γ_c / √(σ²_c + ε)
    W'_c = W_c · k_c                 (the whole (in/groups, kh, kw) kernel of channel c)
    b'_c = β_c + (b_c − μ_c) · k_c   (b = 0 for a conv without bias; γ = 1, β = 0 without affine)

so ``conv'(x) == bn(conv(x))`` for a BN in eval mode. The BN's place is taken by a
``FoldedBatchNorm`` (an ``nn.Identity`` that a saved checkpoint records, so ``slimkit.load``
rebuilds the architecture without the BN). Quantizing the folded kernel is what an
int8 runtime executes (the BN does not exist there), which is why static PTQ and QAT fold first.

Only eval-mode statistics are folded: the running mean/var as they are now. A BN in
training mode normalizes with each batch's own statistics, which no fixed kernel can
reproduce. QAT here folds **once, before training** ("fold, then fine-tune"): the BN is
gone during QAT and the folded conv's weight and bias are trained directly. The
alternative that keeps BN statistics updating during QAT (Jacob et al. 2018's
batch-stat correction with a re-fold every step) is not implemented.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from slimkit.core.errors import DataError, UnsupportedError
from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.core.targets import set_submodule


@register_module_type
class FoldedBatchNorm(SlimkitModule, nn.Identity):
    """The identity left where a BatchNorm2d was folded into its conv; ``num_features`` is kept for the record."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def slimkit_spec(self) -> dict:
        """Constructor arguments as JSON data (see ``SlimkitModule``)."""
        return {"num_features": self.num_features}

    @classmethod
    def from_slimkit_spec(cls, spec: dict) -> FoldedBatchNorm:
        """The identity again (it holds no tensors)."""
        return cls(int(spec["num_features"]))

    def extra_repr(self) -> str:
        return f"folded BatchNorm2d({self.num_features})"


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (always with a bias) equal to ``bn(conv(x))`` with ``bn`` in eval mode; the inputs are untouched.

    Raises UnsupportedError when the BN keeps no running statistics or its channel count
    differs from the conv's outputs.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedError("a BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    if bn.num_features != conv.out_channels:
        raise UnsupportedError(f"BatchNorm has {bn.num_features} features but the conv has {conv.out_channels} outputs")
    with torch.no_grad():
        # float64 so that γ/√(σ²+ε) of tiny variances keeps its precision before the cast back.
        w = conv.weight.detach().double()
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
        k = gamma / torch.sqrt(var + bn.eps)  # (out,)
        new = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.weight.copy_(w * k.reshape(-1, 1, 1, 1))
        new.bias.copy_(beta + (b - mean) * k)
    new.train(conv.training)
    return new


def _pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]] | None:
    """(conv name, bn name) pairs where the conv's only user is the BN, from an FX graph; None if untraceable."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = defaultdict(int)  # a module called twice cannot be folded for one call
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or type(modules.get(src.target)) is not nn.Conv2d:
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1:
            pairs.append((src.target, node.target))
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs that sit next to each other, conv first, inside an nn.Sequential."""
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cname, prefix + bname))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm2d into the Conv2d whose output feeds only it, in place; returns ``"conv+bn"`` names.

    The pairs come from an FX trace of ``model`` when it traces (a conv whose output is
    also used elsewhere, e.g. by a residual add, is left alone), else from adjacent
    (Conv2d, BatchNorm2d) children of nn.Sequential containers. Each conv is replaced by
    its folded copy and each BN by a ``FoldedBatchNorm`` (an ``nn.Identity``). A conv or BN reachable at more than one
    path is left alone. Every fold is computed and checked before the model changes:
    non-finite results raise DataError naming the pair, leaving the model untouched.
    Uses eval-mode (running) statistics whatever mode the model is in.
    """
    pairs = _pairs_by_tracing(model)
    if pairs is None:
        pairs = _pairs_in_sequentials(model)
    paths: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(name)
    folded: list[tuple[str, str, nn.Conv2d]] = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if len(paths[id(conv)]) != 1 or len(paths[id(bn)]) != 1:
            continue
        if bn.running_mean is None:
            continue  # batch statistics only: nothing fixed to fold
        new = fold_conv_bn(conv, bn)
        if not (torch.isfinite(new.weight).all() and torch.isfinite(new.bias).all()):
            raise DataError(
                f"folding BatchNorm {bn_name!r} into conv {conv_name!r} gives NaN or inf "
                "(check the conv weight and the BN's running statistics)"
            )
        folded.append((conv_name, bn_name, new))
    for conv_name, bn_name, new in folded:
        set_submodule(model, conv_name, new)
        set_submodule(model, bn_name, FoldedBatchNorm(model.get_submodule(bn_name).num_features))
    return [f"{c}+{b}" for c, b, _ in folded]
