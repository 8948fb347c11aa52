"""Load and save models: zoo names, Hugging Face folders, nn.Modules and slimkit checkpoints.

A slimkit checkpoint is a folder:

- ``model.safetensors``: the whole state dict, compressed layers in their stored form
  (e.g. int8 codes + float scales), tied tensors once, sparse float weights as a bitmask
  plus their non-zeros (``core.sparse_storage``), pruning masks baked into the weights;
- ``config.json``: the transformers config (transformers models only);
- tokenizer files, when the model has a tokenizer;
- ``slimkit.json``: the format version, how to rebuild the architecture
  (a transformers class name, a zoo architecture, or "module" for a user's own
  nn.Module), the spec of every slimkit replacement module, and the steps applied.

Nothing is unpickled: weights come only from safetensors, the architecture only from
transformers classes, zoo builders or registered slimkit module types.
Saving writes to a temporary folder and renames it into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.atomic import atomic_dir
from slimkit.core.errors import ModelLoadError
from slimkit.core.modules import SlimkitModule, module_type
from slimkit.core.targets import set_submodule

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "slimkit.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars and info logs; slimkit shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# -- what slimkit knows about a model beyond its weights ------------------------------
def attach_info(model: nn.Module, kind: str | None = None, source: str | None = None,
                tokenizer: Any = None, steps: list[dict] | None = None) -> nn.Module:
    """Record on ``model`` its kind ("causal-lm", "encoder", "classifier"), source name, tokenizer and applied steps."""
    info = dict(getattr(model, "_slimkit_info", {}))
    if kind is not None:
        info["kind"] = kind
    if source is not None:
        info["source"] = source
    if steps is not None:
        info["steps"] = steps
    object.__setattr__(model, "_slimkit_info", info)
    if tokenizer is not None:
        object.__setattr__(model, "_slimkit_tokenizer", tokenizer)
    return model


def model_info(model: nn.Module) -> dict[str, Any]:
    """The info recorded by ``attach_info`` (kind inferred from the class when not recorded)."""
    info = dict(getattr(model, "_slimkit_info", {}))
    info.setdefault("kind", infer_kind(model))
    info.setdefault("steps", [])
    return info


def tokenizer_of(model: nn.Module) -> Any:
    """The tokenizer attached to ``model``, or None."""
    return getattr(model, "_slimkit_tokenizer", None)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers PreTrainedModel (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def infer_kind(model: nn.Module) -> str:
    """A best guess of the model's kind from its class."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if is_transformers_model(model):
        return "encoder"
    if getattr(model, "slimkit_arch", None) == "digits-cnn":
        return "classifier"
    return "module"


# -- save -----------------------------------------------------------------------------
def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Save ``model`` as a slimkit checkpoint folder at ``out_dir`` (atomically); returns the path.

    The tokenizer attached to the model is saved when ``tokenizer`` is not given.
    """
    from slimkit.core.sparse_storage import save_state_dict

    out_dir = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
    meta = checkpoint_meta(model)
    arch = meta["architecture"]
    with atomic_dir(out_dir) as tmp:
        if arch["kind"] == "transformers":
            quiet_transformers()
            model.config.save_pretrained(tmp)
        # Tied tensors are written once (their aliases recorded), sparse ones compactly.
        save_state_dict(checkpoint_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``save`` writes: pruning masks baked into plain weight names, the model left masked."""
    from slimkit.pruning.masks import masked_modules, masked_state_dict

    return masked_state_dict(model) if masked_modules(model) else model.state_dict()


def checkpoint_meta(model: nn.Module) -> dict[str, Any]:
    """The ``slimkit.json`` content for ``model``: how to rebuild it, its slimkit modules' specs, its steps."""
    info = model_info(model)
    if is_transformers_model(model):
        arch: dict[str, Any] = {"kind": "transformers", "class": type(model).__name__}
    elif getattr(model, "slimkit_arch", None):
        arch = {"kind": "zoo", "name": model.slimkit_arch, "config": model.arch_config()}
    else:
        arch = {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    modules = {name: {"type": type(m).__name__, "spec": m.slimkit_spec()}
               for name, m in model.named_modules() if isinstance(m, SlimkitModule)}
    meta = {
        "format": "slimkit",
        "format_version": FORMAT_VERSION,
        "slimkit_version": _version(),
        "architecture": arch,
        "kind": info["kind"],
        "source": info.get("source"),
        "steps": info.get("steps", []),
        "modules": modules,
    }
    structure = _structure(model, meta["steps"])
    if structure is not None:
        meta["structure"] = structure
    return meta


def _structure(model: nn.Module, steps: list[dict]) -> dict | None:
    """The attributes structured pruning recorded (``pruning.resize``), or None for a model it never touched."""
    if not any(step.get("type") == "StructuredPrune" for step in steps):
        return None
    from slimkit.pruning.resize import structure_of

    return structure_of(model)



def _version() -> str:
    try:
        from slimkit import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# -- load -----------------------------------------------------------------------------
def load(source: str | os.PathLike | nn.Module, skeleton: nn.Module | None = None) -> nn.Module:
    """A model from a zoo name, a slimkit checkpoint folder, a Hugging Face folder, or an nn.Module (returned as is).

    ``skeleton`` is needed only for a checkpoint of a user's own nn.Module class: an
    instance of that class whose weights are then replaced by the checkpoint's.
    Raises ModelLoadError naming the path or file for anything missing, corrupt or mismatched.
    """
    if isinstance(source, nn.Module):
        return source
    from slimkit.zoo import ZOO, load_zoo

    text = str(source)
    if text in ZOO:
        return load_zoo(text)
    path = Path(text)
    if not path.exists():
        raise ModelLoadError(f"model {text!r} not found: give a zoo model ({', '.join(ZOO)}) or an existing folder")
    if path.is_file():
        raise ModelLoadError(f"model {text!r} is a file: give the folder that holds it (config.json, model.safetensors)")
    if (path / META_FILE).exists():
        return _load_checkpoint(path, skeleton)
    if (path / "config.json").exists():
        return _load_hf_folder(path)
    raise ModelLoadError(f"folder {text!r} holds neither {META_FILE} (a slimkit checkpoint) nor config.json "
                         "(a Hugging Face model)")


def check_safetensors(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` is a complete, readable safetensors file."""
    from safetensors import safe_open

    if not path.exists():
        raise ModelLoadError(f"weights file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        # The header can be intact while the data is cut short: check the byte count it promises.
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if os.path.getsize(path) < 8 + header_len + end:
            raise ValueError("file is shorter than its header says")
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"weights file {path} is corrupt or truncated ({exc}); re-save or re-download it") from None
    if not keys:
        raise ModelLoadError(f"weights file {path} holds no tensors")


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / META_FILE} is not valid JSON ({exc})") from None
    if meta.get("format") != "slimkit" or not isinstance(meta.get("format_version"), int):
        raise ModelLoadError(f"{folder / META_FILE} is not a slimkit checkpoint description")
    if meta["format_version"] > FORMAT_VERSION:
        raise ModelLoadError(f"{folder} was written by a newer slimkit (format {meta['format_version']}); upgrade slimkit")
    return meta


def _build_architecture(folder: Path, arch: dict[str, Any], skeleton: nn.Module | None) -> nn.Module:
    kind = arch.get("kind")
    if kind == "transformers":
        import transformers

        quiet_transformers()
        cls = getattr(transformers, str(arch.get("class")), None)
        if cls is None or not isinstance(cls, type):
            raise ModelLoadError(f"{folder}: transformers has no model class {arch.get('class')!r}")
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{folder / 'config.json'} cannot be read ({exc})") from None
        return cls(config)
    if kind == "zoo":
        from slimkit.zoo import build_zoo_architecture

        try:
            return build_zoo_architecture(str(arch.get("name")), arch.get("config") or {})
        except ValueError as exc:
            raise ModelLoadError(f"{folder / META_FILE}: bad architecture config ({exc})") from None
    if kind == "module":
        if skeleton is None:
            raise ModelLoadError(f"{folder} holds a custom nn.Module ({arch.get('class')}): pass an instance of it "
                                 "as `skeleton` to slimkit.load")
        return skeleton
    raise ModelLoadError(f"{folder / META_FILE}: unknown architecture kind {kind!r}")


def _load_checkpoint(folder: Path, skeleton: nn.Module | None) -> nn.Module:
    from slimkit.pruning.masks import masked_modules, strip

    meta = _read_meta(folder)
    weights = folder / WEIGHTS_FILE
    check_safetensors(weights)
    model = _build_architecture(folder, meta.get("architecture", {}), skeleton)
    if masked_modules(model):  # a masked skeleton: the file holds plain (baked) weights
        strip(model)
    classes: dict[str, type] = {}
    for name, entry in meta.get("modules", {}).items():
        try:
            cls = module_type(entry["type"])
        except KeyError:
            raise ModelLoadError(f"{folder / META_FILE}: unknown module type {entry.get('type')!r} for {name!r}") from None
        where = name.rpartition(".")[0] if cls.attached else name  # an attached module needs its parent
        try:
            model.get_submodule(where)
        except AttributeError:
            raise ModelLoadError(f"{folder}: module {where!r} does not exist in the rebuilt architecture") from None
        set_submodule(model, name, cls.from_slimkit_spec(entry["spec"]))
        classes[cls.__name__] = cls
    state = _read_weights(weights)
    if meta.get("structure") is not None:
        # Structurally pruned: layers are smaller than the config builds them; take the file's shapes.
        from slimkit.pruning.resize import resize_to_checkpoint

        resize_to_checkpoint(model, {k: tuple(v.shape) for k, v in state.items()}, meta["structure"])
    _load_weights(model, state, weights, folder / META_FILE)
    for cls in classes.values():
        cls.after_load(model)
    model.eval()
    tokenizer = _load_tokenizer(folder)
    return attach_info(model, kind=meta.get("kind"), source=meta.get("source"), tokenizer=tokenizer,
                       steps=meta.get("steps", []))


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``weights`` (compact tensors expanded, recorded aliases restored)."""
    from slimkit.core.sparse_storage import load_state_dict

    try:
        state, aliases = load_state_dict(weights)
    except ValueError as exc:
        raise ModelLoadError(f"weights file {weights} is corrupt ({exc}); re-save it") from None
    for alias, stored in aliases.items():
        if stored in state and alias not in state:
            state[alias] = state[stored]
    return state


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, meta_file: Path) -> None:
    """Load ``state`` (read from ``weights``) into ``model`` strictly; ModelLoadError naming what differs.

    A key the file lacks is accepted only when it is an alias recorded in the file, or when
    the rebuilt model ties it to a key the file holds (e.g. a checkpoint of an HF model
    that omits its tied ``lm_head.weight``).
    """
    expected = model.state_dict()
    tied = _tied_names(expected)
    missing = [k for k in expected if k not in state and not (tied.get(k, set()) & state.keys())]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k!r} is {tuple(state[k].shape)} in the file but {tuple(expected[k].shape)} in the model"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(map(str, items[:5]))}{more}")
    if problems:
        raise ModelLoadError(f"{weights} does not match the architecture in {meta_file}: {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """For each name in ``state`` that shares its memory (same storage and view) with others: those other names."""
    groups: dict[tuple, set[str]] = {}
    for name, t in state.items():
        if t.numel() and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            groups.setdefault(key, set()).add(name)
    return {n: group - {n} for group in groups.values() if len(group) > 1 for n in group}


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"tokenizer files in {folder} cannot be read ({exc})") from None


def _load_hf_folder(folder: Path) -> nn.Module:
    import transformers

    quiet_transformers()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON ({exc})") from None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder} has no .safetensors weights; slimkit reads only safetensors (never pickles)")
    for shard in shards:
        check_safetensors(shard)
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise ModelLoadError(f"{folder / 'config.json'}: transformers has no class {archs[0]!r}")
    try:
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the Hugging Face model in {folder} ({str(exc).splitlines()[0][:300]})") from None
    model.eval()
    return attach_info(model, kind=infer_kind(model), source=str(folder), tokenizer=_load_tokenizer(folder))
