"""A small, generic training loop: schedules, gradient accumulation, checkpoints with exact resume, DDP.

``Trainer`` trains any ``nn.Module`` whose ``forward(batch)`` returns the loss: a scalar
tensor, or an object (or mapping) with ``loss`` and optionally ``parts`` (a dict of named
scalar tensors or floats, e.g. the KD and CE terms of a ``Distiller``)::

    settings = TrainSettings(steps=500, lr=1e-3, batch_size=32, grad_accum=2, checkpoint_every=100,
                             checkpoint_dir="runs/kd", resume=True)
    result = Trainer(distiller, settings, data=batch_at, evaluate=eval_fn).fit()

One optimizer step (``step`` counts the steps already taken, 0 for the first):

1. the global batch ``data(step)`` (a callable) or the next batch of ``data`` (an iterable,
   cycled), with exactly ``batch_size`` rows;
2. in a process group of ``world`` processes, rank r keeps rows ``[r·B/world, (r+1)·B/world)``,
   split into ``grad_accum`` equal micro-batches;
3. ``(loss / grad_accum).backward()`` on each micro-batch (DDP's ``no_sync()`` on all but the
   last, so gradients are all-reduced once per step). DDP averages over processes, so the
   gradient is that of the mean loss over the whole global batch, the same as one process
   with the full batch — for losses that are a mean over equally weighted rows;
4. the loss (and parts) is averaged over micro-batches and processes; a non-finite loss, part
   or gradient norm raises ``TrainingDiverged`` before the optimizer step, so the module keeps
   the weights of the previous step and the last checkpoint is untouched;
5. gradients are clipped to ``max_grad_norm`` (total 2-norm) and the optimizer steps with the
   learning rate ``lr_at(step)``.

After step k (k = step + 1 steps done): ``evaluate`` every ``eval_every`` steps and at the
end, then a checkpoint every ``checkpoint_every`` steps and at the end, then ``progress``.

Checkpoints are a folder ``checkpoint_dir/last`` replaced atomically, written by rank 0 alone,
with no pickle anywhere (the files: ``checkpoint.py``).

Resuming (``resume=True``) loads ``checkpoint_dir/last`` strictly and continues from its step.
A run resumed from a checkpoint equals the uninterrupted run exactly when the data is
deterministic (``batch_at`` is; an iterable is replayed from its start, skipping the batches
already consumed, which is exact for a list or an unshuffled DataLoader). What may change
on resume: ``steps`` (to train longer or shorter; the schedule then follows the new value,
and a checkpoint past ``steps`` is an error), ``lr``, ``schedule``, ``warmup_steps``,
``weight_decay``, clipping, the cadences, ``grad_accum`` and the number of processes (the
global batch stays the same). What may not: ``batch_size`` (the data would differ) and
``optimizer`` (its state would not fit).

Multi-process: launch with ``torchrun --nproc_per_node N script.py`` and call
``init_distributed()`` first; the trainer then uses the process group, wraps the module in
``DistributedDataParallel``, seeds every rank identically, and lets rank 0 alone evaluate,
report progress and write checkpoints (all ranks read the checkpoint on resume: the folder
must be on a shared file system). Every trainable parameter must get a gradient every step
(``find_unused_parameters=False``). BatchNorm statistics are per process under DDP (on GPU,
``nn.SyncBatchNorm.convert_sync_batchnorm`` syncs them), so N processes equal one process
only for models without batch-dependent layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, DataError, SlimkitError, UnsupportedError
from slimkit.distillation.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    load_checkpoint_weights,
    load_model,
    load_optimizer_state,
    names_text,
    read_state,
    write_checkpoint,
)

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
SGD_MOMENTUM = 0.9
# Cosine and linear decay end at this fraction of lr rather than 0, so the last steps still
# learn (the LLaMA / nanoGPT choice of min_lr = lr / 10).
FINAL_LR_RATIO = 0.1
_RESERVED = ("step", "loss", "lr", "grad_norm")  # history keys a part may not overwrite


class TrainingDiverged(SlimkitError):
    """The loss, one of its parts or the gradient norm became non-finite; no optimizer step was taken.

    ``step`` is the 1-based step that failed, ``bad_parts`` the names of the non-finite values,
    ``checkpoint`` / ``checkpoint_step`` the last good checkpoint (None when none was written).
    """

    def __init__(self, message: str, step: int, bad_parts: list[str], checkpoint: str | None,
                 checkpoint_step: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.bad_parts = bad_parts
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step


# --- the schedule (pure) -------------------------------------------------------------------


def scheduled_lr(step: int, lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of the optimizer step ``step`` (0-based: the steps already taken) of ``steps``.

    Warmup (step < w): ``lr·(step + 1)/(w + 1)``, a linear ramp that never uses 0 and reaches
    ``lr`` at step w. Then, with p = (step − w)/(steps − 1 − w) running from 0 at step w to 1
    at the last step (p = 0 when w is the last step) and m = ``FINAL_LR_RATIO``·lr:

    - cosine: m + (lr − m)·½·(1 + cos πp)   (Loshchilov & Hutter 2017, SGDR, without restarts)
    - linear: lr − (lr − m)·p
    - constant: lr
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < steps:
        raise ConfigError(f"step must be an integer in [0, {steps}) (the steps already taken), got {step!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    span = steps - 1 - warmup_steps
    p = (step - warmup_steps) / span if span > 0 else 0.0
    final = FINAL_LR_RATIO * lr
    if schedule == "cosine":
        return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr - (lr - final) * p
    return lr


# --- settings ------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainSettings(Config):
    """How ``Trainer`` trains: length, optimizer, schedule, batching, clipping, cadences, checkpoints.

    steps: optimizer steps (>= 1). lr: peak learning rate (> 0). weight_decay (>= 0): AdamW's
    decoupled decay, SGD's L2 term, on every trainable parameter. optimizer: "adamw" or "sgd"
    (momentum 0.9). schedule: "cosine", "linear" or "constant" after ``warmup_steps`` (0 <=
    warmup < steps) of linear ramp; cosine and linear end at 0.1·lr (see ``scheduled_lr``).
    batch_size: the GLOBAL batch in rows, all processes and accumulation micro-batches
    together (a multiple of grad_accum, and of grad_accum × processes at run time).
    grad_accum: micro-batches per step (>= 1). max_grad_norm: clip the total gradient 2-norm
    to this (> 0), None for no clipping. eval_every: evaluate every this many steps (0: only at
    the end). checkpoint_every: checkpoint every this many steps (0: only at the end, when
    checkpoint_dir is set). checkpoint_dir: where ``last/`` is written, None for no
    checkpoints. resume: continue from ``checkpoint_dir/last`` when it exists. seed: torch
    seed set on every process at the start.

    Every field has a default so that recipe steps (``Distill``) can subclass it.
    """

    family: ClassVar[str] = "distill"

    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint_dir, os.PathLike):  # keep the config plain data (to_dict, JSON)
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        super().__post_init__()

    def validate(self) -> None:
        """Check every training field; the ConfigError names the field and what to set."""
        for name, minimum in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                              ("eval_every", 0), ("checkpoint_every", 0), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                self.fail(name, f"must be an integer >= {minimum}, got {value!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            self.fail("lr", f"must be a positive number, got {self.lr!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            self.fail("weight_decay", f"must be a number >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            self.fail("optimizer", f"must be one of {', '.join(map(repr, OPTIMIZERS))}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            self.fail("schedule", f"must be one of {', '.join(map(repr, SCHEDULES))}, got {self.schedule!r}")
        if self.warmup_steps >= self.steps:
            self.fail("warmup_steps", f"must be less than steps ({self.steps}), got {self.warmup_steps}")
        if self.batch_size % self.grad_accum:
            self.fail("batch_size", f"must be a multiple of grad_accum ({self.grad_accum}) so micro-batches are "
                                    f"equal, got {self.batch_size}")
        g = self.max_grad_norm
        if g is not None and (not _is_number(g) or g <= 0):
            self.fail("max_grad_norm", f"must be a positive number, or None for no clipping, got {g!r}")
        d = self.checkpoint_dir
        if d is not None and (not isinstance(d, str) or not d.strip()):
            self.fail("checkpoint_dir", f"must be a folder path (string) or None, got {d!r}")
        if not isinstance(self.resume, bool):
            self.fail("resume", f"must be true or false, got {self.resume!r}")
        if self.resume and d is None:
            self.fail("resume", "needs checkpoint_dir (the folder holding last/ to resume from)")
        if self.checkpoint_every and d is None:
            self.fail("checkpoint_every", "needs checkpoint_dir (where to write the checkpoints)")

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based) under these settings; see ``scheduled_lr``."""
        return scheduled_lr(step, float(self.lr), self.steps, self.warmup_steps, self.schedule)


# --- batches (pure) ------------------------------------------------------------------------


def _tensors(batch: Any, where: str = "batch") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        yield where, batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _tensors(v, f"{where}[{i}]")


def _map(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor; containers keep their type, other values pass through."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        mapped = {k: _map(v, fn) for k, v in batch.items()}
        try:  # keep OrderedDict, BatchEncoding, ...; a type that cannot be rebuilt from a dict becomes a dict
            return type(batch)(mapped)
        except TypeError:
            return mapped
    if isinstance(batch, tuple):
        items = [_map(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)  # namedtuples too
    if isinstance(batch, list):
        return [_map(v, fn) for v in batch]
    return batch


def batch_rows(batch: Any) -> int:
    """The number of rows of ``batch``: dim 0 shared by all its tensors; DataError when they disagree or none."""
    rows: int | None = None
    first = ""
    for where, t in _tensors(batch):
        if t.dim() == 0:
            raise DataError(f"{where} is a 0-dim tensor; every tensor in a batch needs dim 0 = batch rows")
        if rows is None:
            rows, first = int(t.shape[0]), where
        elif t.shape[0] != rows:
            raise DataError(f"{where} has {t.shape[0]} rows but {first} has {rows}; every tensor in a batch "
                            "must share dim 0")
    if rows is None:
        raise DataError(f"a batch must hold at least one tensor (a tensor, a tuple/list or a dict of tensors), "
                        f"got {type(batch).__name__}")
    return rows


def split_batch(batch: Any, rank: int, world: int, grad_accum: int) -> list[Any]:
    """This rank's contiguous share of the global ``batch``, as ``grad_accum`` equal micro-batches.

    Rank r of ``world`` takes rows [r·B/world, (r+1)·B/world); micro-batch i of that share
    the i-th consecutive slice of B/(world·grad_accum) rows. Raises DataError naming the
    numbers when B is not a multiple of world·grad_accum.
    """
    rows = batch_rows(batch)
    shares = world * grad_accum
    if rows % shares:
        raise DataError(f"the batch has {rows} rows, which do not split evenly into world size {world} × "
                        f"grad_accum {grad_accum} = {shares} equal micro-batches; use a batch size that is a "
                        f"multiple of {shares}")
    per_rank, per_micro = rows // world, rows // shares
    out = []
    for i in range(grad_accum):
        start = rank * per_rank + i * per_micro
        out.append(_map(batch, lambda t, s=start: t[s:s + per_micro]))
    return out


# --- distributed ---------------------------------------------------------------------------


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns ``(rank, world_size)``.

    With ``WORLD_SIZE`` > 1 and no process group yet, calls ``init_process_group``: by default
    "cpu:gloo,cuda:nccl" when CUDA is available (NCCL for GPU tensors, gloo for a model left on
    the CPU) and "gloo" otherwise, and selects GPU ``LOCAL_RANK``. Without torchrun (no or
    WORLD_SIZE=1) it does nothing and returns (0, 1).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise UnsupportedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank(), dist.get_world_size()


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- the trainer ---------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``Trainer.fit`` did.

    steps: optimizer steps done in total (including those before a resume); final_loss: the
    loss of the last step (None if no step has run); history: one dict per step with step
    (1-based), loss, lr, grad_norm, the parts, and ``eval_<metric>`` at evaluation steps;
    seconds: wall time of this ``fit``; world_size: processes; checkpoint: the folder of the
    last checkpoint written or resumed from (None when none); resumed_from: the step the run
    resumed at (0 for a fresh run).
    """

    steps: int
    final_loss: float | None
    history: list[dict[str, Any]]
    seconds: float
    world_size: int
    checkpoint: str | None
    resumed_from: int = 0

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics of the last evaluation (without the ``eval_`` prefix); {} when none ran."""
        for entry in reversed(self.history):
            found = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_")}
            if found:
                return found
        return {}


class Trainer:
    """Train ``module`` (``forward(batch)`` returns the loss) under ``settings`` on ``data``.

    data: a callable ``batch_at(step) -> batch`` (the global batch of step ``step``, 0-based;
    deterministic, so resuming is exact) or an iterable of global batches (cycled; it must
    be re-iterable, like a list or a DataLoader). A batch is a tensor, a tuple/list or a dict
    of tensors (other values pass through), every tensor with dim 0 = rows, exactly
    ``settings.batch_size`` rows. evaluate: ``evaluate(module) -> dict[str, float]``, run on
    rank 0 in eval mode under ``torch.no_grad``. progress: ``progress(description, fraction)``
    after every step, on rank 0.

    The optimizer trains ``module.trainable_parameters()`` when the module has that method,
    else every parameter with ``requires_grad``; ``module.prepare(batch)``, when present, is
    called once with the first micro-batch (on the module's device) before the optimizer is
    built (e.g. to create projectors whose sizes depend on the data). See the module
    docstring for the step, the checkpoint format, resuming and multi-process training.
    """

    def __init__(self, module: nn.Module, settings: TrainSettings, data: Callable[[int], Any] | Iterable[Any],
                 evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
                 progress: Callable[[str, float], None] | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise UnsupportedError(f"Trainer trains an nn.Module, got {type(module).__name__}")
        if not isinstance(settings, TrainSettings):
            raise ConfigError(f"settings must be a TrainSettings, got {type(settings).__name__}")
        if not callable(data) and not isinstance(data, Iterable):
            raise DataError(f"data must be a callable batch_at(step) or an iterable of batches, "
                            f"got {type(data).__name__}")
        if evaluate is not None and not callable(evaluate):
            raise ConfigError(f"evaluate must be a callable evaluate(module) -> dict, got {type(evaluate).__name__}")
        if progress is not None and not callable(progress):
            raise ConfigError(f"progress must be a callable progress(description, fraction), "
                              f"got {type(progress).__name__}")
        self.module = module
        self.settings = settings
        self.data = data
        self.evaluate = evaluate
        self.progress = progress
        self.rank, self.world = _process_group()
        self.device = self._choose_device()
        self.history: list[dict[str, Any]] = []
        self.checkpoint: str | None = None
        self.checkpoint_step: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._iterator: Iterator[Any] | None = None
        self._grads_checked = False

    # -- setup ----------------------------------------------------------------------------

    def _choose_device(self) -> torch.device:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type == "cuda" and self.world > 1:
            # One GPU per process: torchrun's LOCAL_RANK picks it.
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def _trainable(self) -> list[nn.Parameter]:
        if hasattr(self.module, "trainable_parameters"):
            params = list(self.module.trainable_parameters())
        else:
            params = [p for p in self.module.parameters() if p.requires_grad]
        unique, seen = [], set()
        for p in params:  # tied parameters once
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise UnsupportedError(f"{type(self.module).__name__} has no trainable parameters (all frozen or none)")
        return unique

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        s = self.settings
        if s.optimizer == "sgd":
            return torch.optim.SGD(params, lr=s.lr, momentum=SGD_MOMENTUM, weight_decay=s.weight_decay)
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    # -- data -----------------------------------------------------------------------------

    def _batch(self, step: int) -> Any:
        if callable(self.data):
            return self.data(step)
        if self._iterator is None:
            self._iterator = iter(self.data)
            # Resuming an iterable: replay it from the start, dropping the batches already used.
            for _ in range(step):
                self._next_batch()
        return self._next_batch()

    def _next_batch(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            pass
        self._iterator = iter(self.data)  # cycle: a new pass over the data
        try:
            return next(self._iterator)
        except StopIteration:
            raise DataError("data yielded no batches when iterated again: it is empty or a one-shot iterator "
                            "(a generator); pass a list, a DataLoader or a callable batch_at(step)") from None

    def _global_batch(self, step: int) -> Any:
        batch = self._batch(step)
        rows = batch_rows(batch)
        if rows != self.settings.batch_size:
            raise DataError(f"step {step + 1}: the data gave a batch of {rows} rows but batch_size is "
                            f"{self.settings.batch_size} (the global batch of all processes and micro-batches); "
                            "make every batch exactly batch_size rows (e.g. DataLoader(drop_last=True))")
        return batch

    def _micro_batches(self, step: int) -> list[Any]:
        micro = split_batch(self._global_batch(step), self.rank, self.world, self.settings.grad_accum)
        return [_map(m, lambda t: t.to(self.device)) for m in micro]

    # -- forward --------------------------------------------------------------------------

    def _loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch)
        if isinstance(out, torch.Tensor):
            loss, parts = out, {}
        elif isinstance(out, Mapping) and "loss" in out:
            loss, parts = out["loss"], out.get("parts") or {}
        elif hasattr(out, "loss"):
            loss, parts = out.loss, getattr(out, "parts", None) or {}
        else:
            raise UnsupportedError(f"{type(self.module).__name__}.forward(batch) must return a scalar loss tensor "
                                   f"or an object with .loss, got {type(out).__name__}")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise UnsupportedError(f"{type(self.module).__name__}.forward(batch) must give a scalar floating "
                                   f"loss tensor, got {loss!r:.80}")
        if not loss.requires_grad:
            raise UnsupportedError(f"the loss of {type(self.module).__name__} does not depend on any trainable "
                                   "parameter (it has no grad_fn)")
        if not isinstance(parts, Mapping):
            raise UnsupportedError(f"parts must be a dict of name -> scalar, got {type(parts).__name__}")
        clean = {}
        for name, value in parts.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise UnsupportedError(f"loss part {name!r} must be a scalar, got shape {tuple(value.shape)}")
                value = value.detach().reshape(())
            elif _is_int(value) or isinstance(value, float):
                value = torch.tensor(float(value))
            else:
                raise UnsupportedError(f"loss part {name!r} must be a tensor or a float, got {type(value).__name__}")
            clean[str(name)] = value
        return loss.reshape(()), clean

    # -- checkpoints ----------------------------------------------------------------------

    def _folder(self) -> Path:
        return Path(self.settings.checkpoint_dir) / CHECKPOINT_NAME

    def _write_checkpoint(self, step: int) -> None:
        folder = self._folder()
        if self.rank == 0:
            write_checkpoint(folder, self.module, self.optimizer, {
                "step": step, "history": self.history, "settings": self.settings.to_dict(), "world_size": self.world},
                self.device)
        self._barrier()  # every rank now knows the checkpoint exists
        self.checkpoint, self.checkpoint_step = str(folder), step

    def _check_resumable(self, folder: Path) -> dict[str, Any]:
        """Read ``trainer.json`` and refuse settings the checkpoint cannot continue under (module docstring)."""
        s = self.settings
        state = read_state(folder / STATE_FILE)
        step, saved = state["step"], state["settings"]
        if step > s.steps:
            raise ConfigError(f"{type(s).__name__}.steps: the checkpoint {folder} is at step {step}, past steps "
                              f"({s.steps}); raise steps to at least {step} or use a fresh checkpoint_dir")
        for name in ("batch_size", "optimizer"):
            if name in saved and saved[name] != getattr(s, name):
                raise ConfigError(f"{type(s).__name__}.{name}: the checkpoint {folder} was trained with "
                                  f"{name}={saved[name]!r}, not {getattr(s, name)!r}; resume with the same {name} "
                                  "or use a fresh checkpoint_dir")
        return state

    def _load_checkpoint(self, folder: Path, state: dict[str, Any]) -> int:
        step = state["step"]
        load_model(self.module, folder / MODEL_FILE)
        load_optimizer_state(self.optimizer, folder, state["optimizer"], self.settings.optimizer, self.device)
        self.history = state["history"]
        self.checkpoint, self.checkpoint_step = str(folder), step
        return step

    # -- collectives ----------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values, op=dist.ReduceOp.SUM)  # a NaN on any rank reaches every rank
            values = values / self.world
        return values

    def _share_metrics(self, metrics: dict[str, float] | None) -> dict[str, float]:
        """Rank 0's metrics on every rank (JSON bytes, no pickle); the others wait here meanwhile."""
        if self.world == 1:
            return metrics or {}
        import torch.distributed as dist

        data = json.dumps(metrics).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def _run_evaluate(self) -> dict[str, float]:
        metrics = None
        if self.rank == 0:
            was_training = self.module.training
            self.module.eval()
            try:
                with torch.no_grad():
                    raw = self.evaluate(self.module)
            finally:
                self.module.train(was_training)
            if not isinstance(raw, Mapping):
                raise ConfigError(f"evaluate(module) must return a dict of metric name -> float, "
                                  f"got {type(raw).__name__}")
            metrics = {}
            for k, v in raw.items():
                try:
                    metrics[str(k)] = float(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"evaluate(module) returned {k!r}: {v!r}, not a number") from None
        return self._share_metrics(metrics)

    # -- the loop -------------------------------------------------------------------------

    def _report(self, text: str, fraction: float) -> None:
        if self.rank == 0:
            logger.info(text)
            if self.progress is not None:
                self.progress(text, fraction)

    def fit(self) -> TrainResult:
        """Train from step 0, or from ``checkpoint_dir/last`` with ``resume``, to ``settings.steps``."""
        s = self.settings
        start_time = time.perf_counter()
        if s.batch_size % (self.world * s.grad_accum):
            raise DataError(f"batch_size {s.batch_size} does not split evenly into world size {self.world} × "
                            f"grad_accum {s.grad_accum} = {self.world * s.grad_accum} equal micro-batches; use a "
                            f"multiple of {self.world * s.grad_accum}")
        start, saved = 0, None
        folder = self._folder() if s.checkpoint_dir else None
        resume_from = folder if s.resume and folder is not None and folder.exists() else None
        if s.resume and resume_from is None:
            self._report(f"no checkpoint in {folder}; starting fresh", 0.0)
        if resume_from is not None:
            # Checked before any work; the step also says which batch comes first (prepare, the iterable skip).
            saved = self._check_resumable(resume_from)
            start = saved["step"]
        torch.manual_seed(s.seed)  # identical on every rank: same initialisation of anything prepare() creates
        was_training = self.module.training
        self.module.to(self.device)
        pending = None
        if start < s.steps:
            pending = self._micro_batches(start)
        if hasattr(self.module, "prepare"):
            if pending is None:  # resumed at the end: prepare still builds what the checkpoint holds
                pending = self._micro_batches(start - 1)
                self._iterator = None
            self.module.prepare(pending[0])
            self.module.to(self.device)  # anything prepare created follows the module
        self.optimizer = self._build_optimizer(self._trainable())
        if resume_from is not None:
            start = self._load_checkpoint(resume_from, saved)
            self._report(f"resumed from {resume_from} at step {start}/{s.steps}", start / s.steps)
        model: nn.Module = self.module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.module, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
        self.module.train()
        try:
            for step in range(start, s.steps):
                micro = pending if pending is not None else self._micro_batches(step)
                pending = None
                self._train_step(model, step, micro)
        finally:
            self.module.train(was_training)
        final = self.history[-1]["loss"] if self.history else None
        return TrainResult(steps=s.steps, final_loss=final, history=self.history,
                           seconds=time.perf_counter() - start_time, world_size=self.world,
                           checkpoint=self.checkpoint, resumed_from=start)

    def _train_step(self, model: nn.Module, step: int, micro: list[Any]) -> None:
        s = self.settings
        done = step + 1
        lr = s.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        losses, parts = [], []
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or self.world == 1 else model.no_sync()
            with sync:
                loss, p = self._loss(model, batch)
                # Backward even on a non-finite loss: every rank must join the same all-reduce.
                (loss / len(micro)).backward()
            losses.append(loss.detach())
            parts.append(p)
        names = list(parts[0])
        for i, p in enumerate(parts[1:], 2):
            if list(p) != names:
                raise UnsupportedError(f"micro-batch {i} of step {done} gave loss parts {sorted(p)}, "
                                       f"the first {sorted(names)}: forward must give the same parts every call")
        if self.world > 1 and not self._grads_checked:
            self._check_all_grads()
            self._grads_checked = True
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm) if s.max_grad_norm is not None \
            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        stats = torch.stack([torch.stack(losses).to(dtype).mean()]
                            + [torch.stack([p[n].to(self.device, dtype) for p in parts]).mean() for n in names])
        values = self._mean_over_ranks(stats).tolist()
        loss_value, part_values = values[0], dict(zip(names, values[1:], strict=True))
        grad_norm = float(norm)
        bad = [n for n, v in [("loss", loss_value), *part_values.items(), ("grad_norm", grad_norm)]
               if not math.isfinite(v)]
        if bad:
            self._diverged(done, loss_value, part_values, grad_norm, bad)
        self.optimizer.step()
        entry: dict[str, Any] = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
        for n, v in part_values.items():
            entry[f"part_{n}" if n in _RESERVED else n] = v
        is_last = done == s.steps
        if self.evaluate is not None and (is_last or (s.eval_every and done % s.eval_every == 0)):
            entry.update({f"eval_{k}": v for k, v in self._run_evaluate().items()})
        self.history.append(entry)
        if s.checkpoint_dir is not None and (is_last or (s.checkpoint_every and done % s.checkpoint_every == 0)):
            self._write_checkpoint(done)
        text = f"step {done}/{s.steps} loss {loss_value:.4g}"
        text += "".join(f" {k} {v:.4g}" for k, v in entry.items() if k.startswith("eval_"))
        self._report(text, done / s.steps)

    def _check_all_grads(self) -> None:
        """Under DDP every trainable parameter needs a gradient each step; name the ones that got none."""
        unused = [n for n, p in self.module.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise UnsupportedError(f"under DistributedDataParallel every trainable parameter needs a gradient each "
                                   f"step; these got none: {names_text(unused)} (freeze them: requires_grad=False)")

    def _diverged(self, done: int, loss: float, parts: dict[str, float], grad_norm: float, bad: list[str]) -> None:
        values = ", ".join(f"{n}={v}" for n, v in [("loss", loss), *parts.items(), ("grad_norm", grad_norm)]
                           if n in bad)
        if self.checkpoint is not None:
            where = f"the last good checkpoint is {self.checkpoint} at step {self.checkpoint_step}"
        else:
            where = "no checkpoint was written (set checkpoint_every)"
        raise TrainingDiverged(
            f"training diverged at step {done} of {self.settings.steps}: non-finite {values}; no optimizer step "
            f"was taken, so the module holds the weights after step {done - 1}; {where}. Lower lr, set "
            "max_grad_norm, or check the data of this step",
            step=done, bad_parts=bad, checkpoint=self.checkpoint, checkpoint_step=self.checkpoint_step)


__all__ = [
    "CheckpointError",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "TrainingDiverged",
    "batch_rows",
    "init_distributed",
    "load_checkpoint_weights",
    "scheduled_lr",
    "split_batch",
]
