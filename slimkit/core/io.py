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
transformers model classes, zoo builders or registered slimkit module types.
Saving writes to a temporary folder and renames it into place.

A folder to load is untrusted input ("reading files from an untrusted folder" below): no
code from it runs (``trust_remote_code=False`` everywhere, ``auto_map`` refused, only
``PreTrainedModel`` subclasses instantiated); JSON is read only from small regular files
inside it; ``slimkit.json`` is checked against a schema (``validate_meta``); the
architecture is first built on the meta device and compared with the safetensors header
(parameter count against stored bytes, keys, shapes, dtypes) before memory is allocated;
and non-finite weights are refused. Every problem is one ModelLoadError naming the file.

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

import copy
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.atomic import MODEL_FOLDER, atomic_dir
from slimkit.core.errors import ModelLoadError, SlimkitError
from slimkit.core.folder_checks import (  # noqa: F401  (re-exported: callers import them from core.io)
    AUTO_MAP_REFUSED,
    FORMAT_VERSION,
    INDEX_LIMIT,
    JSON_LIMIT,
    META_KEYS,
    ST_INFO_KEY,
    TOKENIZER_CONFIG_LIMIT,
    _file_kind,
    auto_config,
    build_transformers,
    check_capacity,
    check_finite,
    check_folder,
    check_inside,
    check_layer_counts,
    check_layout,
    dtypes_conflict,
    meta_copy,
    model_class,
    quiet_transformers,
    read_config,
    read_json_file,
    read_regular,
    validate_meta,
)
from slimkit.core.modules import SlimkitModule, module_type
from slimkit.core.plugins import checkpoint_hooks, model_sources, resolve_kind
from slimkit.core.targets import set_submodule
from slimkit.core.version import __version__

WEIGHTS_FILE = "model.safetensors"
META_FILE = "slimkit.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
# sentence-transformers folders (see the module docstring)
ST_MODULES_FILE = "modules.json"
ST_ENCODER_TYPE = "slimkit_encoder"  # transformers model_type registered by slimkit.export.sentence_transformers
ST_ENCODER_DIR = "SlimkitEncoder"  # the Transformer module's folder is "<idx>_SlimkitEncoder"
ST_JSON_LIMIT = 64 * 1024  # a module file recorded in slimkit.json must be small JSON (pooling config, ...)
_ST_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                    "sentence_camembert_config.json", "sentence_albert_config.json",
                    "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
_ST_DIMENSIONS = ("hidden_size", "d_model", "dim", "embed_dim", "max_position_embeddings", "n_positions", "vocab_size")


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
    with atomic_dir(out_dir, kind=MODEL_FOLDER) as tmp:  # never replaces a folder slimkit did not write
        if arch["kind"] == "transformers":
            quiet_transformers()
            model.config.save_pretrained(tmp)
        # Tied tensors are written once (their aliases recorded), sparse ones compactly.
        save_state_dict(checkpoint_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"},
                        code_layouts=code_layouts(model))
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


def code_layouts(model: nn.Module) -> dict:
    """``{state dict name: CodeLayout}`` of the integer code tensors whose layers say how to store them
    sparsely (``sparse_code_layouts()``: a pruned, then quantized layer)."""
    found = {}
    for name, module in model.named_modules():
        layouts = getattr(module, "sparse_code_layouts", None)
        if callable(layouts):
            found.update({f"{name}.{k}" if name else k: v for k, v in layouts().items()})
    return found


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
        # Float reductions (GPTQ's Hessian, SVD) depend on the thread count: the same seed and thread count
        # give byte-identical outputs, another thread count may differ in the last bits.
        "torch_threads": torch.get_num_threads(),
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
    Raises ModelLoadError naming the path or file for anything missing, corrupt, mismatched
    or unsafe (see "reading files from an untrusted folder" above).
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
    if not path.is_dir():
        raise ModelLoadError(f"model {text!r} is not a folder")
    if os.path.lexists(path / META_FILE):
        return _load_checkpoint(path, skeleton)
    if os.path.lexists(path / ST_MODULES_FILE):
        return _load_st_folder(path)
    if os.path.lexists(path / "config.json"):
        return _load_hf_folder(path)
    raise ModelLoadError(f"folder {text!r} holds neither {META_FILE} (a slimkit checkpoint), {ST_MODULES_FILE} "
                         "(a sentence-transformers model) nor config.json (a Hugging Face model)")


def check_safetensors(path: Path, root: Path | None = None) -> None:
    """Raise ModelLoadError unless ``path`` is a complete, readable safetensors file (a regular file inside ``root``)."""
    from safetensors import safe_open

    if not os.path.lexists(path):
        raise ModelLoadError(f"weights file {path} is missing")
    if root is not None:
        check_inside(path, root)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ModelLoadError(f"weights file {path} cannot be read ({exc})") from None
    if not stat.S_ISREG(mode):  # safetensors would block on a FIFO or map a device
        raise ModelLoadError(f"weights file {path} is {_file_kind(mode)}; slimkit reads only regular files")
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


def stored_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """``sparse_storage.stored_layout`` of a checked safetensors file, its problems as ModelLoadError naming it."""
    from slimkit.core.sparse_storage import stored_layout

    try:
        return stored_layout(path)
    except ValueError as exc:
        raise ModelLoadError(f"weights file {path} is corrupt ({exc}); re-save it") from None


def _read_meta(folder: Path) -> dict[str, Any]:
    file = folder / META_FILE
    return validate_meta(read_json_file(file, folder), file)


def _build_architecture(folder: Path, arch: dict[str, Any], skeleton: nn.Module | None, config: Any) -> nn.Module:
    """The bare architecture ``arch`` describes (on the current default device); ``config`` for a transformers one."""
    kind = arch["kind"]
    if kind == "transformers":
        cls = model_class(arch["class"], folder / META_FILE)
        return build_transformers(cls, config, folder / "config.json")
    if kind == "zoo":
        builders = [p.build_architecture for p in model_sources() if p.build_architecture is not None]
        if not builders:
            raise ModelLoadError(f"{folder / META_FILE}: no provider rebuilds architecture {arch['name']!r}")
        try:
            return builders[0](arch["name"], arch.get("config") or {})
        except SlimkitError:
            raise
        except Exception as exc:  # the builder's own checks raise ValueError; odd values anything else
            raise ModelLoadError(f"{folder / META_FILE}: bad architecture config ({type(exc).__name__}: {exc})") from None
    if skeleton is None:
        raise ModelLoadError(f"{folder} holds a custom nn.Module ({arch['class']}): pass an instance of it "
                             "as `skeleton` to slimkit.load")
    return skeleton


def _assemble(folder: Path, meta: dict[str, Any], model: nn.Module, shapes: dict[str, tuple[int, ...]]
              ) -> dict[str, type]:
    """Turn a bare architecture into the checkpoint's: hooks' ``prepare``, slimkit modules from their specs, hooks'
    ``before_load`` (resizing to the file's ``shapes``). Returns the slimkit module classes used, by name."""
    meta_file = folder / META_FILE
    for hook in checkpoint_hooks():  # e.g. a masked skeleton is stripped: the file holds baked weights
        if hook.prepare is not None:
            hook.prepare(model)
    classes: dict[str, type] = {}
    for name, entry in meta.get("modules", {}).items():
        try:
            cls = module_type(entry["type"])
        except KeyError:
            raise ModelLoadError(f"{meta_file}: unknown module type {entry['type']!r} for {name!r}") from None
        where = name.rpartition(".")[0] if cls.attached else name  # an attached module needs its parent
        try:
            parent = model.get_submodule(where)
        except AttributeError:
            raise ModelLoadError(f"{meta_file}: module {where!r} does not exist in the rebuilt architecture") from None
        child = name.rpartition(".")[2]
        if cls.attached and hasattr(parent, child) and not isinstance(getattr(parent, child), nn.Module):
            raise ModelLoadError(f"{meta_file}: {name!r} would replace {type(parent).__name__}.{child}, which is not "
                                 "a module")
        try:
            module = cls.from_slimkit_spec(entry["spec"])
        except SlimkitError:
            raise
        except Exception as exc:  # a spec with missing keys or values of the wrong type
            raise ModelLoadError(f"{meta_file}: the spec of {name!r} cannot rebuild a {entry['type']} "
                                 f"({type(exc).__name__}: {exc})") from None
        set_submodule(model, name, module)
        classes[cls.__name__] = cls
    for hook in checkpoint_hooks():  # e.g. structurally pruned layers take the file's shapes
        if hook.before_load is not None:
            try:
                hook.before_load(model, shapes, meta)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{folder}: {exc}") from None
            except SlimkitError:
                raise
            except Exception as exc:  # shapes from the header a layer type cannot take
                raise ModelLoadError(f"{folder}: the rebuilt model cannot take the shapes in {WEIGHTS_FILE} "
                                     f"({type(exc).__name__}: {exc})") from None
    return classes


def _load_checkpoint(folder: Path, skeleton: nn.Module | None) -> nn.Module:
    """A slimkit checkpoint: validated description, the architecture checked on the meta device, then built and loaded."""
    meta_file, weights = folder / META_FILE, folder / WEIGHTS_FILE
    check_folder(folder)
    meta = _read_meta(folder)
    check_safetensors(weights, folder)
    stored, aliases, data_bytes = stored_tensors(weights)
    shapes = {k: v.shape for k, v in stored.items()}
    shapes.update({a: shapes[s] for a, s in aliases.items() if s in shapes and a not in shapes})
    arch = meta["architecture"]
    config = None
    if arch["kind"] == "transformers":
        check_layer_counts(read_config(folder), len(stored), folder / "config.json", str(weights))
        config = auto_config(folder)
    # First on the meta device: what the description builds is compared with the file's header
    # (size, keys, shapes, dtypes) before any memory is allocated for it.
    # A user's skeleton is copied onto the meta device; one that cannot be copied is checked after assembly.
    user = arch["kind"] == "module" and skeleton is not None
    shell = meta_copy(skeleton) if user else None
    if not user or shell is not None:
        with torch.device("meta"):
            shell = _build_architecture(folder, arch, shell, copy.deepcopy(config))
            if arch["kind"] != "module":  # a user's skeleton is already built; a config is untrusted
                describes = folder / ("config.json" if arch["kind"] == "transformers" else META_FILE)
                check_capacity(shell, data_bytes, str(describes), str(weights), float_bits=1)
            _assemble(folder, meta, shell, shapes)
        check_layout(shell, stored, aliases, weights, meta_file)
        del shell
    model = _build_architecture(folder, arch, skeleton, config)
    classes = _assemble(folder, meta, model, shapes)
    check_layout(model, stored, aliases, weights, meta_file)
    state = _read_weights(weights)
    _load_weights(model, state, weights, meta_file)
    for cls in classes.values():
        try:
            cls.after_load(model)
        except SlimkitError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{folder}: {cls.__name__} cannot be set up after loading "
                                 f"({type(exc).__name__}: {exc})") from None
    model.eval()
    tokenizer = _load_tokenizer(folder)
    return attach_info(model, kind=meta.get("kind"), source=meta.get("source"), tokenizer=tokenizer,
                       steps=meta.get("steps", []), defaults=meta.get("defaults") or None)


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``weights`` (compact tensors expanded, recorded aliases restored), all finite."""
    from slimkit.core.sparse_storage import load_state_dict

    try:
        state, aliases = load_state_dict(weights)
    except ValueError as exc:
        raise ModelLoadError(f"weights file {weights} is corrupt ({exc}); re-save it") from None
    check_finite(state.items(), weights)
    for alias, stored in aliases.items():
        if stored in state and alias not in state:
            state[alias] = state[stored]
    return state


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, meta_file: Path) -> None:
    """Load ``state`` (read from ``weights``) into ``model`` strictly; ModelLoadError naming what differs.

    A key the file lacks is accepted only when it is an alias recorded in the file, or when
    the rebuilt model ties it to a key the file holds (e.g. a checkpoint of an HF model
    that omits its tied ``lm_head.weight``). A float tensor that overflows the model's
    (narrower) float dtype is refused like a non-finite one.
    """
    check_layout(model, state, {}, weights, meta_file)
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and v.dtype != expected[k].dtype and v.is_floating_point():
            check_finite([(k, v.to(expected[k].dtype))], weights)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _load_tokenizer(folder: Path) -> Any:
    if not any(os.path.lexists(folder / f) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    if os.path.lexists(folder / "tokenizer_config.json"):
        tok_config = read_json_file(folder / "tokenizer_config.json", folder, TOKENIZER_CONFIG_LIMIT)
        if isinstance(tok_config, dict) and "auto_map" in tok_config:
            raise ModelLoadError(f"{folder / 'tokenizer_config.json'} has 'auto_map', which points at Python code "
                                 f"in the model folder; {AUTO_MAP_REFUSED}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"tokenizer files in {folder} cannot be read ({exc})") from None


def _load_hf_folder(folder: Path) -> nn.Module:
    """A Hugging Face folder (config.json + safetensors): class and size checked on the meta device first."""
    import transformers

    quiet_transformers()
    check_folder(folder)
    config_file = folder / "config.json"
    raw = read_config(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder} has no .safetensors weights; slimkit reads only safetensors (never pickles)")
    stored: dict[str, Any] = {}
    data_bytes = 0
    for shard in shards:
        check_safetensors(shard, folder)
        tensors, _aliases, nbytes = stored_tensors(shard)
        stored.update(tensors)
        data_bytes += nbytes
    where = str(shards[0]) if len(shards) == 1 else f"the {len(shards)} .safetensors files in {folder}"
    check_layer_counts(raw, len(stored), config_file, where)
    config = auto_config(folder)
    archs = raw.get("architectures") or []
    with torch.device("meta"):
        if archs:
            shell = build_transformers(model_class(archs[0], config_file), copy.deepcopy(config), config_file)
        else:
            try:
                shell = transformers.AutoModel.from_config(copy.deepcopy(config), trust_remote_code=False)
            except Exception as exc:
                raise ModelLoadError(f"{config_file}: transformers has no model for this config "
                                     f"({type(exc).__name__}: {str(exc)[:300]})") from None
    cls = type(shell)
    # A plain folder stores each element at (at least) the smallest width its files use; half the model
    # may be missing from them before transformers initialises the rest itself (a new head is tiny).
    smallest = min((t.dtype.itemsize for t in stored.values()), default=4)
    check_capacity(shell, data_bytes, str(config_file), where, float_bits=8 * smallest, slack=2.0)
    expected = shell.state_dict()
    retyped = [f"{k!r} is {t.dtype} in the file but {expected[k].dtype} in the model"
               for k, t in stored.items() if k in expected and dtypes_conflict(t.dtype, expected[k].dtype)]
    if retyped:
        raise ModelLoadError(f"{where} does not match {cls.__name__}: dtype mismatch (integer codes and float "
                             f"weights never convert): {', '.join(retyped[:5])}")
    del shell, expected
    try:
        model = cls.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                    dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the Hugging Face model in {folder} ({str(exc).splitlines()[0][:300]})") from None
    check_finite(((k, t) for k, t in model.state_dict().items() if k in stored or k.split(".", 1)[-1] in stored),
                 folder)
    model.eval()
    return attach_info(model, source=str(folder), tokenizer=_load_tokenizer(folder))


# -- sentence-transformers folders ------------------------------------------------------
def _module_dir(root: Path, relative: str, listed_in: str) -> Path:
    """``root / relative`` for a module path of ``modules.json``; ModelLoadError when it leaves ``root``."""
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ModelLoadError(f"{root / listed_in}: module path {relative!r} must be a folder inside {root}")
    return root / relative


def _load_st_folder(folder: Path) -> nn.Module:
    """A sentence-transformers folder: its Transformer module loaded (an HF folder, or the slimkit checkpoint a
    slimkit export points to) and the rest of the pipeline recorded as data (see the module docstring)."""
    check_folder(folder)
    modules = read_json_file(folder / ST_MODULES_FILE, folder)
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
    config = read_json_file(tf_dir / "config.json", folder) if os.path.lexists(tf_dir / "config.json") else {}
    if isinstance(config, dict) and config.get("model_type") == ST_ENCODER_TYPE:
        # A slimkit encoder re-saved by sentence-transformers: its config points at the slimkit checkpoint.
        checkpoint = (tf_dir / str(config.get("checkpoint", ""))).resolve()
        if folder.resolve() not in (checkpoint, *checkpoint.parents) or not (checkpoint / META_FILE).exists():
            raise ModelLoadError(f"{tf_dir / 'config.json'}: its checkpoint {config.get('checkpoint')!r} is not a "
                                 f"slimkit checkpoint inside {folder}")
        model = _load_checkpoint(checkpoint, None)
    elif os.path.lexists(tf_dir / "config.json"):
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
        layout["sentence_bert_config"] = read_json_file(config_file, folder)
    if (folder / "config_sentence_transformers.json").is_file():
        layout["config_sentence_transformers"] = read_json_file(folder / "config_sentence_transformers.json", folder)
    files: dict[str, dict[str, Any]] = {}
    unsupported = []
    for entry in modules[1:]:
        where = _module_dir(folder, entry["path"], ST_MODULES_FILE)
        if entry["path"] in ("", ".") or where.resolve() == tf_dir.resolve():
            unsupported.append(f"{entry['type']} (stored in the Transformer's folder)")
            continue
        found = {}
        for item in sorted(where.iterdir()) if where.is_dir() else []:
            # Only small regular JSON files are recorded (never through a link): they are written again on save.
            if (not item.is_symlink() and item.is_file() and item.suffix == ".json"
                    and item.stat().st_size <= ST_JSON_LIMIT):
                found[item.name] = read_json_file(item, folder, ST_JSON_LIMIT)
            else:
                unsupported.append(f"{entry['type']} ({entry['path']}/{item.name})")
        files[entry["path"]] = found
    layout["files"] = files
    if unsupported:
        layout["unsupported"] = unsupported
    return layout
