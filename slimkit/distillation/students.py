"""Student builders: smaller models to distil a teacher into.

Two ways to make a student, and the zoo's defaults on top of them:

- **Layer dropping** (``drop_layers``; DistilBERT, Sanh et al. 2019, "DistilBERT, a distilled
  version of BERT"): the student is the teacher with only some of its transformer layers
  (DistilBERT keeps every other one), every other weight copied. It starts close to the
  teacher, so distillation converges much faster than from scratch.
- **Width shrinking** (``shrink_width``): the same family with hidden, intermediate and head
  counts scaled by a ratio, freshly (seeded) initialised. Head size stays, so attention
  behaves the same per head; the vocabulary stays, so the student shares the teacher's
  tokenizer and its logits are comparable token by token.

``make_student`` is the one entry point; with no size given it returns the zoo teacher's
default student (``stdlib-coder`` -> the ``stdlib-coder-student`` config, ``minilm`` -> 3 of
its 6 layers, ``digits-cnn`` -> channels [8, 16, 32]). Every student carries the teacher's
kind and tokenizer (``slimkit.core.io.attach_info``) and a ``source`` naming what it is.

Supported families: transformers decoders whose layers sit at ``base_model.layers``
(Llama, Qwen2, Mistral, ...), BERT-family encoders (``base_model.encoder.layer``, also
inside wrappers such as BertForSequenceClassification) and the zoo's DigitsCNN.
Importing this module does not import transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.core.structure import renumber_structure
from slimkit.core.io import attach_info, is_transformers_model, model_info, tokenizer_of
from slimkit.tasks import task_of

SUPPORTED = ("transformers decoders with base_model.layers (Llama, Qwen2, Mistral, ...), "
             "BERT-family encoders (encoder.layer) and DigitsCNN")


# -- layer indices ---------------------------------------------------------------------
def evenly_spaced(n_layers: int, k: int) -> list[int]:
    """``k`` layer indices spread over ``range(n_layers)``, always including the first and the last.

    Index ``i`` of ``k`` is ``floor(i * (n - 1) / (k - 1))``: 6, 3 -> [0, 2, 5]; 6, 2 -> [0, 5];
    12, 6 -> [0, 2, 4, 6, 8, 11]. ``k = 1`` gives ``[n - 1]`` (the last layer, the one whose
    output the head reads). The step is at least 1 when ``k <= n``, so indices are unique.
    ConfigError unless ``1 <= k <= n_layers``.
    """
    for name, value in (("n_layers", n_layers), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"evenly_spaced: {name} must be a positive int, got {value!r}")
    if k > n_layers:
        raise ConfigError(f"evenly_spaced: cannot pick k={k} layers from a model with {n_layers}; "
                          f"choose k in 1..{n_layers}")
    if k == 1:
        return [n_layers - 1]
    # Integer arithmetic: exact, so the last index is always n - 1.
    return [i * (n_layers - 1) // (k - 1) for i in range(k)]


def _check_keep(keep: Sequence[int], n: int, unit: str) -> list[int]:
    """``keep`` as a list of ints: non-empty, unique, strictly increasing, in ``0..n-1`` (ConfigError)."""
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise ConfigError(f"drop_layers: keep must be a list of {unit} indices, got {keep!r}")
    out: list[int] = []
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigError(f"drop_layers: keep must hold int {unit} indices, got {i!r} in {list(keep)!r}")
        out.append(int(i))
    if not out:
        raise ConfigError(f"drop_layers: keep is empty; list at least one {unit} index in 0..{n - 1}")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ConfigError(f"drop_layers: {unit} index {bad[0]} is out of range; the model has {n} {unit}s, "
                          f"valid indices are 0..{n - 1}")
    dupes = sorted({i for i in out if out.count(i) > 1})
    if dupes:
        raise ConfigError(f"drop_layers: keep lists {unit} {dupes[0]} more than once; list each {unit} once")
    if out != sorted(out):
        raise ConfigError(f"drop_layers: keep must be in increasing order (the student runs {unit}s in "
                          f"the teacher's order), got {out}; use {sorted(out)}")
    return out


# -- finding the layers ----------------------------------------------------------------
def _is_digits_cnn(model: nn.Module) -> bool:
    """A conv-BN block CNN rebuilt from its own ``arch_config()`` (channels, pool_after, num_classes),
    like the zoo's: students are built with ``type(model).from_arch_config``."""
    config = getattr(model, "arch_config", None)
    return (callable(config) and callable(getattr(type(model), "from_arch_config", None))
            and isinstance(config().get("channels"), list) and hasattr(model, "features")
            and hasattr(model, "classifier"))


def _find_layers(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """``(family, parent, attribute)`` of the transformer layer list, or None when not recognised.

    layout is "layers" (``base_model.layers``, decoders) or "encoder.layer" (``base_model.encoder.layer``, BERT).
    """
    if not is_transformers_model(model) or getattr(model, "config", None) is None:
        return None
    base = getattr(model, "base_model", model)  # the wrapped base model (model.model, model.bert, ...)
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return "layers", base, "layers"
    encoder = getattr(base, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return "encoder.layer", encoder, "layer"
    return None


def _unsupported(model: nn.Module, what: str) -> UnsupportedError:
    return UnsupportedError(f"{what} does not know {type(model).__name__}; supported: {SUPPORTED}")


def _digits_blocks(model: nn.Module) -> tuple[list[nn.Conv2d], list[nn.BatchNorm2d]]:
    """The conv and BatchNorm of every DigitsCNN block, in order (UnsupportedError if replaced by other types)."""
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    n = len(model.arch_config()["channels"])
    if len(convs) != n or len(bns) != n:
        raise UnsupportedError(f"{type(model).__name__}: expected {n} plain Conv2d + BatchNorm2d blocks in "
                               "`features` (was it quantized or factorized?); build the student from the "
                               "uncompressed model")
    return convs, bns


def _n_layers(model: nn.Module) -> int:
    """Transformer layers (or DigitsCNN blocks) of ``model``; UnsupportedError for an unknown model."""
    if _is_digits_cnn(model):
        return len(model.arch_config()["channels"])
    found = _find_layers(model)
    if found is None:
        raise _unsupported(model, "slimkit.distillation.students")
    _, parent, attr = found
    return len(getattr(parent, attr))


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None)


def _source(model: nn.Module) -> str:
    return model_info(model).get("source") or type(model).__name__


def _attach(student: nn.Module, teacher: nn.Module, source: str, steps: list[dict] | None) -> nn.Module:
    """Give ``student`` the teacher's kind, tokenizer, data defaults (corpus, input shape) and ``source``
    (steps: None keeps the copied ones). The teacher's default-student spec is not inherited."""
    info = model_info(teacher)
    defaults = {k: v for k, v in info.get("defaults", {}).items() if k in ("corpus", "input_shape")}
    return attach_info(student, kind=info["kind"], source=source, tokenizer=tokenizer_of(teacher), steps=steps,
                       defaults=defaults)


def _trainable(model: nn.Module) -> nn.Module:
    """Float parameters require grad: a student copied from a frozen teacher must still learn."""
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model


# -- layer dropping ----------------------------------------------------------------------
def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A new model holding only the transformer layers ``keep`` of ``model``, in that order (DistilBERT init).

    Layer dropping (Sanh et al. 2019, DistilBERT): initialise a shallower student from a subset
    of the teacher's layers, e.g. every other one; embeddings, final norm, head and pooler are
    copied too, so the student starts as the teacher with some residual blocks removed.

    ``model`` is not touched: the result is a deep copy (the attached tokenizer is shared, not
    copied), in eval mode, every float parameter trainable. For transformers models
    ``config.num_hidden_layers`` becomes ``len(keep)``, ``config.layer_types`` (transformers 5,
    when present) keeps the kept layers' entries, each attention module's ``layer_idx``
    (its KV-cache slot) becomes its new position, and attributes recorded by structured
    pruning are renumbered with their layers.

    DigitsCNN: ``keep`` lists conv blocks. The student is a DigitsCNN with those blocks'
    channels (a kept block keeps its max-pool, so the student may downsample less) and the
    teacher's classes. Weights are copied only where shapes match: every block's BatchNorm
    (same channel count), a block's conv when its input width is unchanged (the first block,
    or one whose predecessor is kept too) and the classifier when the last block is kept;
    the rest stays at its seed-0 initialisation.

    ConfigError for an empty, duplicated, out-of-range or non-increasing ``keep``;
    UnsupportedError for a model type this does not know.
    """
    return _drop_layers(model, keep, seed=0)


def _drop_layers(model: nn.Module, keep: Sequence[int], seed: int, source: str | None = None) -> nn.Module:
    if _is_digits_cnn(model):
        return _drop_digits_blocks(model, keep, seed, source)
    found = _find_layers(model)
    if found is None:
        raise _unsupported(model, "drop_layers")
    _, parent, attr = found
    layers = getattr(parent, attr)
    keep = _check_keep(keep, len(layers), "layer")
    list_name = _module_name(model, layers)

    # Dropped layers map to None in the deepcopy memo, so they are never copied (memory stays
    # near the student's size); the tokenizer maps to itself, so it is shared, not copied.
    memo: dict[int, Any] = {id(layer): None for i, layer in enumerate(layers) if i not in keep}
    tokenizer = tokenizer_of(model)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    student = copy.deepcopy(model, memo)

    _, s_parent, s_attr = _find_layers(student)
    copied = getattr(s_parent, s_attr)
    new_layers = nn.ModuleList([copied[i] for i in keep])
    setattr(s_parent, s_attr, new_layers)
    for position, layer in enumerate(new_layers):
        for module in layer.modules():
            # layer_idx picks the KV-cache slot (and, in some models, the layer type): must be the new position.
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position

    config = student.config
    old_n = config.num_hidden_layers
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == old_n:
        config.layer_types = [layer_types[i] for i in keep]
    if list_name is not None:
        renumber_structure(student, list_name, keep)

    src = source or f"{_source(model)}-{len(keep)}layer"
    return _attach(_trainable(student.eval()), model, src, steps=None)


def _drop_digits_blocks(model: nn.Module, keep: Sequence[int], seed: int, source: str | None) -> nn.Module:
    convs, bns = _digits_blocks(model)
    keep = _check_keep(keep, len(convs), "block")
    pools = set(model.arch_config()["pool_after"])
    cfg = {"channels": [int(convs[i].out_channels) for i in keep],
           "pool_after": [j for j, i in enumerate(keep) if i in pools],
           "num_classes": int(model.classifier.out_features)}
    student = _seeded(lambda: type(model).from_arch_config(cfg), seed, model)
    s_convs, s_bns = _digits_blocks(student)
    with torch.no_grad():
        for j, i in enumerate(keep):
            # BatchNorm: same channel count, always copied (affine and running statistics).
            s_bns[j].load_state_dict(bns[i].state_dict())
            if s_convs[j].weight.shape == convs[i].weight.shape:
                s_convs[j].weight.copy_(convs[i].weight)
        if student.classifier.weight.shape == model.classifier.weight.shape:
            student.classifier.load_state_dict(model.classifier.state_dict())
    src = source or f"{_source(model)}-{len(keep)}block"
    return _attach(_trainable(student), model, src, steps=[])


# -- width shrinking -----------------------------------------------------------------------
def _seeded(build: Callable[[], nn.Module], seed: int, like: nn.Module) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` (global RNG restored after), on ``like``'s device and dtype."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    ref = next((p for p in like.parameters() if p.is_floating_point()), None)
    if ref is not None:
        model.to(device=ref.device, dtype=ref.dtype)
    return model.eval()


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ConfigError(f"shrink_width: ratio must be a number with 0 < ratio <= 1, got {ratio!r}")
    return float(ratio)


def _scale(n: int, ratio: float) -> int:
    """``n * ratio`` rounded half up, at least 1."""
    return max(1, int(n * ratio + 0.5))


def _kv_heads(n_heads: int, target: int) -> int:
    """The divisor of ``n_heads`` closest to ``target`` (the smaller on a tie): attention needs heads % kv == 0."""
    divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def _shrunk_config(model: nn.Module, family: str, ratio: float, n_layers: int | None) -> Any:
    """A copy of ``model.config`` with widths scaled by ``ratio`` (and ``n_layers`` layers when given)."""
    config = model.config
    missing = [f for f in ("hidden_size", "intermediate_size", "num_attention_heads")
               if not isinstance(getattr(config, f, None), int)]
    if missing:
        raise UnsupportedError(f"shrink_width: {type(config).__name__} of {type(model).__name__} has no "
                               f"{', '.join(missing)}; supported: Llama-family and BERT-family configs")
    cfg = copy.deepcopy(config)
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    new_heads = _scale(heads, ratio)
    if family == "encoder.layer":
        # BERT derives the head size as hidden_size / num_attention_heads: hidden follows the heads.
        if hidden % heads:
            raise UnsupportedError(f"shrink_width: hidden_size {hidden} is not a multiple of "
                                   f"num_attention_heads {heads} in {type(model).__name__}")
        cfg.hidden_size = new_heads * head_dim
    else:
        kv = getattr(config, "num_key_value_heads", None) or heads
        if hasattr(config, "num_key_value_heads"):
            cfg.num_key_value_heads = _kv_heads(new_heads, _scale(kv, ratio))
        cfg.head_dim = head_dim  # explicit, so the student keeps the teacher's head size
        # The usual layout hidden = heads * head_dim stays; a decoupled hidden size scales on its own.
        cfg.hidden_size = new_heads * head_dim if hidden == heads * head_dim else _scale(hidden, ratio)
    cfg.num_attention_heads = new_heads
    cfg.intermediate_size = _scale(config.intermediate_size, ratio)
    if n_layers is not None:
        old_n = config.num_hidden_layers
        cfg.num_hidden_layers = n_layers
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == old_n:
            cfg.layer_types = [layer_types[i] for i in evenly_spaced(old_n, n_layers)]
    return cfg


def shrink_width(model: nn.Module, ratio: float, seed: int = 0) -> nn.Module:
    """A freshly initialised (seeded) model of ``model``'s family with its widths scaled by ``ratio``.

    Transformers (Llama-family decoders, BERT-family encoders): ``num_attention_heads``
    becomes ``round(heads * ratio)`` (at least 1) with ``head_dim`` kept, so ``hidden_size``
    becomes ``heads' * head_dim`` (a decoder whose hidden size is not ``heads * head_dim``
    scales it directly); ``num_key_value_heads`` is the divisor of the new head count
    closest to ``round(kv * ratio)``, so GQA stays valid; ``intermediate_size`` is
    ``round(intermediate * ratio)``. The effective ratio is thus a multiple of
    ``1 / num_attention_heads``. Layer count, vocabulary (the student shares the tokenizer)
    and every other config field stay. DigitsCNN: each channel count ``round(c * ratio)``,
    at least 1. Rounding is half up.

    The weights come from ``torch.manual_seed(seed)`` (same seed -> same weights; the global
    RNG is restored afterwards), on the teacher's device and dtype, in eval mode; the
    teacher's kind and tokenizer are attached. ConfigError unless ``0 < ratio <= 1``;
    UnsupportedError for another model type.
    """
    return _shrink(model, _check_ratio(ratio), seed, n_layers=None)


def _shrink(model: nn.Module, ratio: float, seed: int, n_layers: int | None) -> nn.Module:
    """``shrink_width``, optionally with ``n_layers`` evenly spaced layers (blocks) instead of all."""
    unit = "block" if _is_digits_cnn(model) else "layer"
    src = f"{_source(model)}-w{ratio:g}" + ("" if n_layers is None else f"-{n_layers}{unit}")
    if _is_digits_cnn(model):
        arch = model.arch_config()
        convs, _ = _digits_blocks(model)
        blocks = list(range(len(convs))) if n_layers is None else evenly_spaced(len(convs), n_layers)
        pools = set(arch["pool_after"])
        cfg = {"channels": [_scale(int(convs[i].out_channels), ratio) for i in blocks],
               "pool_after": [j for j, i in enumerate(blocks) if i in pools],
               "num_classes": int(model.classifier.out_features)}
        student = _seeded(lambda: type(model).from_arch_config(cfg), seed, model)
        return _attach(student, model, src, steps=[])
    found = _find_layers(model)
    if found is None:
        raise _unsupported(model, "shrink_width")
    if n_layers is not None:
        evenly_spaced(model.config.num_hidden_layers, n_layers)  # validates n_layers against the teacher
    cfg = _shrunk_config(model, found[0], ratio, n_layers)
    return _attach(_build_transformers(type(model), cfg, seed, model), model, src, steps=[])


def _build_transformers(cls: type, config: Any, seed: int, like: nn.Module) -> nn.Module:
    from slimkit.core.io import quiet_transformers

    quiet_transformers()
    return _seeded(lambda: cls(config), seed, like)


# -- the entry point -----------------------------------------------------------------------
def make_student(teacher: nn.Module, layers: Sequence[int] | int | None = None, width: float | None = None,
                 seed: int = 0) -> nn.Module:
    """A student for ``teacher``: fewer layers, narrower, or the zoo teacher's default.

    - ``layers`` a list of indices -> ``drop_layers(teacher, layers)``; an int ``k`` ->
      ``drop_layers(teacher, evenly_spaced(n, k))`` (first and last layer always kept);
    - ``width`` a ratio in (0, 1] -> ``shrink_width(teacher, width, seed)``; with ``layers=k``
      as well, the width-shrunk config with ``k`` layers (random init, seeded);
    - neither -> the default student of a zoo teacher, by its ``source``: ``stdlib-coder`` ->
      the ``stdlib-coder-student`` config (``coder_config(student=True)``), seeded init;
      ``minilm`` -> its layers ``evenly_spaced(6, 3)`` = [0, 2, 5] (source ``minilm-3layer``);
      ``digits-cnn`` -> DigitsCNN with channels [8, 16, 32] (source ``digits-cnn-small``), seeded.

    ``seed`` drives every random initialisation (with seed 0 the stdlib-coder default equals
    the zoo's ``stdlib-coder-student``). The student carries the teacher's kind and tokenizer.
    ConfigError for an unknown source with no size given, or for ``width`` with a list of layers.
    """
    if width is not None:
        ratio = _check_ratio(width)
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)):
            raise ConfigError("make_student: with width=, layers= must be a layer count (an int): a narrower "
                              f"student is freshly initialised, so it cannot keep chosen teacher layers {layers!r}")
        return _shrink(teacher, ratio, seed, n_layers=layers)
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = evenly_spaced(_n_layers(teacher), layers)
        return _drop_layers(teacher, layers, seed)
    return _default_student(teacher, seed)


def _default_student(teacher: nn.Module, seed: int) -> nn.Module:
    """The student declared for ``teacher`` (its task's ``student_spec``: a model name, "layers:K", "width:R")."""
    declared = task_of(teacher).student_spec(teacher)
    source = model_info(teacher).get("source")
    if declared is None:
        raise ConfigError(f"make_student: no default student for a model from {source or type(teacher).__name__!r} "
                          "(none is declared for it); pass layers= (a count or indices to keep) or width= (a ratio in (0, 1])")
    spec, name = declared
    kind, _, value = spec.partition(":")
    if kind == "layers":
        keep = evenly_spaced(_n_layers(teacher), int(value))
        return _drop_layers(teacher, keep, seed, source=name)
    if kind == "width":
        student = _shrink(teacher, _check_ratio(float(value)), seed, n_layers=None)
        return attach_info(student, source=name)
    from slimkit.core.io import load

    student = load(spec)  # a named model (an untrained student config of the zoo)
    if seed != 0 and is_transformers_model(student):
        student = _build_transformers(type(student), student.config, seed, teacher)  # a fresh, seeded init
    return _attach(student, teacher, name, steps=[])


# -- description ---------------------------------------------------------------------------
def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def describe_student(teacher: nn.Module, student: nn.Module) -> str:
    """One line comparing ``student`` with ``teacher``, e.g. "2 of 6 layers, hidden 192, 1.9M of 6.2M params".

    DigitsCNN: "3 of 3 blocks, channels [8, 16, 32], 6.4K of 94.0K params". Parts that do
    not apply to a model (an unknown architecture) are left out; the parameter counts always appear.
    """
    parts: list[str] = []
    if _is_digits_cnn(teacher) and _is_digits_cnn(student):
        channels = [int(c.out_channels) for c in student.features if isinstance(c, nn.Conv2d)]
        parts += [f"{len(channels)} of {_n_layers(teacher)} blocks", f"channels {channels}"]
    elif _find_layers(teacher) is not None and _find_layers(student) is not None:
        parts += [f"{_n_layers(student)} of {_n_layers(teacher)} layers", f"hidden {student.config.hidden_size}"]
    parts.append(f"{_count(_params(student))} of {_count(_params(teacher))} params")
    return ", ".join(parts)
