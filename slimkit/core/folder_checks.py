"""Reading a model folder nobody vouched for: the checks ``core.io`` runs before it builds anything.

- files: every entry a regular file or folder inside the model folder, JSON read size-capped;
- ``slimkit.json``: an explicit schema (``validate_meta``), unknown keys refused;
- ``config.json``: an object, no ``auto_map`` (slimkit never runs code from a model folder),
  only ``PreTrainedModel`` classes, ``trust_remote_code=False`` on every transformers call;
- weights: the architecture built on the meta device and compared with the stored bytes,
  every tensor's dtype checked against the safetensors header before allocation, every float
  checked for NaN/inf after reading.

Each failure is one ``ModelLoadError`` naming the file and what is wrong.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ModelLoadError, closest

FORMAT_VERSION = 1
ST_INFO_KEY = "sentence_transformers"  # the key under a model's recorded defaults


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars and info logs; slimkit shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# -- load: reading files from an untrusted folder --------------------------------------
# A model folder is untrusted input. Nothing in it runs (no pickles, no `auto_map` code, no class
# outside transformers' models), JSON is read only from small regular files inside the folder,
# and the architecture it describes is built on the meta device and checked against the
# safetensors header (size, keys, shapes, dtypes) before anything is allocated.
JSON_LIMIT = 1 << 20  # slimkit.json, config.json, modules.json: descriptions, never data
TOKENIZER_CONFIG_LIMIT = 16 << 20  # tokenizer_config.json may carry many added tokens and chat templates
INDEX_LIMIT = 64 << 20  # model.safetensors.index.json: one line per tensor
AUTO_MAP_REFUSED = "slimkit never runs code from a model folder"
# Config fields that count repeated layers: each layer holds at least one stored tensor.
_LAYER_COUNT_FIELDS = frozenset({"num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                                 "decoder_layers", "num_encoder_layers", "num_decoder_layers"})


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_inside(path: Path, root: Path) -> None:
    """ModelLoadError unless ``path``, followed through every symbolic link on the way, stays inside ``root``."""
    target, home = path.resolve(), root.resolve()
    if target != home and home not in target.parents:
        how = "is a symbolic link to" if path.is_symlink() else "leads (through a linked folder) to"
        raise ModelLoadError(f"{path} {how} {target}, outside {root}; slimkit reads only files inside the "
                             "model folder")


def check_folder(folder: Path) -> None:
    """Refuse a model folder holding an entry that is a symbolic link out of it or neither a file nor a folder.

    Transformers and tokenizers open files of the folder by name (tokenizer files, shards), so
    every top-level entry is checked, not only the ones slimkit reads itself.
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise ModelLoadError(f"folder {folder} cannot be listed ({exc})") from None
    for entry in entries:
        check_inside(entry, folder)
        try:
            mode = entry.stat().st_mode
        except OSError as exc:  # a dangling link, a file removed meanwhile
            raise ModelLoadError(f"{entry} cannot be read ({exc})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelLoadError(f"{entry} is {_file_kind(mode)}; a model folder holds only regular files and folders")


def read_regular(path: Path, root: Path, limit: int) -> bytes:
    """The bytes of ``path``: a regular file inside ``root`` of at most ``limit`` bytes; ModelLoadError otherwise.

    The file is opened without blocking and checked on the open descriptor, so a FIFO or a
    device (``/dev/zero``) is refused rather than read, and at most ``limit + 1`` bytes are read.
    """
    if not os.path.lexists(path):
        raise ModelLoadError(f"{path} is missing")
    check_inside(path, root)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be opened ({exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{path} is {_file_kind(info.st_mode)}; slimkit reads only regular files")
        raise ModelLoadError(f"{path} is {info.st_size:,} bytes, more than the {limit:,} bytes slimkit reads there")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew after the check
        raise ModelLoadError(f"{path} is more than the {limit:,} bytes slimkit reads there")
    return data


def read_json_file(path: Path, root: Path, limit: int = JSON_LIMIT) -> Any:
    """The JSON value in ``path`` (read with ``read_regular``); ModelLoadError naming the file when it is not JSON."""
    data = read_regular(path, root, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise ModelLoadError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


# -- slimkit.json schema --------------------------------------------------------------------
META_KEYS = ("format", "format_version", "slimkit_version", "architecture", "kind", "source", "steps", "modules",
             "defaults", "structure", "torch_threads")
_ARCH_KEYS = {"transformers": ("kind", "class"), "zoo": ("kind", "name", "config"), "module": ("kind", "class")}
_ST_KEYS = ("modules", "sentence_bert_config", "config_sentence_transformers", "files", "unsupported")
_ST_MODULE_KEYS = ("idx", "name", "path", "type", "kwargs")
_MODULE_NAME = re.compile(r"(?!__)[^.\s]+(\.(?!__)[^.\s]+)*")  # dotted, no blanks, no dunder parts


def _shown(value: Any) -> str:
    """A JSON value named for a message: its JSON type and a short excerpt."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "an array"),
             (dict, "an object"))
    kind = "null" if value is None else next(name for t, name in kinds if isinstance(value, t))
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return kind if value is None else f"{kind} ({text[:60]}{'...' if len(text) > 60 else ''})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_meta(meta: Any, file: Path) -> dict[str, Any]:
    """Check a parsed ``slimkit.json`` against the checkpoint schema; returns it, or raises ModelLoadError.

    Every known key's type is checked (and, for nested records, theirs); an unknown top-level
    key is refused with the closest known name. ``structure``'s content is the pruning
    loader's to check (``pruning.checkpoint_hooks``); here it must be an object of objects.
    """

    def bad(where: str, expected: str, value: Any) -> ModelLoadError:
        return ModelLoadError(f"{file}: {where} must be {expected}, got {_shown(value)}")

    if not isinstance(meta, dict):
        raise ModelLoadError(f"{file} is not a slimkit checkpoint description: it must hold a JSON object, "
                             f"got {_shown(meta)}")
    for key in meta:
        if key not in META_KEYS:
            raise ModelLoadError(f"{file}: unknown key {key!r}{closest(key, META_KEYS)}; slimkit.json keys are "
                                 f"{', '.join(META_KEYS)}")
    if meta.get("format") != "slimkit":
        raise ModelLoadError(f"{file} is not a slimkit checkpoint description ('format' must be \"slimkit\", "
                             f"got {_shown(meta.get('format'))})")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise bad("'format_version'", "a positive integer", version)
    if version > FORMAT_VERSION:
        raise ModelLoadError(f"{file}: the checkpoint was written by a newer slimkit (format {version}); upgrade slimkit")
    for key in ("slimkit_version", "kind", "source"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(repr(key), "a string", meta[key])
    threads = meta.get("torch_threads")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise bad("'torch_threads'", "a positive integer", threads)
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise bad("'architecture'", 'an object such as {"kind": "transformers", "class": "LlamaForCausalLM"}', arch)
    kind = arch.get("kind")
    if not isinstance(kind, str) or kind not in _ARCH_KEYS:
        raise bad("'architecture.kind'", f"one of {', '.join(map(repr, _ARCH_KEYS))}", kind)
    for key in arch:
        if key not in _ARCH_KEYS[kind]:
            raise ModelLoadError(f"{file}: unknown key {key!r} in 'architecture'{closest(key, _ARCH_KEYS[kind])}; "
                                 f"a {kind!r} architecture has {', '.join(_ARCH_KEYS[kind])}")
    if kind == "transformers" and not (isinstance(arch.get("class"), str) and arch["class"].isidentifier()):
        raise bad("'architecture.class'", "a transformers class name", arch.get("class"))
    if kind == "module" and not isinstance(arch.get("class"), str):
        raise bad("'architecture.class'", "a string (the module's class)", arch.get("class"))
    if kind == "zoo":
        if not isinstance(arch.get("name"), str):
            raise bad("'architecture.name'", "a string (a zoo architecture)", arch.get("name"))
        if not isinstance(arch.get("config", {}), dict):
            raise bad("'architecture.config'", "an object", arch.get("config"))
    steps = meta.get("steps", [])
    if not isinstance(steps, list):
        raise bad("'steps'", "an array of step records", steps)
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("type"), str):
            raise bad(f"'steps[{i}]'", 'an object with a string "type"', step)
    modules = meta.get("modules", {})
    if not isinstance(modules, dict):
        raise bad("'modules'", 'an object mapping module names to {"type", "spec"}', modules)
    for name, entry in modules.items():
        if not _MODULE_NAME.fullmatch(name):
            raise ModelLoadError(f"{file}: 'modules' key {name!r} is not a module path (dotted names without "
                                 "blanks or dunder parts)")
        if not isinstance(entry, dict):
            raise bad(f"'modules[{name!r}]'", 'an object {"type", "spec"}', entry)
        for key in entry:
            if key not in ("type", "spec"):
                raise ModelLoadError(f"{file}: unknown key {key!r} in 'modules[{name!r}]'"
                                     f"{closest(key, ('type', 'spec'))}; a module entry has type and spec")
        if not isinstance(entry.get("type"), str):
            raise bad(f"'modules[{name!r}].type'", "a slimkit module type name", entry.get("type"))
        if not isinstance(entry.get("spec"), dict):
            raise bad(f"'modules[{name!r}].spec'", "an object (the module's constructor arguments)", entry.get("spec"))
    if "defaults" in meta:
        _validate_defaults(meta["defaults"], bad)
    structure = meta.get("structure")
    if structure is not None and not (isinstance(structure, dict) and all(isinstance(v, dict)
                                                                          for v in structure.values())):
        raise bad("'structure'", "an object mapping module names to {attribute: size}", structure)
    return meta


def _validate_defaults(defaults: Any, bad: Any) -> None:
    """The task defaults' known keys (``attach_info``, the tasks, the sentence-transformers layout); others are data."""
    if not isinstance(defaults, dict):
        raise bad("'defaults'", "an object", defaults)
    for key in ("corpus", "student", "student_name"):
        if defaults.get(key) is not None and not isinstance(defaults[key], str):
            raise bad(f"'defaults.{key}'", "a string", defaults[key])
    shape = defaults.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and all(_is_int(d) and d > 0 for d in shape)):
        raise bad("'defaults.input_shape'", "an array of positive integers", shape)
    for key in ("image_mean", "image_std"):
        value = defaults.get(key)
        if value is not None and not (isinstance(value, list) and all(
                _is_int(v) or (isinstance(v, float) and math.isfinite(v)) for v in value)):
            raise bad(f"'defaults.{key}'", "an array of finite numbers", value)
    st = defaults.get(ST_INFO_KEY)
    if st is None:
        return
    where = f"'defaults.{ST_INFO_KEY}'"
    if not isinstance(st, dict):
        raise bad(where, "an object (the sentence-transformers pipeline)", st)
    for key in st:
        if key not in _ST_KEYS:
            raise bad(f"{where} key {key!r}", f"one of {', '.join(_ST_KEYS)}", key)
    entries = st.get("modules")
    if not (isinstance(entries, list) and entries):
        raise bad(f"{where}.modules", "a non-empty array of module entries", entries)
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and all(k in _ST_MODULE_KEYS for k in entry) and isinstance(
            entry.get("path"), str) and isinstance(entry.get("type"), str) and (
            entry.get("idx") is None or _is_int(entry["idx"])) and isinstance(entry.get("name", ""), str) and (
            isinstance(entry.get("kwargs", {}), dict))
        if not ok or Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            raise bad(f"{where}.modules[{i}]", 'an object {"idx", "name", "path" (inside the folder), "type"}', entry)
    for key in ("sentence_bert_config", "config_sentence_transformers"):
        if st.get(key) is not None and not isinstance(st[key], dict):
            raise bad(f"{where}.{key}", "an object", st[key])
    files = st.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise bad(f"{where}.files", "an object mapping module paths to {file name: JSON}", files)
    for path, content in files.items():
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise bad(f"{where}.files key", "a module path inside the folder", path)
        for name in content:
            if not name.endswith(".json") or name == ".json" or name != Path(name).name or "\\" in name:
                raise bad(f"{where}.files[{path!r}] key", "a plain .json file name", name)
    unsupported = st.get("unsupported", [])
    if not (isinstance(unsupported, list) and all(isinstance(u, str) for u in unsupported)):
        raise bad(f"{where}.unsupported", "an array of strings", unsupported)


# -- config.json and transformers classes -------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of ``folder`` once it is known to run no code; ModelLoadError otherwise.

    Refused: not a JSON object, ``architectures`` other than a list of strings, and any
    ``auto_map`` (a pointer to Python files in the folder, which transformers would import).
    """
    file = folder / "config.json"
    config = read_json_file(file, folder)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} must hold a JSON object (a transformers config), got {_shown(config)}")
    if "auto_map" in config:
        raise ModelLoadError(f"{file} has 'auto_map', which points at Python code in the model folder; "
                             f"{AUTO_MAP_REFUSED}: use a model whose class ships with transformers")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) and a.isidentifier()
                                                                  for a in archs)):
        raise ModelLoadError(f"{file}: 'architectures' must be a list of transformers class names, "
                             f"got {_shown(archs)}")
    return config


def auto_config(folder: Path) -> Any:
    """The transformers config object of ``folder`` (``read_config`` first); never runs code from the folder."""
    import transformers

    read_config(folder)
    quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError, OSError for bad configs
        raise ModelLoadError(f"{folder / 'config.json'} cannot be read as a transformers config "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None


def model_class(name: str, file: Path) -> type:
    """The transformers model class called ``name`` (named in ``file``): a ``PreTrainedModel`` subclass only.

    Any other attribute of transformers (``TrainingArguments``, a pipeline, a function) is
    refused before it is called, so a crafted class name cannot run its constructor.
    """
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if cls is None:
        raise ModelLoadError(f"{file}: transformers has no model class {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{file}: {name!r} is not a transformers model class (a PreTrainedModel); "
                             "slimkit builds only model classes")
    return cls


def build_transformers(cls: type, config: Any, file: Path) -> nn.Module:
    """``cls(config)`` (on the current default device), with any failure a ModelLoadError naming ``file``."""
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise ModelLoadError(f"{file}: {cls.__name__} needs a {config_class.__name__}, but config.json holds a "
                             f"{type(config).__name__}")
    try:
        return cls(config)
    except Exception as exc:  # a config whose values the class cannot build (negative sizes, wrong types)
        raise ModelLoadError(f"{file}: cannot build {cls.__name__} from config.json "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None


def check_layer_counts(config: dict[str, Any], n_tensors: int, config_file: Path, weights: str) -> None:
    """Refuse a config whose layer count exceeds the stored tensors (checked before even a meta build)."""
    pending = [config]
    while pending:
        node = pending.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                pending.append(value)
            elif key in _LAYER_COUNT_FIELDS and _is_int(value) and value > n_tensors:
                raise ModelLoadError(f"{config_file}: {key} = {value:,}, but only {n_tensors:,} tensors are stored "
                                     f"in {weights}; the config does not belong to these weights")


def check_capacity(model: nn.Module, data_bytes: int, describes: str, weights: str, *,
                   float_bits: float, slack: float = 1.0) -> None:
    """Refuse a (meta) ``model`` whose persistent tensors cannot come from ``data_bytes`` of stored tensor data.

    Each float element needs at least ``float_bits`` bits in the file (1 for a slimkit checkpoint:
    a sparse bitmask or packed codes; the file's smallest float dtype for a plain Hugging Face
    folder), each integer or bool element its full size (codes are stored as they are).
    Tied tensors count once; ``slack`` allows for parameters transformers initialises itself.
    """
    seen: set[int] = set()
    params, bits = 0, 0.0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        params += t.numel()
        bits += t.numel() * (float_bits if (t.is_floating_point() or t.is_complex()) else t.element_size() * 8)
    need = math.ceil(bits / 8)
    if need > slack * data_bytes:
        raise ModelLoadError(f"{describes} describes a model of {params:,} parameters, which need at least {need:,} "
                             f"bytes of stored weights, but the tensor data in {weights} is only {data_bytes:,} bytes; "
                             "the config does not belong to these weights (refused before building the model)")


def dtypes_conflict(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Whether a stored dtype cannot be loaded into a tensor of ``expected`` dtype without changing its meaning.

    Floats load into floats (cast); integer and bool tensors (quantized codes, indices) only
    into exactly their dtype: int32 codes cast to int8 wrap around silently.
    """
    if stored.is_floating_point and expected.is_floating_point:
        return False
    return stored != expected


def check_layout(model: nn.Module, stored: dict[str, Any], aliases: dict[str, str], weights: Path,
                 meta_file: Path) -> None:
    """Compare ``model``'s state dict with a file's tensors (name -> object with ``dtype``, ``shape``).

    Works on a meta model, so it runs before anything is allocated. A key the file lacks is
    accepted only when it is a recorded alias, or tied in the model (the same tensor, or the
    same memory) to a key the file holds. Raises one ModelLoadError naming missing and
    unexpected keys, shape mismatches and dtype mismatches.
    """
    expected = model.state_dict(keep_vars=True)
    same: dict[int, set[str]] = {}
    for name, t in expected.items():
        same.setdefault(id(t), set()).add(name)
    tied = {n: group - {n} for group in same.values() if len(group) > 1 for n in group}
    for name, others in _tied_names({k: t.detach() for k, t in expected.items()}).items():
        tied[name] = tied.get(name, set()) | others
    stored = dict(stored)
    for alias, target in aliases.items():
        if target in stored and alias not in stored:
            stored[alias] = stored[target]
    missing = [k for k in expected if k not in stored and not (tied.get(k, set()) & stored.keys())]
    unexpected = [k for k in stored if k not in expected]
    common = [k for k in stored if k in expected]
    mismatched = [f"{k!r} is {tuple(stored[k].shape)} in the file but {tuple(expected[k].shape)} in the model"
                  for k in common if tuple(stored[k].shape) != tuple(expected[k].shape)]
    retyped = [f"{k!r} is {stored[k].dtype} in the file but {expected[k].dtype} in the model"
               for k in common if dtypes_conflict(stored[k].dtype, expected[k].dtype)]
    problems = []
    for label, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch", mismatched),
                         ("dtype mismatch (integer codes and float weights never convert)", retyped)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(map(str, items[:5]))}{more}")
    if problems:
        raise ModelLoadError(f"{weights} does not match the architecture in {meta_file}: {'; '.join(problems)}")


def check_finite(tensors: Any, where: Path) -> None:
    """Refuse NaN or inf in any float tensor of ``tensors`` ((name, tensor) pairs), naming the first such tensor."""
    for name, t in tensors:
        if (t.is_floating_point() or t.is_complex()) and t.numel() and t.device.type != "meta":
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ModelLoadError(f"{where}: tensor {name!r} holds {bad:,} NaN/inf value(s) of {t.numel():,}; "
                                     "slimkit refuses non-finite weights (a corrupt or tampered file)")


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory), or None if it cannot be copied."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            shell = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(shell, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else shell
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # a module that cannot be deep-copied: its checks then run on the model itself
        return None


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """For each name in ``state`` that shares its memory (same storage and view) with others: those other names."""
    groups: dict[tuple, set[str]] = {}
    for name, t in state.items():
        if t.numel() and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            groups.setdefault(key, set()).add(name)
    return {n: group - {n} for group in groups.values() if len(group) > 1 for n in group}
