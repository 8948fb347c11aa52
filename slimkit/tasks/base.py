"""The ``Task``: everything slimkit needs to know about one *kind* of model, in one place.

A task says how a model of its kind is
- fed: calibration batches from a data source, training batches for distillation, example
  inputs for export, tracing and latency;
- measured: evaluation data from a source, the quality metric, the figures a report shows;
- compared: the prediction two models are compared on (logits, a sentence embedding), the
  divergence between two predictions (sensitivity analysis), the loss Taylor importance
  differentiates, and the default distillation loss.

Families, evaluation, export and recipes ask ``task_of(model)`` instead of branching on a
model kind or a zoo name. A new kind of model is one subclass registered with
``register_task`` (see ``image_classifier.py``).

Data comes as a ``DataSpec`` (``tasks.sources``): a user's file, folder or dataset, or the
name of a built-in *corpus* that the zoo registered (``register_corpus``), each with
"train", "calibration" and "eval" splits kept disjoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.calibration import CalibrationData
from slimkit.core.errors import ConfigError, DataError, UnsupportedError, closest
from slimkit.core.io import model_info, tokenizer_of
from slimkit.core.plugins import ensure_installed, register_kind_resolver
from slimkit.tasks.sources import DataSpec, TensorRecords, TextRecords, is_builtin_name, read_source

Records = TextRecords | TensorRecords
Progress = Callable[[str, float], None]
SPLITS = ("train", "calibration", "eval")


# -- built-in corpora -------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A built-in data set with disjoint splits, registered by the zoo.

    ``read(split, n, seed, unit)`` returns the split's records (at most ``n`` when given, a
    seeded choice); ``unit`` is the task's text unit ("document" for language models,
    "sentence" for encoders), which a text corpus may honour. ``augment(inputs, generator)``
    optionally perturbs training inputs (random shifts of small images).
    """

    name: str
    description: str
    read: Callable[[str, int | None, int, str], Records]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


_CORPORA: dict[str, Corpus] = {}


def register_corpus(corpus: Corpus) -> None:
    """Make ``corpus`` usable by name as a data source (``--calib stdlib``, ``source: digits``)."""
    _CORPORA[corpus.name] = corpus


def corpus(name: str) -> Corpus:
    """The registered corpus ``name``; DataError naming the known ones otherwise."""
    ensure_installed()
    if name not in _CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}{closest(name, _CORPORA)}; known: {', '.join(_CORPORA)} "
                        "(or give a file, folder or dataset path)")
    return _CORPORA[name]


def corpus_names() -> list[str]:
    """Names of every registered corpus."""
    ensure_installed()
    return list(_CORPORA)


# -- evaluation data --------------------------------------------------------------------------
@dataclass
class EvalData:
    """Held-out data for one model kind, with a description that goes into the report."""

    kind: str
    description: str
    token_ids: torch.Tensor | None = None  # causal-lm: one 1-D stream
    texts: list[str] | None = None  # encoder
    inputs: Any = None  # classifiers: a tensor (or a dict of tensors)
    labels: torch.Tensor | None = None


# -- the task -----------------------------------------------------------------------------------
class Task:
    """How one kind of model is fed, measured and compared. Subclasses override what differs.

    The base class is the generic ``module`` task: it knows nothing of the inputs, so
    example inputs must be given (``GenericTask``) and quality is not measured.
    """

    kind: ClassVar[str] = "module"
    #: report figures measured by default (quality figures are the task's own)
    default_metrics: ClassVar[tuple[str, ...]] = ("size", "params", "sparsity")
    #: Distill.loss used for loss "auto"; the output losses this kind accepts
    default_loss: ClassVar[str] = "kd"
    #: whether ``loss`` can be differentiated (an encoder has no objective of its own)
    has_loss: ClassVar[bool] = True
    #: whether the model generates text token by token with a KV cache (``slimkit generate``)
    generates: ClassVar[bool] = False
    losses: ClassVar[tuple[str, ...]] = ("kd", "cosine")
    #: built-in corpus used when neither the user nor the model names one
    default_corpus: ClassVar[str | None] = None
    #: what one text of a built-in corpus is for this kind: "document" or "sentence"
    text_unit: ClassVar[str] = "document"
    #: the ONNX graph's output name, and whether the graph takes token ids + attention mask
    output_name: ClassVar[str] = "logits"
    token_inputs: ClassVar[bool] = False
    #: whether the model keeps a KV cache that export and calibration must switch off
    uses_cache: ClassVar[bool] = False
    #: what ``divergence`` measures, for tables and plots
    divergence_name: ClassVar[str] = "KL(original ‖ new) of the output distribution"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Whether a model with no recorded kind is of this task's kind (from its class or config)."""
        return False

    # -- data -------------------------------------------------------------------------------
    def corpus_name(self, model: nn.Module) -> str | None:
        """The built-in corpus of ``model`` (declared by the zoo, saved with the checkpoint) or the task's default."""
        return model_info(model).get("defaults", {}).get("corpus") or self.default_corpus

    def records(self, model: nn.Module, spec: Any, split: str, n: int | None = None) -> tuple[Records, str]:
        """The records a spec names (or the model's built-in corpus split when ``spec`` is None) and a description.

        A built-in corpus contributes its ``split``; a user's source is read whole (the
        caller holds out what must not be trained on).
        """
        spec = DataSpec.parse(spec) if spec is not None else None
        if spec is None or is_builtin_name(spec.source):
            name = spec.source if spec is not None else self.corpus_name(model)
            if name is None:
                raise DataError(f"no data for this {self.kind} model ({type(model).__name__}): it has no built-in "
                                "corpus; give a data source (a file, folder or dataset: --calib / --data / "
                                "--train-data, or data= in the API)")
            seed = spec.seed if spec is not None else 0
            found = corpus(name).read(split, n, seed, self.text_unit)
            return found, found.description
        found = read_source(spec, tokenizer_of(model), **self.read_options(model))
        return found, found.description

    def read_options(self, model: nn.Module) -> dict[str, Any]:
        """Extra keywords for ``read_source`` (an image task passes the model's image size)."""
        return {}

    def calibration(self, model: nn.Module, spec: Any = None) -> CalibrationData:
        """Calibration batches for ``model`` from ``spec`` (default: the calibration split of its corpus)."""
        raise UnsupportedError(f"no built-in way to feed a {self.kind} model ({type(model).__name__}): pass "
                               "CalibrationData yourself, or attach a GenericTask with example inputs")

    def eval_data(self, model: nn.Module, data: Any = None, max_tokens: int | None = None,
                  split: str = "eval") -> EvalData:
        """Held-out evaluation data for ``model``: ``data`` (a spec, EvalData) or the eval split of its corpus.

        ``split``: the built-in corpus split to read ("calibration" for figures that must never
        see the eval split, such as ``slimkit advise``'s quality probes); a user's source is read whole.
        """
        if isinstance(data, EvalData):
            return data
        return EvalData(self.kind, "no quality data for a generic module")

    def training_batches(self, model: nn.Module, spec: Any, batch_size: int, seq_len: int, steps: int,
                         seed: int) -> Callable[[int], Any]:
        """``step -> batch`` over the training data (default: the train split of the model's corpus), deterministic."""
        raise DataError(f"no built-in training data for a {self.kind} model: pass data to slimkit.distill_ "
                        "(a callable step -> batch, or an iterable of batches) or train_data: in the recipe")

    def calibration_metric(self, student: nn.Module, teacher: nn.Module, spec: Any,
                           seq_len: int) -> Callable[[nn.Module], dict]:
        """A periodic evaluation for training, on data that is never the eval split (default: none)."""
        return lambda module: {}

    # -- inputs -----------------------------------------------------------------------------
    def example_inputs(self, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """Named example inputs of ``model`` (export, tracing, the after-step check)."""
        shape = model_info(model).get("defaults", {}).get("input_shape")
        if shape:
            gen = torch.Generator().manual_seed(seed)
            return {"input": torch.rand((batch, *shape), generator=gen)}
        raise UnsupportedError(f"slimkit does not know the input of {type(model).__name__} ({self.kind}): pass "
                               "example=<a tensor of the input's shape>, or attach a GenericTask(example_inputs=...)")

    def generation_prompt(self, model: nn.Module, data: EvalData, tokens: int) -> torch.Tensor | None:
        """A (1, ``tokens``) prompt for timing generation, or None for a model that does not generate."""
        return None

    def latency_inputs(self, model: nn.Module, data: EvalData) -> tuple[Any, int, int | None]:
        """Fixed, seeded inputs for timing and FLOPs: (inputs, batch size, sequence length or None)."""
        inputs = self.example_inputs(model, batch=1, seed=0)
        first = next(iter(inputs.values()))
        return _single(inputs), int(first.shape[0]), None

    # -- measuring ----------------------------------------------------------------------------
    def reference(self, baseline: nn.Module, data: EvalData) -> Any:
        """What the compressed model's quality is measured against, computed on the baseline (default: nothing)."""
        return None

    def measure_quality(self, model: nn.Module, data: EvalData, reference: Any = None,
                        progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """The quality figures of ``model`` on ``data`` and details for the report (default: none)."""
        return {}, {}

    # -- comparing ---------------------------------------------------------------------------
    def labels(self, inputs: Any, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Labels implied by the inputs when a batch carries none (a causal LM predicts its own tokens)."""
        return None

    def prediction(self, model: nn.Module, output: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """What two models are compared on: the output tensor (logits) by default."""
        return first_tensor(output, "the model output")

    def divergence(self, reference: torch.Tensor, new: torch.Tensor) -> float:
        """How far ``new`` moved from ``reference`` (mean KL of the softmax over the last dim, float64)."""
        log_p, log_q = reference.double().log_softmax(-1), new.double().log_softmax(-1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss Taylor importance differentiates for one batch (cross-entropy on labels or own predictions)."""
        import torch.nn.functional as F

        from slimkit.core.calibration import run_model

        inputs, labels = split_labels(batch)
        out = run_model(model, inputs)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
            raise UnsupportedError(f"taylor importance needs class logits from {type(model).__name__}, got "
                                   f"{type(out).__name__}; fill .grad yourself and rerun, or use importance 'l1'")
        if labels is None:
            labels = logits.detach().argmax(-1)  # the model's own answers stand in for labels
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device))

    # -- students ------------------------------------------------------------------------------
    def student_spec(self, model: nn.Module) -> tuple[str, str] | None:
        """The default student declared for ``model``: (spec, name), e.g. ("layers:3", "minilm-3layer"), or None."""
        defaults = model_info(model).get("defaults", {})
        spec = defaults.get("student")
        return (spec, defaults.get("student_name") or spec) if spec else None


def first_tensor(value: Any, what: str) -> torch.Tensor:
    """The tensor of a module or model output: itself, ``.logits``/``.last_hidden_state``, or a tuple's first item."""
    if isinstance(value, torch.Tensor):
        return value
    for attribute in ("logits", "last_hidden_state"):
        t = getattr(value, attribute, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise DataError(f"cannot find a tensor in {what} of type {type(value).__name__}")


def split_labels(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of a batch: an (inputs, labels) pair, a dict with "labels", or inputs alone.

    What is left of a dict that held only "input" (and "labels") is that tensor, passed positionally.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return (rest["input"] if list(rest) == ["input"] else rest), batch["labels"]
    return batch, None


def epoch_rows(n: int, batch_size: int, step: int, seed: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """Row indices of a step's batch: the data in a seeded random order per epoch, batches in sequence
    (deterministic in ``step``, so a resumed run sees the same batches)."""
    flat = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, pos = flat // n, flat % n
    for e in epochs.unique().tolist():
        if e not in cache:
            cache[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
    return torch.stack([cache[int(e)][int(p)] for e, p in zip(epochs, pos)])


def require_tokenizer(model: nn.Module, kind: str, instead: str) -> Any:
    """The tokenizer attached to ``model``; DataError saying how to give one (or ``instead``) otherwise."""
    tokenizer = tokenizer_of(model)
    if tokenizer is None:
        raise DataError(f"this {kind} ({type(model).__name__}) has no tokenizer attached; load it from a folder "
                        f"with tokenizer files, or {instead}")
    return tokenizer


def _single(inputs: dict[str, torch.Tensor]) -> Any:
    """A one-entry ``{"input": x}`` becomes the positional ``x``; named inputs stay a dict."""
    return inputs["input"] if list(inputs) == ["input"] else inputs


# -- registry --------------------------------------------------------------------------------------
_TASKS: dict[str, type[Task]] = {}
_TASK_ATTR = "_slimkit_task"


def register_task(cls: type[Task]) -> type[Task]:
    """Register a Task subclass under its ``kind`` (a decorator). Later registrations are asked first."""
    _TASKS[cls.kind] = cls
    return cls


def task_kinds() -> list[str]:
    """Every registered kind."""
    ensure_installed()
    return list(_TASKS)


def set_task(model: nn.Module, task: Task | str) -> nn.Module:
    """Attach ``task`` (an instance, e.g. ``GenericTask(...)``, or a registered kind name) to ``model``.

    The kind is recorded with the model (and saved with its checkpoint); an instance with
    callbacks lives on the model object only (deep copies keep it).
    """
    from slimkit.core.io import attach_info

    if isinstance(task, str):
        ensure_installed()
        if task not in _TASKS:
            raise ConfigError(f"unknown task kind {task!r}{closest(task, _TASKS)}; known: {', '.join(_TASKS)}")
        attach_info(model, kind=task)
        object.__setattr__(model, _TASK_ATTR, None)
        return model
    if not isinstance(task, Task):
        raise ConfigError(f"set_task needs a Task or a kind name, got {type(task).__name__}")
    attach_info(model, kind=task.kind)
    object.__setattr__(model, _TASK_ATTR, task)
    return model


def _claimed_kind(model: nn.Module) -> str | None:
    for cls in reversed(list(_TASKS.values())):
        if cls.claims(model):
            return cls.kind
    return None


register_kind_resolver(_claimed_kind)


def task_of(model: nn.Module) -> Task:
    """The task of ``model``: an attached instance, else the registered task of its recorded kind, else
    the first registered task that claims it, else the generic module task."""
    attached = getattr(model, _TASK_ATTR, None)
    if isinstance(attached, Task):
        return attached
    ensure_installed()
    kind = model_info(model)["kind"]  # recorded, else claimed by a task, else core's guess from the class
    return _TASKS.get(kind, Task)()
