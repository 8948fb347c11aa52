"""Block-by-block calibration plumbing shared by GPTQ, AWQ, SmoothQuant, SparseGPT and Wanda.

A decoder block's Linear layers come in *groups* that read the same tensor (q/k/v read the
attention norm's output, gate/up the MLP norm's); the groups run in a fixed order (qkv,
o, gate/up, down). ``linear_groups`` finds them by running the block once and comparing
tensor identities, so no per-architecture table is needed for the grouping itself.
``feed_inputs`` streams every calibration token a layer receives into a callback (a
Hessian or a norm accumulator) without keeping the activations. ``fold_input_scale``
moves a per-input-channel scale into the op that produces a group's input (a norm, or a
Linear whose output feeds it), so AWQ and SmoothQuant leave no extra multiply behind.
``run_blockwise`` walks the blocks (see ``calibration.iterate_blocks``) and, when the
context carries a stream, loads each block from disk only while it is being worked on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import (
    BlockInputs,
    CalibrationData,
    CapturedCall,
    _first_output,
    iterate_blocks,
)
from slimkit.core.errors import DataError
from slimkit.core.linear_like import (
    LinearLike,
    in_features,
    linear_kind,
    linear_weight,
    out_features,
)

# A Linear whose input is not the output tensor of any module, but is still linear in a
# named sibling's output: down_proj reads act(gate(x)) * up(x), so scaling up_proj's output
# rows scales down_proj's input; o_proj reads softmax(...)·V, so scaling v_proj's rows
# scales it when heads map one to one (no grouped-query sharing); OPT's fc2 reads
# ReLU(fc1(x)), and ReLU commutes with a positive scale. Checked numerically before use.
_LINEAR_PRODUCERS: tuple[tuple[str, str], ...] = (
    (r"(.*\.)?down_proj$", r"\1up_proj"),
    (r"(.*\.)?o_proj$", r"\1v_proj"),
    (r"(.*\.)?out_proj$", r"\1v_proj"),
    (r"(.*\.)?fc2$", r"\1fc1"),
)


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of a block that read one and the same input tensor, in execution order.

    ``names`` are relative to the block. ``producer`` is the block-relative name of the
    module whose output that input is (a norm, or a Linear per ``_LINEAR_PRODUCERS``) and
    into which an input scale can be folded, or None.
    """

    names: tuple[str, ...]
    producer: str | None


def _input_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("input", next(iter(kwargs.values()))))


def run_block(block: nn.Module, call: CapturedCall) -> torch.Tensor:
    """The block's main output (hidden states) on one recorded call."""
    return _first_output(block(*call.args, **call.kwargs))


@torch.no_grad()
def block_outputs(block: nn.Module, calls: Sequence[CapturedCall]) -> list[torch.Tensor]:
    """The block's hidden-state output for every recorded call."""
    return [run_block(block, c).detach() for c in calls]


@torch.no_grad()
def linear_groups(block: nn.Module, calls: Sequence[CapturedCall],
                  types: tuple[type, ...] = (LinearLike,)) -> list[LinearGroup]:
    """The block's Linear-like layers grouped by shared input, groups in the order they first run.

    Linear-like: any nn.Linear or transformers Conv1D (``core.linear_like.LinearLike``;
    callers drop the ones they cannot handle, with a note). Found with hooks on one
    recorded call. A layer that never runs on it (e.g. an expert no token was routed
    to) forms a group of its own at the end.
    """
    modules = dict(block.named_modules())
    order: list[tuple[str, int]] = []  # (linear name, id of its input tensor)
    made_by: dict[int, str] = {}  # id of an output tensor -> the module that returned it
    keep: list[torch.Tensor] = []  # holds tensors alive so their ids stay unique during the run
    handles = []

    def pre(name):
        def hook(_m, args, kwargs):
            x = _input_tensor(args, kwargs)
            keep.append(x)
            order.append((name, id(x)))
        return hook

    def post(name):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                made_by.setdefault(id(out), name)
        return hook

    for name, m in modules.items():
        if not name:
            continue
        if isinstance(m, types):
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post(name)))
    try:
        run_block(block, calls[0])
    finally:
        for h in handles:
            h.remove()

    groups: dict[int, list[str]] = {}
    for name, key in order:
        members = groups.setdefault(key, [])
        if name not in members:
            members.append(name)
    seen = {n for members in groups.values() for n in members}
    result = [LinearGroup(tuple(members), _producer(modules, members, made_by.get(key)))
              for key, members in groups.items()]
    result += [LinearGroup((name,), None) for name, m in modules.items()
               if name and isinstance(m, types) and name not in seen]
    keep.clear()
    return result


def _producer(modules: dict[str, nn.Module], members: list[str], made_by: str | None) -> str | None:
    if made_by is not None and _has_channel_weight(modules[made_by], modules[members[0]]):
        return made_by
    if len(members) == 1:
        for pattern, repl in _LINEAR_PRODUCERS:
            if re.fullmatch(pattern, members[0]):
                cand = re.sub(pattern, repl, members[0])
                if (linear_kind(modules.get(cand)) is not None
                        and _has_channel_weight(modules[cand], modules[members[0]])):
                    return cand
    return None


def _has_channel_weight(producer: nn.Module, consumer: nn.Module) -> bool:
    """True when ``producer`` has a per-channel weight as long as ``consumer``'s input (a norm, or a Linear)."""
    width = in_features(consumer) if linear_kind(consumer) is not None else getattr(consumer, "in_features", None)
    if linear_kind(producer) is not None:
        return out_features(producer) == width
    w = getattr(producer, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == width


@torch.no_grad()
def feed_inputs(block: nn.Module, calls: Iterable[CapturedCall], names: Sequence[str],
                fn: Callable[[str, torch.Tensor], None]) -> dict[str, int]:
    """Run the block on every call; ``fn(name, x)`` sees each named module's input as (tokens, features).

    Nothing is kept: a Hessian or a norm is accumulated batch by batch inside ``fn``.
    Returns the number of tokens each named module received (0 for one that never ran).
    """
    modules = dict(block.named_modules())
    seen = {n: 0 for n in names}

    def make(name):
        def hook(_m, args, kwargs):
            x = _input_tensor(args, kwargs)
            x2 = x.detach().reshape(-1, x.shape[-1])
            seen[name] += x2.shape[0]
            if x2.shape[0]:
                fn(name, x2)
        return hook

    handles = [modules[n].register_forward_pre_hook(make(n), with_kwargs=True) for n in names]
    try:
        for call in calls:
            run_block(block, call)
    finally:
        for h in handles:
            h.remove()
    return seen


class _Enough(Exception):
    """Raised from an input hook once every wanted layer has run on a call: the rest of the block is not needed."""


def collect_inputs(block: nn.Module, calls: Sequence[CapturedCall], names: Sequence[str],
                   fn: Callable[[str, torch.Tensor], None]) -> dict[str, int]:
    """Stream every calibration token of the named layers' inputs into ``fn(name, x)``; returns tokens per layer.

    The block runs one call at a time and is cut short once every named layer has seen
    its input on that call (so the q/k/v pass of a true-sequential walk costs little).
    """
    counts = dict.fromkeys(names, 0)
    seen: set[str] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        counts[name] += x.shape[0]
        seen.add(name)
        fn(name, x)
        if len(seen) == len(names):
            raise _Enough

    for call in calls:
        seen.clear()
        try:
            feed_inputs(block, [call], names, hook)
        except _Enough:
            pass
    return counts


def check_finite(name: str, module: nn.Module) -> None:
    """DataError naming the layer if its (loaded) weight holds NaN or inf."""
    w = module.weight
    if not w.is_meta and not bool(torch.isfinite(w.detach()).all()):
        raise DataError(f"layer {name!r} has NaN or inf in its weight; fix or ignore it (ignore=[{name!r}])")


@torch.no_grad()
def fold_input_scale(block: nn.Module, group: LinearGroup, scale: torch.Tensor, check: CapturedCall) -> bool:
    """Make the group's input ``x / scale`` and its weights ``W · diag(scale)``: the block computes the same.

    The division goes into the producer (a norm's weight and bias, or a Linear-like layer's
    output rows, in its own layout). The block's output on ``check`` (a recorded call) must stay the same, else
    everything is put back and False is returned; so a producer that does not scale
    linearly (a norm computing ``x · (1 + w)``, a GELU between fc1 and fc2) is refused.
    Also False when the group has no producer. ``scale`` must be positive.
    """
    if group.producer is None:
        return False
    if not bool((scale > 0).all()):
        raise ValueError("fold_input_scale needs a positive scale")
    touched = [block.get_submodule(n) for n in (group.producer, *group.names)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in touched]
    reference = run_block(block, check).float()
    producer, linears = touched[0], touched[1:]
    s = scale.detach().float().to(producer.weight.device)
    if linear_kind(producer) is not None:
        w = linear_weight(producer)  # (out, in); a Conv1D's transposed view, edited in place
        w.div_(s.unsqueeze(1).to(w.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for lin in linears:
        w = linear_weight(lin)
        w.mul_(s.to(w.device, w.dtype))
    after = run_block(block, check).float()
    tol = 1e-3 * float(reference.abs().max()) + 1e-6
    if not bool(((after - reference).abs() <= tol).all()):
        for m, state in zip(touched, saved):
            m.load_state_dict(state)
        return False
    return True


MIN_SAMPLES = 32  # below this, Hessian and scale statistics get noisy: warn, as GPTQ and AWQ users expect


def warn_if_few_samples(data: CalibrationData, ctx: Any, label: str, minimum: int = MIN_SAMPLES) -> None:
    """Warn (warnings and a report note) when ``data`` has fewer than ``minimum`` samples, giving the count."""
    import warnings

    n = data.num_samples
    if n < minimum:
        line = (f"{label}: calibration has only {n} sample(s) ({data.description}); "
                f"{minimum} or more are recommended for stable statistics")
        warnings.warn(line, stacklevel=3)
        if ctx is not None:
            ctx.note(line)


def run_blockwise(model: nn.Module, data: CalibrationData, process: Callable[[BlockInputs], None],
                  ctx: Any = None, label: str = "") -> int:
    """Call ``process(block_inputs)`` on each decoder block in turn; the next block sees the edited one's outputs.

    With ``ctx.stream`` set (a ``streaming.BlockStream``), each block's weights are read
    from the checkpoint just before ``process`` and written out and released right after
    its outputs are computed, so one block is in memory at a time. Returns the number of blocks.
    """
    stream = getattr(ctx, "stream", None)
    progress = getattr(ctx, "progress", None)
    hooks: dict[str, Any] = {}
    if stream is not None:
        hooks = {"before": stream.load_block, "after": stream.release_block, "prepare": stream.prepare}
    count = 0
    for b in iterate_blocks(model, data, **hooks):
        process(b)
        count += 1
        if progress is not None:
            progress(f"{label} {b.name}".strip(), count / b.total)
    return count
