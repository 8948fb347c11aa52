"""The recipe format: ordered stages of steps, as data.

```yaml
version: 1
model: stdlib-coder                       # optional: zoo name or folder
calibration: {source: stdlib, n: 64, seq_len: 256}   # optional: a built-in corpus, or a file/folder/dataset
data: {source: my-eval.txt}               # optional: evaluation data for the report (default: the model's corpus)
allow_partial: false                      # optional: accept a step that covers < 10% of the weights it targets
stages:
  - name: quantize
    steps:
      - {type: RTN, bits: 8, ignore: [lm_head]}
evaluate: [size, perplexity, latency]     # optional
```

Every key is checked: an unknown one, at any level, is an error naming the closest
valid key. Steps are exactly the configs' fields (``Config.from_dict``). YAML is read
with ``yaml.safe_load`` only. ``Recipe.from_yaml(p).to_yaml()`` round-trips.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError, RecipeError, closest
from slimkit.tasks.sources import DataSpec

RECIPE_VERSION = 1
METRICS = ("size", "params", "sparsity", "flops", "latency", "perplexity", "accuracy", "fidelity")
_TOP_KEYS = ("version", "model", "calibration", "data", "allow_partial", "stages", "evaluate")
_STAGE_KEYS = ("name", "steps")
# Names of the first recipe format, still read: calibration.corpus -> source, calibration.samples -> n.
_LEGACY_DATA_KEYS = {"corpus": "source", "samples": "n"}


def _check_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r}{closest(str(key), allowed)}; valid keys: {', '.join(allowed)}")


def data_spec_from(data: Any, where: str) -> DataSpec:
    """A recipe's ``calibration`` / ``data`` section (a mapping of DataSpec fields, or a source string) as a DataSpec."""
    if isinstance(data, dict):
        known = tuple(f.name for f in dataclasses.fields(DataSpec)) + tuple(_LEGACY_DATA_KEYS)
        _check_keys(data, known, where)
        for old, new in _LEGACY_DATA_KEYS.items():
            if old in data:
                if new in data:
                    raise RecipeError(f"{where}: give {new!r} or its old name {old!r}, not both")
                data = {**{k: v for k, v in data.items() if k != old}, new: data[old]}
    elif not isinstance(data, str):
        raise RecipeError(f"{where} must be a mapping (source, field, n, seq_len, ...) or a source string, "
                          f"got {type(data).__name__}")
    try:
        return DataSpec.parse(data)
    except ConfigError as exc:
        raise RecipeError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Stage:
    """A named, ordered list of steps (configs)."""

    name: str
    steps: tuple[Config, ...]


@dataclass(frozen=True)
class Recipe:
    """A whole compression recipe: optional model and calibration, ordered stages, metrics to evaluate."""

    stages: tuple[Stage, ...]
    model: str | None = None
    calibration: DataSpec | None = None
    evaluate: tuple[str, ...] = ()
    data: DataSpec | None = None
    allow_partial: bool = False
    version: int = RECIPE_VERSION
    source: str | None = field(default=None, compare=False)  # where it was read from, for messages

    @property
    def steps(self) -> list[Config]:
        """Every step of every stage, in order."""
        return [s for stage in self.stages for s in stage.steps]

    # -- parsing ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Recipe:
        """Validate and build a recipe from plain data (as loaded from YAML)."""
        where = source or "recipe"
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe must be a mapping with 'stages', got {type(data).__name__}")
        _check_keys(data, _TOP_KEYS, where)
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"{where}: version {version!r} is not supported (this slimkit reads version {RECIPE_VERSION})")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise RecipeError(f"{where}: model must be a zoo name or a folder path, got {model!r}")
        calibration = (data_spec_from(data["calibration"], f"{where}: calibration")
                       if data.get("calibration") is not None else None)
        eval_data = data_spec_from(data["data"], f"{where}: data") if data.get("data") is not None else None
        allow_partial = data.get("allow_partial", False)
        if not isinstance(allow_partial, bool):
            raise RecipeError(f"{where}: allow_partial must be true or false, got {allow_partial!r}")
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise RecipeError(f"{where}: 'stages' must be a non-empty list of {{name, steps}}")
        stages = []
        for i, raw in enumerate(raw_stages):
            if not isinstance(raw, dict):
                raise RecipeError(f"{where}: stage {i} must be a mapping with 'name' and 'steps'")
            _check_keys(raw, _STAGE_KEYS, f"{where}: stage {i}")
            name = raw.get("name", f"stage{i}")
            raw_steps = raw.get("steps")
            if not isinstance(raw_steps, list) or not raw_steps:
                raise RecipeError(f"{where}: stage {name!r} needs a non-empty 'steps' list")
            steps = []
            for j, step in enumerate(raw_steps):
                try:
                    steps.append(Config.from_dict(step))
                except ConfigError as exc:
                    raise RecipeError(f"{where}: stage {name!r} step {j}: {exc}") from None
            stages.append(Stage(str(name), tuple(steps)))
        metrics = data.get("evaluate") or []
        if not isinstance(metrics, list):
            raise RecipeError(f"{where}: evaluate must be a list of metrics ({', '.join(METRICS)})")
        for m in metrics:
            if m not in METRICS:
                raise RecipeError(f"{where}: unknown metric {m!r}{closest(str(m), METRICS)}; known: {', '.join(METRICS)}")
        return cls(tuple(stages), model=model, calibration=calibration, evaluate=tuple(metrics), data=eval_data,
                   allow_partial=allow_partial, version=version, source=source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        """Read and validate a recipe YAML file (safe loader only)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_yaml_text(cls, text: str) -> Recipe:
        """Parse a recipe from YAML text (safe loader only)."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data)

    # -- writing -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data; ``Recipe.from_dict(r.to_dict()) == r``."""
        out: dict[str, Any] = {"version": self.version}
        if self.model is not None:
            out["model"] = self.model
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.data is not None:
            out["data"] = self.data.to_dict()
        if self.allow_partial:
            out["allow_partial"] = True
        out["stages"] = [{"name": s.name, "steps": [c.to_dict() for c in s.steps]} for s in self.stages]
        if self.evaluate:
            out["evaluate"] = list(self.evaluate)
        return out

    def to_yaml(self) -> str:
        """The recipe as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def builtin_recipe_dir() -> Path:
    """The folder of sample recipes shipped in the package (``recipes/`` in the repository points there)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A recipe from a YAML path, or from the name of a shipped sample (``int8-weight-only``)."""
    path = Path(name_or_path)
    if not path.exists():
        candidate = builtin_recipe_dir() / f"{name_or_path}.yaml"
        if candidate.exists():
            path = candidate
    return Recipe.from_yaml(path)
