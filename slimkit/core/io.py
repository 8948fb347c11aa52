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

A sentence-transformers folder (``modules.json``; the Transformer module at the root or in
a sub-folder, then Pooling, Normalize, ...) loads as its transformer, with the rest of the
pipeline recorded as data under ``defaults["sentence_transformers"]`` (saved in
``slimkit.json``): the module list, the Transformer's ``sentence_bert_config.json``, the root
``config_sentence_transformers.json`` and the small JSON files of every other module. Saving
such a model also writes a sentence-transformers layout beside the checkpoint:
``modules.json`` whose Transformer module lives in ``<idx>_SlimkitEncoder/`` (a
``config.json`` of model type ``slimkit_encoder`` pointing back at the checkpoint, the
``sentence_bert_config.json``, the tokenizer), and the other modules' folders as recorded.
``SentenceTransformer(folder)`` then runs slimkit's compressed layers once
``slimkit.export.sentence_transformers`` is imported (it registers that model type with
transformers' Auto classes, so no ``trust_remote_code`` is ever needed).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.atomic import atomic_dir
from slimkit.core.errors import ModelLoadError
from slimkit.core.modules import SlimkitModule, module_type
from slimkit.core.plugins import checkpoint_hooks, model_sources, resolve_kind
from slimkit.core.targets import set_submodule
from slimkit.core.version import __version__

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "slimkit.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
# sentence-transformers folders (see the module docstring)
ST_MODULES_FILE = "modules.json"
ST_INFO_KEY = "sentence_transformers"  # the key under a model's recorded defaults
ST_ENCODER_TYPE = "slimkit_encoder"  # transformers model_type registered by slimkit.export.sentence_transformers
ST_ENCODER_DIR = "SlimkitEncoder"  # the Transformer module's folder is "<idx>_SlimkitEncoder"
ST_JSON_LIMIT = 64 * 1024  # a module file recorded in slimkit.json must be small JSON (pooling config, ...)
_ST_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                    "sentence_camembert_config.json", "sentence_albert_config.json",
                    "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
_ST_DIMENSIONS = ("hidden_size", "d_model", "dim", "embed_dim", "max_position_embeddings", "n_positions", "vocab_size")


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars and info logs; slimkit shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# -- what slimkit knows about a model beyond its weights ------------------------------
def attach_info(model: nn.Module, kind: str | None = None, source: str | None = None,
                tokenizer: Any = None, steps: list[dict] | None = None, defaults: dict | None = None) -> nn.Module:
    """Record on ``model`` its kind (the name of its task in ``slimkit.tasks``), source name, tokenizer,
    applied steps and task ``defaults`` (data, not code: its corpus, per-sample input shape, default
    student spec), which are saved with the checkpoint."""
    info = dict(getattr(model, "_slimkit_info", {}))
    if kind is not None:
        info["kind"] = kind
    if source is not None:
        info["source"] = source
    if steps is not None:
        info["steps"] = steps
    if defaults:
        info["defaults"] = {**info.get("defaults", {}), **defaults}
    object.__setattr__(model, "_slimkit_info", info)
    if tokenizer is not None:
        object.__setattr__(model, "_slimkit_tokenizer", tokenizer)
    return model


def model_info(model: nn.Module) -> dict[str, Any]:
    """The info recorded by ``attach_info`` (kind inferred from the class when not recorded).

    A module class may declare its kind and task defaults itself (``slimkit_kind``,
    ``slimkit_defaults``, e.g. ``{"input_shape": [1, 8, 8]}``); recorded values win.
    """
    info = dict(getattr(model, "_slimkit_info", {}))
    declared = getattr(type(model), "slimkit_defaults", None)
    if isinstance(declared, dict) and declared:
        info["defaults"] = {**declared, **info.get("defaults", {})}
    if "kind" not in info and isinstance(getattr(type(model), "slimkit_kind", None), str):
        info["kind"] = type(model).slimkit_kind
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
    """The model's kind when none is recorded: what a registered task claims (``slimkit.tasks``), else "module"."""
    return resolve_kind(model) or "module"


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
        _write_sentence_transformers(tmp, model, meta.get("defaults", {}).get(ST_INFO_KEY), tokenizer)
    return out_dir


def _write_sentence_transformers(folder: Path, model: nn.Module, st: dict | None, tokenizer: Any) -> None:
    """Write the sentence-transformers layout recorded in ``st`` beside the checkpoint in ``folder``.

    The Transformer module becomes ``<idx>_SlimkitEncoder/``: a transformers config of model
    type ``slimkit_encoder`` whose ``checkpoint`` ("..") is this folder, so sentence-transformers'
    own Transformer module loads slimkit's model with its stored (compressed) weights; the
    other modules are written from their recorded JSON. A pipeline slimkit could not record
    whole (a module with weights, e.g. Dense) is left out with a warning rather than written
    half: its embeddings would silently differ.
    """
    if not st:
        return
    problem = None
    if not is_transformers_model(model):
        problem = f"{type(model).__name__} is not a transformers model"
    elif st.get("unsupported"):
        problem = "these modules hold more than small JSON files: " + ", ".join(st["unsupported"])
    elif tokenizer is None:
        problem = "the model has no tokenizer"
    if problem is not None:
        warnings.warn(f"slimkit.save wrote no sentence-transformers files (modules.json) to {folder.name}: {problem}; "
                      "the slimkit checkpoint itself is complete", stacklevel=3)
        return
    entries = [dict(e) for e in st["modules"]]
    sub = f"{entries[0].get('idx', 0)}_{ST_ENCODER_DIR}"
    entries[0]["path"] = sub
    (folder / sub).mkdir()
    config = {k: getattr(model.config, k) for k in _ST_DIMENSIONS if isinstance(getattr(model.config, k, None), int)}
    config.update(model_type=ST_ENCODER_TYPE, architectures=["SlimkitEncoderModel"], checkpoint="..",
                  slimkit_note="a slimkit checkpoint: `import slimkit.export.sentence_transformers` before "
                               "SentenceTransformer(folder), which registers this model type")
    (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
    (folder / sub / _ST_CONFIG_FILES[0]).write_text(json.dumps(st.get("sentence_bert_config") or {}, indent=2))
    tokenizer.save_pretrained(folder / sub)
    files = st.get("files", {})
    for entry in entries[1:]:
        target = _module_dir(folder, entry["path"], ST_MODULES_FILE)
        target.mkdir(parents=True, exist_ok=True)
        for name, content in files.get(entry["path"], {}).items():
            (target / name).write_text(json.dumps(content, indent=2))
    (folder / ST_MODULES_FILE).write_text(json.dumps(entries, indent=2))
    if st.get("config_sentence_transformers") is not None:
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st["config_sentence_transformers"],
                                                                             indent=2))


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``save`` writes: a checkpoint hook's (pruning bakes masks into plain weight names,
    leaving the model masked), else ``model.state_dict()``."""
    for hook in checkpoint_hooks():
        if hook.state_dict is not None:
            state = hook.state_dict(model)
            if state is not None:
                return state
    return model.state_dict()


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
        "slimkit_version": __version__,
        "architecture": arch,
        "kind": info["kind"],
        "source": info.get("source"),
        "steps": info.get("steps", []),
        "modules": modules,
    }
    if info.get("defaults"):
        meta["defaults"] = info["defaults"]
    for hook in checkpoint_hooks():
        if hook.meta is not None:
            meta.update(hook.meta(model, meta["steps"]))
    return meta


# -- load -----------------------------------------------------------------------------
def load(source: str | os.PathLike | nn.Module, skeleton: nn.Module | None = None) -> nn.Module:
    """A model from a zoo name, a slimkit checkpoint folder, a Hugging Face folder, or an nn.Module (returned as is).

    ``skeleton`` is needed only for a checkpoint of a user's own nn.Module class: an
    instance of that class whose weights are then replaced by the checkpoint's.
    Raises ModelLoadError naming the path or file for anything missing, corrupt or mismatched.
    """
    if isinstance(source, nn.Module):
        return source
    text = str(source)
    path = Path(text)
    if not path.exists():
        for provider in model_sources():
            if text in provider.names():
                return provider.load(text)
        known = "; ".join(f"{p.label}: {', '.join(p.names())}" for p in model_sources())
        raise ModelLoadError(f"model {text!r} not found: give an existing folder or a name ({known})")
    if path.is_file():
        raise ModelLoadError(f"model {text!r} is a file: give the folder that holds it (config.json, model.safetensors)")
    if (path / META_FILE).exists():
        return _load_checkpoint(path, skeleton)
    if (path / ST_MODULES_FILE).exists():
        return _load_st_folder(path)
    if (path / "config.json").exists():
        return _load_hf_folder(path)
    raise ModelLoadError(f"folder {text!r} holds neither {META_FILE} (a slimkit checkpoint), {ST_MODULES_FILE} "
                         "(a sentence-transformers model) nor config.json (a Hugging Face model)")


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
        builders = [p.build_architecture for p in model_sources() if p.build_architecture is not None]
        if not builders:
            raise ModelLoadError(f"{folder / META_FILE}: no provider rebuilds architecture {arch.get('name')!r}")
        try:
            return builders[0](str(arch.get("name")), arch.get("config") or {})
        except ValueError as exc:
            raise ModelLoadError(f"{folder / META_FILE}: bad architecture config ({exc})") from None
    if kind == "module":
        if skeleton is None:
            raise ModelLoadError(f"{folder} holds a custom nn.Module ({arch.get('class')}): pass an instance of it "
                                 "as `skeleton` to slimkit.load")
        return skeleton
    raise ModelLoadError(f"{folder / META_FILE}: unknown architecture kind {kind!r}")


def _load_checkpoint(folder: Path, skeleton: nn.Module | None) -> nn.Module:
    meta = _read_meta(folder)
    weights = folder / WEIGHTS_FILE
    check_safetensors(weights)
    model = _build_architecture(folder, meta.get("architecture", {}), skeleton)
    for hook in checkpoint_hooks():  # e.g. a masked skeleton is stripped: the file holds baked weights
        if hook.prepare is not None:
            hook.prepare(model)
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
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for hook in checkpoint_hooks():  # e.g. structurally pruned layers take the file's shapes
        if hook.before_load is not None:
            hook.before_load(model, shapes, meta)
    _load_weights(model, state, weights, folder / META_FILE)
    for cls in classes.values():
        cls.after_load(model)
    model.eval()
    tokenizer = _load_tokenizer(folder)
    defaults = meta.get("defaults") if isinstance(meta.get("defaults"), dict) else None
    return attach_info(model, kind=meta.get("kind"), source=meta.get("source"), tokenizer=tokenizer,
                       steps=meta.get("steps", []), defaults=defaults)


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
    return attach_info(model, source=str(folder), tokenizer=_load_tokenizer(folder))


# -- sentence-transformers folders ------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None


def _module_dir(root: Path, relative: str, listed_in: str) -> Path:
    """``root / relative`` for a module path of ``modules.json``; ModelLoadError when it leaves ``root``."""
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ModelLoadError(f"{root / listed_in}: module path {relative!r} must be a folder inside {root}")
    return root / relative


def _load_st_folder(folder: Path) -> nn.Module:
    """A sentence-transformers folder: its Transformer module loaded (an HF folder, or the slimkit checkpoint a
    slimkit export points to) and the rest of the pipeline recorded as data (see the module docstring)."""
    modules = _read_json(folder / ST_MODULES_FILE)
    entries_ok = isinstance(modules, list) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("type"), str) for e in modules)
    if not (entries_ok and modules):
        raise ModelLoadError(f"{folder / ST_MODULES_FILE} is not a sentence-transformers module list "
                             "(a JSON list of {idx, name, path, type})")
    for entry in modules:
        _module_dir(folder, entry["path"], ST_MODULES_FILE)
    first = modules[0]
    if first["type"].rsplit(".", 1)[-1] != "Transformer":
        raise ModelLoadError(f"{folder / ST_MODULES_FILE}: slimkit loads sentence-transformers models whose first "
                             f"module is a Transformer; this one starts with {first['type']}")
    tf_dir = _module_dir(folder, first["path"], ST_MODULES_FILE)
    config = _read_json(tf_dir / "config.json") if (tf_dir / "config.json").exists() else {}
    if isinstance(config, dict) and config.get("model_type") == ST_ENCODER_TYPE:
        # A slimkit encoder re-saved by sentence-transformers: its config points at the slimkit checkpoint.
        checkpoint = (tf_dir / str(config.get("checkpoint", ""))).resolve()
        if folder.resolve() not in (checkpoint, *checkpoint.parents) or not (checkpoint / META_FILE).exists():
            raise ModelLoadError(f"{tf_dir / 'config.json'}: its checkpoint {config.get('checkpoint')!r} is not a "
                                 f"slimkit checkpoint inside {folder}")
        model = _load_checkpoint(checkpoint, None)
    elif (tf_dir / "config.json").exists():
        model = _load_hf_folder(tf_dir)
        attach_info(model, source=str(folder))
    else:
        raise ModelLoadError(f"{folder}: the Transformer module's folder {tf_dir} has no config.json")
    return attach_info(model, defaults={ST_INFO_KEY: _st_layout(folder, modules, tf_dir)})


def _st_layout(folder: Path, modules: list[dict], tf_dir: Path) -> dict[str, Any]:
    """What ``save`` needs to write the pipeline again: JSON only, no weights."""
    layout: dict[str, Any] = {"modules": [{k: v for k, v in e.items() if k in ("idx", "name", "path", "type", "kwargs")}
                                          for e in modules]}
    config_file = next((tf_dir / n for n in _ST_CONFIG_FILES if (tf_dir / n).is_file()), None)
    if config_file is not None:
        layout["sentence_bert_config"] = _read_json(config_file)
    if (folder / "config_sentence_transformers.json").is_file():
        layout["config_sentence_transformers"] = _read_json(folder / "config_sentence_transformers.json")
    files: dict[str, dict[str, Any]] = {}
    unsupported = []
    for entry in modules[1:]:
        where = _module_dir(folder, entry["path"], ST_MODULES_FILE)
        if entry["path"] in ("", ".") or where.resolve() == tf_dir.resolve():
            unsupported.append(f"{entry['type']} (stored in the Transformer's folder)")
            continue
        found = {}
        for item in sorted(where.iterdir()) if where.is_dir() else []:
            if item.is_file() and item.suffix == ".json" and item.stat().st_size <= ST_JSON_LIMIT:
                found[item.name] = _read_json(item)
            else:
                unsupported.append(f"{entry['type']} ({entry['path']}/{item.name})")
        files[entry["path"]] = found
    layout["files"] = files
    if unsupported:
        layout["unsupported"] = unsupported
    return layout
