"""CalibrationData: the one place data meets the model, and capture of layer inputs.

A ``CalibrationData`` is a validated list of batches: each batch is either a tensor
(passed positionally) or a dict of tensors (passed as keyword arguments, e.g.
``{"input_ids": ...}``), with an optional transform applied on iteration.

``capture_inputs`` records, with forward pre-hooks and no tracing, the exact arguments
chosen modules receive. ``iterate_blocks`` walks a decoder's repeated blocks one at a
time: it captures what the first block receives, then feeds each block's outputs to the
next, so a technique (GPTQ, SparseGPT, ...) can edit block i and block i+1 is
calibrated on the *edited* block's outputs, with only one block's activations held.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import DataError, UnsupportedError

Batch = torch.Tensor | dict[str, torch.Tensor]


class CalibrationData:
    """A validated, re-iterable list of batches plus an optional ``transform`` applied to each."""

    def __init__(self, batches: Sequence[Batch], transform: Callable[[Batch], Batch] | None = None,
                 description: str = "") -> None:
        self.batches = list(batches)
        self.transform = transform
        self.description = description or f"{len(self.batches)} batches"
        self.validate()

    # -- constructors -------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: Any, seq_len: int = 256, n: int = 64,
                   batch_size: int = 8, seed: int = 0) -> CalibrationData:
        """``n`` windows of ``seq_len`` tokens drawn (seeded) from the concatenated, tokenized ``texts``.

        Texts are joined with the tokenizer's eos token between them; windows do not overlap.
        """
        if seq_len < 2 or n < 1 or batch_size < 1:
            raise DataError(f"calibration needs seq_len >= 2, n >= 1 and batch_size >= 1 (got {seq_len}, {n}, {batch_size})")
        if isinstance(texts, (str, bytes)):  # iterating it would calibrate on single characters
            raise DataError("CalibrationData.from_texts takes a list of texts, not one string: pass [text], or read "
                            "a file with slimkit.read_source(path)")
        texts = [t for t in texts if t]
        if not texts:
            raise DataError("calibration texts are empty: give at least one non-empty text")
        ids = tokenize_texts(texts, tokenizer)
        n_windows = len(ids) // seq_len
        if n_windows < 1:
            raise DataError(f"calibration texts give {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
        if n > n_windows:
            raise DataError(f"asked for n={n} calibration windows of {seq_len} tokens but the texts hold only {n_windows}")
        chosen = sorted(random.Random(seed).sample(range(n_windows), n))
        windows = torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in chosen])
        batches = [{"input_ids": windows[i:i + batch_size]} for i in range(0, n, batch_size)]
        return cls(batches, description=f"{n} x {seq_len} tokens (seed {seed})")

    @classmethod
    def from_tensors(cls, tensors: torch.Tensor | Sequence[torch.Tensor], batch_size: int | None = None,
                     key: str | None = None) -> CalibrationData:
        """Batches from one tensor (split along dim 0 into ``batch_size`` rows) or a list of batch tensors.

        With ``key`` (e.g. "input_ids") each batch is passed to the model as that keyword.
        """
        if isinstance(tensors, torch.Tensor):
            if tensors.dim() == 0 or tensors.shape[0] == 0:
                raise DataError("calibration tensor is empty")
            size = batch_size or tensors.shape[0]
            parts = list(torch.split(tensors, size))
        else:
            parts = list(tensors)
        batches: list[Batch] = [{key: p} if key else p for p in parts]
        return cls(batches, description=f"{sum(_batch_rows(b) for b in batches)} samples from tensors")

    @classmethod
    def from_loader(cls, loader: Iterable[Any], max_batches: int | None = None) -> CalibrationData:
        """Batches from a DataLoader or any iterable; an ``(inputs, labels)`` pair keeps only the inputs."""
        batches: list[Batch] = []
        for i, item in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if isinstance(item, (tuple, list)):
                item = item[0]
            batches.append(item)
        return cls(batches, description=f"{len(batches)} batches from a data loader")

    # -- access ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        for b in self.batches:
            yield self.transform(b) if self.transform else b

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        """Rows over all batches."""
        return sum(_batch_rows(b) for b in self.batches)

    def validate(self) -> None:
        """Raise DataError for no batches, non-tensors, NaN/inf values, or batches whose shapes disagree."""
        if not self.batches:
            raise DataError("calibration data is empty: give at least one batch")
        ref: dict[str, tuple[int, ...]] | None = None
        for i, batch in enumerate(self.batches):
            named = batch if isinstance(batch, dict) else {"input": batch}
            shapes = {}
            for k, t in named.items():
                if not isinstance(t, torch.Tensor):
                    raise DataError(f"calibration batch {i}: {k!r} is a {type(t).__name__}, not a tensor")
                if t.numel() == 0:
                    raise DataError(f"calibration batch {i}: {k!r} is empty")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise DataError(f"calibration batch {i}: {k!r} holds NaN or inf values")
                shapes[k] = tuple(t.shape[1:])  # rows may differ (a last, smaller batch); the rest must not
            if ref is None:
                ref = shapes
            elif shapes != ref:
                raise DataError(f"calibration batch {i} has shapes {shapes}, batch 0 has {ref}: every batch must match")


def _batch_rows(batch: Batch) -> int:
    t = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(t.shape[0])


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """All texts as one 1-D LongTensor of token ids, the eos token after each text (when the tokenizer has one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def run_model(model: nn.Module, batch: Batch) -> Any:
    """One forward of ``model`` on a batch (dict -> keyword arguments, tensor -> positional)."""
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def trim_padding(batch: Batch) -> Batch:
    """A right-padded dict batch cut to its longest row (every (batch, tokens) tensor sliced alike).

    Exact for models whose attention masks the padding and whose positions count from the
    left (BERT, Llama): the kept tokens see the same inputs. Left padding, a batch with no
    ``attention_mask`` or a tensor batch is returned unchanged.
    """
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or mask.dim() != 2:
        return batch
    length = int(mask.sum(1).max())
    if length == mask.shape[1] or bool(mask[:, length:].any()) or not bool(mask[:, :1].all()):
        return batch
    return {k: v[:, :length] if v.dim() >= 2 and tuple(v.shape[:2]) == tuple(mask.shape) else v
            for k, v in batch.items()}


class _StopForward(Exception):
    """Raised from a hook once every wanted input is recorded, to skip the rest of the forward."""


@dataclass
class CapturedCall:
    """The positional and keyword arguments one module received in one forward."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_inputs(model: nn.Module, data: CalibrationData, module_names: Sequence[str],
                   stop_early: bool = True) -> dict[str, list[CapturedCall]]:
    """The arguments each named module receives, for every calibration batch, recorded with pre-hooks.

    With ``stop_early`` the forward is cut as soon as every named module has run once in
    the batch, so capturing the first block's inputs costs only the embedding.
    """
    if not module_names:
        raise UnsupportedError("capture_inputs needs at least one module name")
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise UnsupportedError(f"no module named {missing[0]!r} in {type(model).__name__}")
    records: dict[str, list[CapturedCall]] = {n: [] for n in module_names}
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(_module, args, kwargs):
            records[name].append(CapturedCall(_detach(args), _detach(kwargs)))
            seen.add(name)
            if stop_early and len(seen) == len(module_names):
                raise _StopForward
        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in module_names]
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            seen.clear()
            try:
                run_model(model, _to(batch, device))
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of a model's repeated blocks (decoder layers): the longest ModuleList of one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        lists = [f"{n} ({len(m)} x {', '.join(sorted({type(c).__name__ for c in m}))})"
                 for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        children = ", ".join(f"{n}: {type(c).__name__}" for n, c in model.named_children()) or "none"
        found = f"module lists {'; '.join(lists)}" if lists else f"no nn.ModuleList (children: {children})"
        raise UnsupportedError(
            f"{type(model).__name__} has no list of repeated blocks of one class to calibrate block by block; "
            f"found {found}. Block-wise methods need a decoder with its layers in one nn.ModuleList")
    return best


@dataclass
class BlockInputs:
    """What ``iterate_blocks`` hands out: block ``index`` called ``name`` and its recorded inputs."""

    index: int
    name: str
    block: nn.Module
    calls: list[CapturedCall]
    total: int = 0


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def iterate_blocks(model: nn.Module, data: CalibrationData, blocks: str | None = None, *,
                   before: Callable[[str, nn.Module], None] | None = None,
                   after: Callable[[str, nn.Module], None] | None = None,
                   prepare: Callable[[nn.Module, str], None] | None = None) -> Iterator[BlockInputs]:
    """Yield each repeated block with the inputs it receives, one block at a time.

    The first block's inputs are captured from real forwards. After the caller has done
    its work on block i (e.g. quantized it), the generator runs block i on its inputs and
    hands the outputs to block i+1 as its hidden states; the other arguments (attention
    mask, rotary embeddings, ...) are reused, being the same for every block.

    ``prepare(model, blocks_name)`` runs before the capture (a stream loads the embedding
    there), ``before(name, block)`` before a block is handed out and ``after(name, block)``
    once its outputs are computed (a stream writes the block out and releases it).
    """
    if blocks is None:
        blocks, layer_list = find_blocks(model)
    else:
        layer_list = model.get_submodule(blocks)
    first = f"{blocks}.0"
    if prepare is not None:
        prepare(model, blocks)
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False  # a KV cache would hold every block's keys: not wanted here
    try:
        calls = capture_inputs(model, data, [first])[first]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    for i, block in enumerate(layer_list):
        name = f"{blocks}.{i}"
        if before is not None:
            before(name, block)
        yield BlockInputs(i, name, block, calls, len(layer_list))
        next_calls = []
        for call in calls:
            out = _first_output(block(*call.args, **call.kwargs))
            if call.args:
                next_calls.append(CapturedCall((out.detach(),) + tuple(call.args[1:]), call.kwargs))
            else:  # hidden states passed by keyword
                next_calls.append(CapturedCall((), {**call.kwargs, "hidden_states": out.detach()}))
            if not math.isfinite(float(out.abs().max())):
                raise DataError(f"block {name} produced NaN or inf outputs on calibration data")
        calls = next_calls
        if after is not None:
            after(name, block)
