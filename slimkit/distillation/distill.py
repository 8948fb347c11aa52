"""The ``Distill`` step: train a student against a frozen teacher, as a recipe stage or ``slimkit.distill_``.

In a recipe the teacher is the model as it was before the first step, so ``Distill`` after
``Wanda`` or ``StructuredPrune`` is recovery training of the compressed model against the
uncompressed one (``student: ""``, the default); with ``student`` set it first builds a new
model (a zoo student, ``layers:0,2,5`` layer dropping, ``width:0.5``) and trains that.

Training data is never the evaluation split: ``train_data`` (a data spec: a file, folder or
dataset of the user's), else the train split of the model's built-in corpus, read by the
model's task (``slimkit.tasks``), unless ``distill_`` is given batches. Periodic evaluation
uses the corpus's calibration split (or a held-out tail of the user's training data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError, UnsupportedError
from slimkit.core.io import model_info
from slimkit.core.registry import Context, register
from slimkit.distillation.trainer import TrainSettings, _is_number
from slimkit.tasks import task_of

LOSSES = ("auto", "kd", "forward_kl", "reverse_kl", "mixed_kl", "cosine")
FEATURE_LOSSES = ("hint", "attention", "rkd", "similarity")


@dataclasses.dataclass(frozen=True)
class Distill(TrainSettings):
    """Knowledge distillation from a frozen teacher (with the training fields of ``TrainSettings``).

    ``student``: "" trains the model itself (recovery after compression); "default" the zoo
    teacher's default student; a zoo name ("stdlib-coder-student") or a checkpoint folder;
    "layers:0,2,5" (keep those teacher layers), "layers:3" (3 evenly spaced layers) or
    "width:0.5" (a narrower, freshly initialised config). ``loss``: "kd" (logits, Hinton),
    "forward_kl" / "reverse_kl" / "mixed_kl" (token level, causal LMs), "cosine" (encoder
    embeddings), "auto" picks by model kind. ``temperature``, ``alpha`` (weight of the label
    cross-entropy) and ``beta`` (mixed_kl's forward share) go to that loss. ``features``
    lists ``[student_module, teacher_module]`` pairs trained with ``feature_loss`` scaled by
    ``feature_weight`` (a projector is added where widths differ). ``train_data`` is a data spec
    (``"my.jsonl?field=text"`` or a mapping of ``DataSpec`` fields); without it ``corpus``
    ("auto": the model's own) names the built-in data; ``seq_len`` is the window/truncation length.
    """

    family: ClassVar[str] = "distill"

    student: str = ""
    loss: str = "auto"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    features: tuple = ()
    feature_loss: str = "hint"
    feature_weight: float = 1.0
    corpus: str = "auto"
    seq_len: int = 128
    train_data: Any = None

    def __post_init__(self) -> None:
        features = self.features
        if isinstance(features, dict):  # YAML's natural form {student: teacher}
            features = list(features.items())
        if isinstance(features, (list, tuple)):
            object.__setattr__(self, "features", tuple(tuple(p) if isinstance(p, (list, tuple)) else p
                                                       for p in features))
        super().__post_init__()

    def validate(self) -> None:
        """Check the distillation fields (and the training fields)."""
        super().validate()
        if not isinstance(self.student, str):
            self.fail("student", f"must be a string (\"\", \"default\", a zoo name, \"layers:0,2,5\", \"width:0.5\"), "
                      f"got {self.student!r}")
        if self.student.startswith(("layers:", "width:")):
            _parse_student_spec(self.student, self.fail)
        if not isinstance(self.corpus, str) or not self.corpus:
            self.fail("corpus", f"must be \"auto\" or the name of a built-in corpus, got {self.corpus!r}")
        if self.train_data is not None:
            from slimkit.tasks.sources import DataSpec

            try:
                DataSpec.parse(self.train_data)
            except ConfigError as exc:
                self.fail("train_data", str(exc))
        for name, allowed in (("loss", LOSSES), ("feature_loss", FEATURE_LOSSES)):
            value = getattr(self, name)
            if value not in allowed:
                from slimkit.core.errors import closest

                self.fail(name, f"unknown value {value!r}{closest(str(value), allowed)}; choose one of {', '.join(allowed)}")
        if not _is_number(self.temperature) or not self.temperature > 0:
            self.fail("temperature", f"must be a positive number, got {self.temperature!r}")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v <= 1:
                self.fail(name, f"must be a number in [0, 1], got {v!r}")
        if not _is_number(self.feature_weight) or self.feature_weight < 0:
            self.fail("feature_weight", f"must be a non-negative number, got {self.feature_weight!r}")
        for pair in self.features:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
                self.fail("features", f"each entry must be [student_module, teacher_module], got {pair!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            self.fail("seq_len", f"must be an integer >= 2, got {self.seq_len!r}")

    def build_student(self, model: nn.Module) -> nn.Module:
        """The model this step trains: ``model`` itself when ``student`` is "", else a new one built from it."""
        spec = self.student
        if spec == "":
            return model
        from slimkit.distillation.students import make_student

        if spec == "default":
            return make_student(model, seed=self.seed)
        if spec.startswith(("layers:", "width:")):
            layers, width = _parse_student_spec(spec, self.fail)
            return make_student(model, layers=layers, width=width, seed=self.seed)
        from slimkit.core.io import load

        return load(spec)  # a zoo name or a checkpoint folder (ModelLoadError names what is wrong)


def _parse_student_spec(spec: str, fail: Callable[[str, str], None]) -> tuple[Any, float | None]:
    """``layers:0,2,5`` -> ([0, 2, 5], None); ``layers:3`` -> (3, None); ``width:0.5`` -> (None, 0.5)."""
    key, _, value = spec.partition(":")
    try:
        if key == "width":
            width = float(value)
            if not 0 < width <= 1:
                raise ValueError
            return None, width
        numbers = [int(v) for v in value.split(",")]
        return (numbers[0] if len(numbers) == 1 else numbers), None
    except ValueError:
        fail("student", f"cannot read {spec!r}: write layers:0,2,5 (teacher layers to keep), layers:3 "
                        "(how many, evenly spaced) or width:0.5 (0 < ratio <= 1)")
        raise  # unreachable: fail raises


# -- losses from the config -----------------------------------------------------------------
class Weighted(nn.Module):
    """``weight`` × another loss (its part keeps the inner loss's name)."""

    def __init__(self, loss: nn.Module, weight: float):
        super().__init__()
        self.inner = loss
        self.weight = float(weight)
        self.part_name = type(loss).__name__

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The inner loss, scaled."""
        return self.weight * self.inner(*args, **kwargs)


def output_loss_for(config: Distill, task: Any) -> nn.Module:
    """The output loss module a config asks for ("auto": the task's default: forward_kl / cosine / kd)."""
    from slimkit.distillation import losses

    name = config.loss
    if name == "auto":
        name = task.default_loss
    if name not in task.losses:
        raise UnsupportedError(f"Distill.loss={name!r} does not apply to a {task.kind} model; use one of "
                               f"{', '.join(task.losses)}")
    if name == "kd":
        return losses.KDLoss(temperature=config.temperature, alpha=config.alpha)
    if name == "cosine":
        return losses.CosineEmbeddingLoss()
    divergence = {"forward_kl": "forward", "reverse_kl": "reverse", "mixed_kl": "mix"}[name]
    return losses.TokenKDLoss(divergence=divergence, temperature=config.temperature, alpha=config.alpha,
                              beta=config.beta)


def feature_loss_for(config: Distill, student_width: int, teacher_width: int) -> nn.Module:
    """One feature pair's loss (with a projector when a hint's widths differ), scaled by ``feature_weight``."""
    from slimkit.distillation import losses

    if config.feature_loss == "hint":
        dims = (student_width, teacher_width) if student_width != teacher_width else (None, None)
        loss: nn.Module = losses.HintLoss(*dims)
    elif config.feature_loss == "attention":
        loss = losses.AttentionTransferLoss()
    elif config.feature_loss == "rkd":
        loss = losses.RKDLoss()
    else:
        loss = losses.SimilarityLoss()
    return Weighted(loss, config.feature_weight)


def _feature_widths(student: nn.Module, teacher: nn.Module, pairs: tuple, batch: Any) -> list[tuple[int, int]]:
    """Channel widths (dim 1 of 4-D features, else the last dim) of each feature pair, from one batch."""
    from slimkit.core.calibration import run_model
    from slimkit.distillation.distiller import FeatureHooks, _Capture, parse_batch

    s_hooks = FeatureHooks(student, [s for s, _ in pairs], "the student")
    t_hooks = FeatureHooks(teacher, [t for _, t in pairs], "the teacher")
    try:
        b = parse_batch(batch, task_of(student))
        with torch.no_grad(), _Capture(s_hooks, t_hooks):
            run_model(student, b.inputs)
            run_model(teacher, b.inputs)
        s_feats, t_feats = s_hooks.take(), t_hooks.take()
    finally:
        s_hooks.remove()
        t_hooks.remove()

    def width(x: torch.Tensor) -> int:
        return x.shape[1] if x.dim() == 4 else x.shape[-1]

    return [(width(s_feats[s]), width(t_feats[t])) for s, t in pairs]


# -- training data, from the model's task -----------------------------------------------------
def _train_spec(config: Distill) -> Any:
    """The data spec training reads: ``train_data``, else the named corpus, else None (the model's own corpus)."""
    if config.train_data is not None:
        return config.train_data
    return None if config.corpus == "auto" else config.corpus


def training_batches(model: nn.Module, config: Distill) -> Callable[[int], Any]:
    """``step -> global batch`` over the training data (see ``Distill``), deterministic for a resumed run."""
    return task_of(model).training_batches(model, _train_spec(config), config.batch_size, config.seq_len,
                                           config.steps, config.seed)


def calibration_metric(student: nn.Module, teacher: nn.Module, config: Distill) -> Callable[[nn.Module], dict]:
    """Periodic evaluation on data that is never the eval split: accuracy, perplexity or cosine, by task."""
    return task_of(student).calibration_metric(student, teacher, _train_spec(config), config.seq_len)


# -- the handler ------------------------------------------------------------------------------
def check_weights_finite(model: nn.Module, role: str) -> None:
    """DataError naming the first parameter of ``model`` that holds NaN or inf."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p.detach()).all()):
            raise DataError(f"the {role}'s parameter {name!r} holds NaN or inf; fix the model before distilling")


def _keep_pruned_zeros(model: nn.Module, ctx: Context) -> bool:
    """Mask a pruned model's zeros so fine-tuning keeps its sparsity; True when masks were added here.

    A model that already carries masks (``Magnitude(keep_masks=True)``) keeps its own.
    """
    if not any(_leaves_zeros(step.get("type")) for step in model_info(model)["steps"]):
        return False
    from slimkit.core.masks import attach_masks_from_zeros, masked_modules

    if masked_modules(model):
        return False
    masked = attach_masks_from_zeros(model)
    if masked:
        ctx.note(f"Distill: kept the zeros of {len(masked)} pruned layer(s) fixed while training")
    return bool(masked)


def _leaves_zeros(type_name: Any) -> bool:
    """Whether the recorded step type is a technique that leaves zeros in the weights (its config says so)."""
    from slimkit.core.registry import config_types

    cls = config_types().get(str(type_name))
    return bool(cls is not None and getattr(cls, "leaves_zeros", False))


def _frozen_quantized(model: nn.Module) -> int:
    from slimkit.core.modules import SlimkitModule

    return sum(1 for m in model.modules() if isinstance(m, SlimkitModule) and not any(
        p.requires_grad for p in m.parameters(recurse=False)) and hasattr(m, "weight_bits_per_element"))


@register(Distill)
def apply_distill(student: nn.Module, config: Distill, ctx: Context) -> None:
    """Train ``student`` in place against ``ctx.teacher`` (frozen) with the config's losses and schedule."""
    from slimkit.distillation.distiller import Distiller
    from slimkit.distillation.trainer import Trainer, init_distributed

    teacher = ctx.teacher
    if teacher is None:
        raise ConfigError("Distill needs a teacher: in a recipe it is the model before the first step; in Python "
                          "call slimkit.distill_(student, teacher, config)")
    if config.checkpoint_dir is not None:  # before any training: a recipe's checkpoint_dir can name any folder
        from slimkit.distillation.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(config.checkpoint_dir, "Distill.checkpoint_dir")
    check_weights_finite(teacher, "teacher")
    check_weights_finite(student, "student")
    task = task_of(student)
    added_masks = _keep_pruned_zeros(student, ctx)
    frozen = _frozen_quantized(student)
    if frozen:
        ctx.note(f"Distill: {frozen} quantized layer(s) have integer codes and stay frozen; to recover their "
                 "accuracy, put Distill between QAT(step=prepare) and QAT(step=convert)")
    data = ctx.data if ctx.data is not None else training_batches(student, config)
    first = data(0) if callable(data) else next(iter(data))
    pairs = tuple(config.features)
    feature_losses = None
    if pairs:
        widths = _feature_widths(student, teacher, pairs, first)
        feature_losses = {s: (t, feature_loss_for(config, ws, wt)) for (s, t), (ws, wt) in zip(pairs, widths)}
    distiller = Distiller(teacher, student, output_loss_for(config, task), feature_losses)
    init_distributed()
    evaluate = calibration_metric(student, teacher, config) if ctx.data is None else None
    try:
        result = Trainer(distiller, config, data, evaluate=evaluate, progress=ctx.progress).fit()
    finally:
        distiller.close()
        student.eval()
        if added_masks:  # bake them in: plain weights run at full speed, and the zeros stay zeros
            from slimkit.core.masks import strip

            strip(student)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    ctx.note(f"Distill: {result.steps} steps{resumed} of batch {config.batch_size} in {result.seconds:.0f}s "
             f"on {result.world_size} process(es), final loss {result.final_loss:.4g}" + (f", {metrics}" if metrics else ""))
