"""Teacher/student plumbing: run both models on a batch, capture named features with hooks, sum the losses.

Three modes, one shape (an ``nn.Module`` whose ``forward(batch)`` returns a ``DistillOutput``
with ``.loss`` and ``.parts``, so the user's own loop or ``trainer.Trainer`` drives it):

- ``Distiller(teacher, student, loss, features, feature_loss)`` — offline KD: a trained,
  frozen teacher (eval mode, no gradients, kept out of ``state_dict()`` and ``parameters()``)
  teaches a student through its outputs (``loss``: ``KDLoss``, ``TokenKDLoss``,
  ``CosineEmbeddingLoss``) and through named intermediate features (``features`` maps student
  module names to teacher module names; ``feature_loss``: ``HintLoss``, ``AttentionTransferLoss``,
  ``RKDLoss``, ``SimilarityLoss``; each pair gets its own copy, so its own projector).
- ``MutualDistiller(students, loss)`` — online KD, deep mutual learning (Zhang et al. 2018):
  no pre-trained teacher; each student learns from the labels and from its peers' predictions.
- ``SelfDistiller(model, exits, loss)`` — self-distillation (Zhang et al. 2019, "Be Your Own
  Teacher"): auxiliary classifiers on shallow layers learn from the labels and from the deepest
  output; the deepest output learns from the labels. The heads are training scaffolding: the
  model's own forward is unchanged.

Batches: a tensor (inputs only), a ``(inputs, labels)`` pair, or a dict of keyword arguments
(transformers style; ``labels`` and ``attention_mask`` are read from it, ``labels`` is not
passed on to the model so it does not compute a loss of its own). For a causal LM without
labels the input ids are the labels (next-token prediction), padding set to -100.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.calibration import run_model
from slimkit.core.errors import ConfigError, DataError, closest
from slimkit.core.io import tokenizer_of
from slimkit.tasks import task_of
from slimkit.tasks.base import first_tensor

IGNORE_INDEX = -100


@dataclasses.dataclass
class DistillOutput:
    """The total loss (a scalar tensor to back-propagate), its named parts (detached), and the student's output."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    student_output: Any = None

    def backward(self, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()``, so ``distiller(batch).backward()`` reads like a plain loss."""
        self.loss.backward(*args, **kwargs)


# -- batches and outputs --------------------------------------------------------------------
@dataclasses.dataclass
class _Batch:
    inputs: Any          # a tensor (positional) or a dict (keyword arguments)
    labels: torch.Tensor | None
    mask: torch.Tensor | None


def parse_batch(batch: Any, task: Any = None) -> _Batch:
    """Inputs, labels and padding mask of a batch (see the module docstring for the accepted forms)."""
    if isinstance(batch, torch.Tensor):
        inputs, labels, mask = batch, None, None
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise DataError(f"a tuple batch must be (inputs, labels), got {len(batch)} items")
        inputs, labels, mask = batch[0], batch[1], None
    elif isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels, mask = batch.get("labels"), batch.get("attention_mask")
    else:
        raise DataError(f"a batch must be a tensor, an (inputs, labels) pair or a dict, got {type(batch).__name__}")
    if labels is None and task is not None:
        labels = task.labels(inputs, mask)  # a causal LM's labels are its own input ids
    return _Batch(inputs, labels, mask)


def model_prediction(model: nn.Module, output: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """What output losses compare, from the model's task: logits, or an encoder's mean-pooled embedding."""
    return task_of(model).prediction(model, output, mask)


def _accepts(loss: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(loss.forward).parameters
    except (TypeError, ValueError):
        return False


def output_loss(loss: nn.Module, student: torch.Tensor, teacher: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Call an output loss with the labels and mask it takes (a cosine loss takes no labels)."""
    kwargs = {}
    if _accepts(loss, "labels"):
        kwargs["labels"] = batch.labels
    if _accepts(loss, "mask") and student.dim() == 3:  # a mask applies to token-level logits only
        kwargs["mask"] = batch.mask
    return loss(student, teacher, **kwargs)


# -- feature capture ------------------------------------------------------------------------
class FeatureHooks:
    """Forward hooks that keep the outputs of named modules while ``capturing`` is on."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str):
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                raise ConfigError(f"{role} has no module named {name!r}{closest(name, modules)}; "
                                  f"some of its modules: {', '.join(_sample_names(modules, name))}")
        self.values: dict[str, torch.Tensor] = {}
        self.capturing = False
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in dict.fromkeys(names)]

    def _hook(self, name: str):
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if self.capturing:
                self.values[name] = first_tensor(output, f"the output of {name!r}")
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        """The captured features, clearing the store (they are not kept past one step)."""
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _sample_names(modules: Mapping[str, nn.Module], near: str, n: int = 8) -> list[str]:
    """Module names to show in an error: the closest ones to ``near`` first, then the top-level ones."""
    import difflib

    names = [k for k in modules if k]
    close = difflib.get_close_matches(near, names, n=n, cutoff=0.3)
    rest = [k for k in names if "." not in k and k not in close]
    return (close + rest)[:n]


class _Capture:
    """Context manager: capture features of several hook sets during one forward."""

    def __init__(self, *hooks: FeatureHooks):
        self.hooks = hooks

    def __enter__(self) -> None:
        for h in self.hooks:
            h.values = {}
            h.capturing = True

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.capturing = False


# -- offline distillation -------------------------------------------------------------------
def check_vocabularies(teacher: nn.Module, student: nn.Module) -> None:
    """DataError when a teacher and a student LM do not share a vocabulary (their logits would not line up)."""
    def vocab(model: nn.Module) -> int | None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return head.weight.shape[0] if head is not None and hasattr(head, "weight") else None

    vt, vs = vocab(teacher), vocab(student)
    if vt is not None and vs is not None and vt != vs:
        raise DataError(f"teacher and student vocabularies differ ({vt} vs {vs} output tokens): token-level "
                        "distillation needs a student built for the teacher's tokenizer")
    tt, ts = tokenizer_of(teacher), tokenizer_of(student)
    if tt is not None and ts is not None and tt is not ts and hasattr(tt, "get_vocab") and tt.get_vocab() != ts.get_vocab():
        raise DataError("teacher and student tokenizers differ: the same text would become different token ids; "
                        "give the student the teacher's tokenizer")


def _freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


FeatureSpec = Mapping[str, "str | tuple[str, nn.Module | Sequence[nn.Module]]"]


class Distiller(nn.Module):
    """Offline knowledge distillation from a frozen ``teacher`` into ``student``.

    ``loss`` compares the two models' outputs (logits; for an encoder the mean-pooled
    embedding) and may be None when only features are distilled. ``features`` maps a
    student module name to a teacher module name, or to ``(teacher_name, loss)`` to give
    that pair its own loss(es); plain names use ``feature_loss`` (one loss or a list, copied
    per pair so a projector learns one pair's widths). Calling the distiller on a batch
    returns a ``DistillOutput``: ``loss`` = output loss + every feature loss, and ``parts``
    naming each term. Train ``distiller.trainable_parameters()`` (the student's and the
    projectors'); when a loss builds its projector on first use, call ``prepare(batch)``
    before building the optimizer (``Trainer`` does).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: nn.Module | None = None,
                 features: FeatureSpec | None = None, feature_loss: nn.Module | Sequence[nn.Module] | None = None):
        super().__init__()
        if teacher is student:
            raise ConfigError("teacher and student are the same module: pass a copy (copy.deepcopy) as the teacher")
        if loss is None and not features:
            raise ConfigError("Distiller needs an output loss (e.g. KDLoss()) or feature pairs (features={...})")
        check_vocabularies(teacher, student)
        object.__setattr__(self, "teacher", _freeze(teacher))  # not registered: never trained, never saved
        self.student = student
        self.task = task_of(student)
        self.output_loss = loss
        pairs = _feature_pairs(features or {}, feature_loss)
        self.pairs = [(s, t) for s, t, _ in pairs]
        self.feature_losses = nn.ModuleList(nn.ModuleList(losses) for _, _, losses in pairs)
        self._student_hooks = FeatureHooks(student, [s for s, _ in self.pairs], "the student")
        self._teacher_hooks = FeatureHooks(teacher, [t for _, t in self.pairs], "the teacher")
        self._handed_out: set[int] | None = None

    # The teacher follows the distiller's device and dtype moves, and stays in eval mode.
    def _apply(self, fn: Any, recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        self.teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> Distiller:
        """Set the student (and projectors) to training mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters to optimize: the student's and every loss's projector."""
        params = [p for p in self.parameters() if p.requires_grad]
        self._handed_out = {id(p) for p in params}
        return iter(params)

    @torch.no_grad()
    def prepare(self, batch: Any) -> None:
        """Run one batch through both models without gradients so lazily built projectors exist."""
        was_training = self.training
        self.eval()
        try:
            self._compute(batch)
        finally:
            self.train(was_training)

    def forward(self, batch: Any) -> DistillOutput:
        """Both models on ``batch``; the total loss with its parts."""
        out = self._compute(batch)
        if self._handed_out is not None:
            new = [p for p in self.parameters() if p.requires_grad and id(p) not in self._handed_out]
            if new:
                raise ConfigError("a loss built new parameters (a projector) after trainable_parameters() was "
                                  "called, so the optimizer would not train them: call distiller.prepare(batch) "
                                  "before building the optimizer")
        return out

    def _compute(self, batch: Any) -> DistillOutput:
        b = parse_batch(batch, self.task)
        with torch.no_grad(), _Capture(self._teacher_hooks):
            t_out = run_model(self.teacher, b.inputs)
        with _Capture(self._student_hooks):
            s_out = run_model(self.student, b.inputs)
        t_feats, s_feats = self._teacher_hooks.take(), self._student_hooks.take()
        parts: dict[str, torch.Tensor] = {}
        total = None
        if self.output_loss is not None:
            value = output_loss(self.output_loss, model_prediction(self.student, s_out, b.mask),
                                model_prediction(self.teacher, t_out, b.mask), b)
            parts[type(self.output_loss).__name__] = value
            total = value
        for (s_name, t_name), losses in zip(self.pairs, self.feature_losses):
            for loss in losses:
                try:
                    value = loss(s_feats[s_name], t_feats[t_name])
                except DataError as exc:
                    raise DataError(f"feature pair {s_name!r} -> {t_name!r}: {exc}") from None
                parts[f"{getattr(loss, 'part_name', type(loss).__name__)}[{s_name}]"] = value
                total = value if total is None else total + value
        return DistillOutput(total, {k: v.detach() for k, v in parts.items()}, s_out)

    def close(self) -> None:
        """Remove the feature hooks from both models."""
        self._student_hooks.remove()
        self._teacher_hooks.remove()


def _feature_pairs(features: FeatureSpec, default: nn.Module | Sequence[nn.Module] | None
                   ) -> list[tuple[str, str, list[nn.Module]]]:
    """(student name, teacher name, this pair's own copies of its losses) for every feature pair."""
    if not isinstance(features, Mapping):
        raise ConfigError("features must map student module names to teacher module names, "
                          "e.g. {'features.6': 'features.9'}")
    pairs = []
    for s_name, spec in features.items():
        if isinstance(spec, str):
            t_name, losses = spec, default
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
            t_name, losses = spec
        else:
            raise ConfigError(f"features[{s_name!r}] must be a teacher module name or (teacher name, loss), got {spec!r}")
        if losses is None:
            raise ConfigError(f"feature pair {s_name!r} -> {t_name!r} has no loss: pass feature_loss=HintLoss() "
                              "(or another feature loss)")
        losses = [losses] if isinstance(losses, nn.Module) else list(losses)
        if not losses or not all(isinstance(x, nn.Module) for x in losses):
            raise ConfigError(f"feature pair {s_name!r} -> {t_name!r}: losses must be nn.Modules, got {losses!r}")
        pairs.append((s_name, t_name, [copy.deepcopy(x) for x in losses]))
    return pairs


# -- online distillation ------------------------------------------------------------------
class MutualDistiller(nn.Module):
    """Deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning"): students teach each other.

    For students 1..K, student k minimizes ``loss(z_k, z_j, labels)`` averaged over its peers
    j != k, where ``loss`` is a ``KDLoss`` (default temperature 1 and alpha 0.5, i.e. half
    cross-entropy, half KL(p_j ‖ p_k) — the paper's CE + KL up to a factor 2). The peers'
    predictions are detached, so summing the K objectives into one ``loss`` trains each student
    on its own objective. All students see the same batch in one step (the paper alternates
    updates; simultaneous updates are the common implementation). Needs labels.
    """

    def __init__(self, students: Sequence[nn.Module], loss: nn.Module | None = None):
        super().__init__()
        if len(students) < 2:
            raise ConfigError(f"mutual learning needs at least 2 students, got {len(students)}")
        if len({id(s) for s in students}) != len(students):
            raise ConfigError("each student must be a separate module (pass copies, not the same one twice)")
        from slimkit.distillation.losses import KDLoss

        self.students = nn.ModuleList(students)
        self.loss = loss if loss is not None else KDLoss(temperature=1.0, alpha=0.5)
        self.task = task_of(students[0])

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Every student's parameters."""
        return (p for p in self.parameters() if p.requires_grad)

    def forward(self, batch: Any) -> DistillOutput:
        """Every student on ``batch``; the sum of their objectives, one part per student."""
        b = parse_batch(batch, self.task)
        if b.labels is None:
            raise DataError("mutual learning needs labels: pass (inputs, labels) batches")
        outs = [run_model(s, b.inputs) for s in self.students]
        preds = [model_prediction(s, o, b.mask) for s, o in zip(self.students, outs)]
        parts, total = {}, None
        for k, pred in enumerate(preds):
            peers = [output_loss(self.loss, pred, preds[j].detach(), b) for j in range(len(preds)) if j != k]
            value = torch.stack(peers).mean()
            parts[f"student{k}"] = value.detach()
            total = value if total is None else total + value
        return DistillOutput(total, parts, outs[0])


# -- self-distillation ----------------------------------------------------------------------
class ExitHead(nn.Module):
    """An auxiliary classifier on an intermediate feature: global average pool, then a Linear.

    (N, C, H, W) is pooled over H, W; (N, T, D) over T; (N, D) is used as it is.
    """

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Logits of the pooled feature."""
        return self.fc(pool_feature(feature))


def pool_feature(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) by spatial mean; (N, T, D) -> (N, D) by mean over T; (N, D) unchanged."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    if feature.dim() == 2:
        return feature
    raise DataError(f"an exit needs a feature of 2, 3 or 4 dims, got shape {tuple(feature.shape)}")


class SelfDistiller(nn.Module):
    """Self-distillation (Zhang et al. 2019, "Be Your Own Teacher"): the deepest output teaches shallow exits.

    ``exits`` names intermediate modules of ``model``; each gets an ``ExitHead`` (pooled
    feature -> Linear to the number of classes), built on the first batch (``prepare``).
    Loss = CE(deepest output, labels) + Σ_exits ``loss(exit logits, deepest logits detached,
    labels)``, ``loss`` a ``KDLoss`` (default temperature 3, alpha 0.3: the paper's
    (1 − α)·CE + α·KL weighting, written in KDLoss's alpha·CE + (1 − alpha)·T²·KL form).
    The heads only shape training; ``model(x)`` is unchanged and is what gets deployed.
    """

    def __init__(self, model: nn.Module, exits: Sequence[str], loss: nn.Module | None = None):
        super().__init__()
        if isinstance(exits, str) or not exits:
            raise ConfigError("exits must be a non-empty list of module names, e.g. ['features.3', 'features.7']")
        from slimkit.distillation.losses import KDLoss

        self.model = model
        self.exits = list(exits)
        self.loss = loss if loss is not None else KDLoss(temperature=3.0, alpha=0.3)
        self.heads = nn.ModuleDict()
        self._hooks = FeatureHooks(model, self.exits, "the model")
        self._handed_out = False

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The model's and the exit heads' parameters (call ``prepare`` first so the heads exist)."""
        if not self.heads:
            raise ConfigError("call SelfDistiller.prepare(batch) before trainable_parameters(): the exit heads "
                              "are sized from the first batch")
        self._handed_out = True
        return (p for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def prepare(self, batch: Any) -> None:
        """Size and build the exit heads from one batch."""
        b = parse_batch(batch)
        with _Capture(self._hooks):
            logits = first_tensor(run_model(self.model, b.inputs), "the model output")
        feats = self._hooks.take()
        device = logits.device
        for i, name in enumerate(self.exits):
            if str(i) not in self.heads:
                self.heads[str(i)] = ExitHead(pool_feature(feats[name]).shape[1], logits.shape[-1]).to(device)

    def forward(self, batch: Any) -> DistillOutput:
        """The model and its exits on ``batch``; parts: the deepest CE and one term per exit."""
        if not self.heads:
            if self._handed_out:
                raise ConfigError("call SelfDistiller.prepare(batch) before building the optimizer")
            self.prepare(batch)
        b = parse_batch(batch)
        if b.labels is None:
            raise DataError("self-distillation needs labels: pass (inputs, labels) batches")
        with _Capture(self._hooks):
            out = run_model(self.model, b.inputs)
        feats = self._hooks.take()
        deepest = first_tensor(out, "the model output")
        total = nn.functional.cross_entropy(deepest, b.labels)
        parts = {"deepest_ce": total.detach()}
        for i, name in enumerate(self.exits):
            value = self.loss(self.heads[str(i)](feats[name]), deepest.detach(), labels=b.labels)
            parts[f"exit[{name}]"] = value.detach()
            total = total + value
        return DistillOutput(total, parts, out)

    def close(self) -> None:
        """Remove the feature hooks from the model (the exit heads are no longer fed)."""
        self._hooks.remove()
