"""Trainer checkpoints: the files, how they are written and read. No pickle anywhere.

A checkpoint is a folder (``checkpoint_dir/last``) replaced atomically (a temporary folder
renamed into place):

- ``model.safetensors``: ``module.state_dict()`` (tied tensors once, via
  ``core.sparse_storage``); a Distiller keeps its frozen teacher out of it;
- ``optimizer.safetensors``: every optimizer state tensor as ``state.<param index>.<name>``,
  and the torch RNG state as ``rng.cpu`` (and ``rng.cuda`` on a GPU) so dropout resumes exactly;
- ``trainer.json``: the step, the history, the settings, the optimizer's param groups and
  non-tensor state, the world size.

Every reader raises ``CheckpointError`` naming the file that is missing, corrupt or does not
match the module or optimizer.

``checkpoint_dir`` can be any path a recipe names, so it is slimkit's to write only when it is
new, empty, or a checkpoint folder already: ``last/`` (a trainer checkpoint, marked by its
``trainer.json``, holding those three files alone) and ``atomic_dir``'s own hidden temporaries.
Anything else is refused (``check_checkpoint_dir``) before training and again before each write,
so replacing ``last/`` never deletes a user's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.atomic import OutputKind, atomic_dir, check_output_dir
from slimkit.core.errors import SlimkitError, UnsupportedError

CHECKPOINT_NAME = "last"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer.json"
CHECKPOINT_FORMAT = "slimkit.trainer"
CHECKPOINT_VERSION = 1


class CheckpointError(SlimkitError):
    """A trainer checkpoint that cannot be read or does not match the module, optimizer or settings."""


def _is_trainer_state(content: object) -> bool:
    return isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT


CHECKPOINT_KIND = OutputKind("trainer checkpoint", STATE_FILE, (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE),
                             _is_trainer_state)
"""``checkpoint_dir/last``: replaced only when it holds these files alone."""

# atomic_dir's temporaries and lock beside ``last`` (``.last.tmp-PID.HOST-XXXX``, ``.last.old-...``, ``.last.lock``).
_OWN_SIBLINGS = (f".{CHECKPOINT_NAME}.tmp-", f".{CHECKPOINT_NAME}.old-", f".{CHECKPOINT_NAME}.lock")


def check_checkpoint_dir(folder: str | os.PathLike, option: str = "checkpoint_dir") -> None:
    """Raise ``CheckpointError`` unless ``folder`` is new, empty, or a slimkit checkpoint folder and nothing else.

    ``option`` names the setting in the message (``checkpoint_dir`` in a recipe, ``--checkpoints``
    on the command line).
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if not folder.is_dir():
        raise CheckpointError(f"{option} {folder}: it exists and is not a folder; name a new or empty folder")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise CheckpointError(f"{option} {folder}: cannot be read ({exc.strerror or exc})") from None
    for name in names:
        if name == CHECKPOINT_NAME:
            try:
                check_output_dir(folder / name, CHECKPOINT_KIND, hint=f"name a new or empty {option}")
            except SlimkitError as exc:
                raise CheckpointError(f"{option} {folder}: {exc}") from None
        elif not name.startswith(_OWN_SIBLINGS):
            raise CheckpointError(f"{option} {folder}: refusing to write checkpoints there: it holds {name!r}, which "
                                  f"is not slimkit's (a checkpoint folder holds {CHECKPOINT_NAME}/ alone); name a new "
                                  "or empty folder")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from slimkit.core.sparse_storage import load_state_dict

    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint folder")
    try:
        return load_state_dict(path)
    except Exception as exc:  # safetensors' own error types vary by version
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None


def load_checkpoint_weights(module: nn.Module, folder: str | os.PathLike) -> int:
    """Load ``model.safetensors`` of a trainer checkpoint folder into ``module`` (strict); returns its step.

    ``folder`` is ``checkpoint_dir/last`` (or ``checkpoint_dir``, which holds it). Raises
    CheckpointError naming the file when it is missing, corrupt or does not match the module.
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).exists() and (folder / CHECKPOINT_NAME / STATE_FILE).exists():
        folder = folder / CHECKPOINT_NAME
    state = read_state(folder / STATE_FILE)
    load_model(module, folder / MODEL_FILE)
    return int(state["step"])


def load_model(module: nn.Module, path: Path) -> None:
    tensors, aliases = read_safetensors(path)
    for alias, stored in aliases.items():  # tied weights are stored once
        if stored in tensors:
            tensors[alias] = tensors[stored]
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the module (missing {names_text(missing)}, unexpected "
                              f"{names_text(unexpected)}); resume with the same model, or start a fresh checkpoint_dir")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: does not match the module: {exc}") from None


def names_text(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint folder")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a slimkit trainer checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if not isinstance(state.get("version"), int) or state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r} is newer than this slimkit "
                              f"reads ({CHECKPOINT_VERSION})")
    for key, kind in (("step", int), ("history", list), ("settings", dict), ("optimizer", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return state


def _json_value(value: Any) -> Any:
    """A non-tensor optimizer value as JSON (tuples become lists; restored from the live optimizer's types)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    raise UnsupportedError(f"cannot checkpoint optimizer value {value!r} ({type(value).__name__})")


def write_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any],
                     device: torch.device) -> None:
    """Write ``module``'s weights, ``optimizer``'s state, the RNG state and ``info`` (step, history, ...) to ``folder``."""
    from safetensors.torch import save_file

    from slimkit.core.sparse_storage import save_state_dict

    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = _json_value(value)
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **info,
        "optimizer": {"param_groups": [{k: _json_value(v) for k, v in g.items()} for g in opt["param_groups"]],
                      "scalars": scalars},
    }
    check_checkpoint_dir(folder.parent)  # again before each write: the folder may have changed since training began
    with atomic_dir(folder, kind=CHECKPOINT_KIND, hint="name a new or empty checkpoint_dir") as tmp:
        save_state_dict(module.state_dict(), tmp / MODEL_FILE)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")


def load_optimizer_state(optimizer: torch.optim.Optimizer, folder: Path, meta: dict[str, Any], optimizer_name: str,
                         device: torch.device) -> None:
    """Load ``folder``'s optimizer state (``meta``: trainer.json's "optimizer") into ``optimizer``, and the RNG state.

    The live param groups (this run's lr, weight decay, ...) are kept.
    """
    path, state_path = folder / OPTIMIZER_FILE, folder / STATE_FILE
    tensors, _ = read_safetensors(path)
    current = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_groups = meta.get("param_groups")
    if not isinstance(saved_groups, list) or [len(g.get("params", [])) for g in saved_groups] != \
            [len(g["params"]) for g in current["param_groups"]]:
        raise CheckpointError(f"{state_path}: the optimizer state is for a different set of trainable "
                              f"parameters ({sum(len(g.get('params', [])) for g in saved_groups or [])} saved, "
                              f"{len(params)} now)")
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        kind, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if kind != "state" or not index.isdigit() or not name or int(index) >= len(params):
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        p = params[int(index)]
        if value.dim() > 0 and value.shape != p.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, its parameter "
                                  f"{tuple(p.shape)}")
        per_param.setdefault(int(index), {})[name] = value
    for index, entry in (meta.get("scalars") or {}).items():
        if not str(index).isdigit() or int(index) >= len(params) or not isinstance(entry, dict):
            raise CheckpointError(f"{state_path}: unexpected optimizer state for parameter {index!r}")
        per_param.setdefault(int(index), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot be loaded into the {optimizer_name} optimizer ({exc})") \
            from None
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
