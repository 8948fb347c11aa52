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
with ``RecipeLoader``, a ``yaml.SafeLoader`` that also refuses what a recipe never needs and
a hostile file uses: anchors and aliases (billion laughs), duplicate keys (the last would
silently win), merge keys, nesting deeper than ``MAX_DEPTH``, more than ``MAX_NODES`` values,
files over ``MAX_RECIPE_BYTES`` (checked before reading) or that are not regular files. ``Recipe.from_yaml(p).to_yaml()`` round-trips.
"""

from __future__ import annotations

import dataclasses
import os
import stat
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
MAX_RECIPE_BYTES = 1024 * 1024  # the shipped recipes are < 2 KB
MAX_DEPTH = 32  # nesting levels of YAML collections; a recipe uses about 5
MAX_NODES = 50_000  # values in one recipe (the shipped ones hold < 100): bounds the pure-Python parse to seconds


def _recipe_loader() -> type:
    """``RecipeLoader``, built on first use so ``import slimkit`` does not import yaml."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml
    from yaml.composer import ComposerError
    from yaml.constructor import ConstructorError
    from yaml.events import AliasEvent, CollectionStartEvent

    class RecipeLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` without anchors/aliases, duplicate or merge keys, or nesting deeper than ``MAX_DEPTH``.

        The checks run while the document is composed, event by event, so a hostile file
        is refused before anything large or deep is built.
        """

        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._depth = 0
            self._nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise ComposerError(None, None, f"more than {MAX_NODES:,} values in one recipe", event.start_mark)
            if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in a recipe; "
                                                "write each value out", event.start_mark)
            if not isinstance(event, CollectionStartEvent):
                return super().compose_node(parent, index)
            self._depth += 1  # compose_node recurses once per level: stop before Python's recursion limit does
            try:
                if self._depth > MAX_DEPTH:
                    raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(None, None, "merge keys (<<) are not allowed in a recipe",
                                           key_node.start_mark)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # SafeConstructor refuses unhashable keys itself
                key = self.construct_object(key_node)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue
                if first is not None:
                    raise ConstructorError(None, None, f"duplicate key {key!r} (first on line {first})",
                                           key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    _LOADER = RecipeLoader
    return RecipeLoader


_LOADER: type | None = None


def _yaml_error_text(exc: BaseException) -> str:
    """One line saying what is wrong and where (``problem (line L, column C)``)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem:
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{problem}{where}"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def parse_yaml(text: str | bytes, where: str) -> Any:
    """Plain data from recipe YAML text with ``RecipeLoader``; RecipeError (one line) for anything it refuses.

    Values the safe constructors cannot build (a 5,000-digit integer, month 13 in a date)
    are errors of the file too, not crashes.
    """
    import yaml

    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where} is {size:,} bytes; a recipe may be at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        return yaml.load(text, Loader=_recipe_loader())  # RecipeLoader is a yaml.SafeLoader
    except (yaml.YAMLError, UnicodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise RecipeError(f"{where} is not valid YAML: {_yaml_error_text(exc)}") from None


def _read_recipe_file(path: Path) -> bytes:
    """The bytes of a regular recipe file of at most ``MAX_RECIPE_BYTES``, checked before reading."""
    try:
        # O_NONBLOCK: a FIFO put in the recipe's place must not block the open; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} not found") from None
    except OSError as exc:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(f"recipe {str(path)!r} is not a regular file")
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is {info.st_size:,} bytes; a recipe may be at most "
                              f"{MAX_RECIPE_BYTES:,} bytes")
        data = f.read(MAX_RECIPE_BYTES + 1)  # bounded: the file may grow after fstat
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is over {MAX_RECIPE_BYTES:,} bytes; a recipe may be at most "
                          f"{MAX_RECIPE_BYTES:,} bytes")
    return data


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
        """Read and validate a recipe YAML file (``RecipeLoader``: a regular file of at most 1 MB, see above)."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} not found" if not path.exists() else
                              f"recipe {str(path)!r} is not a regular file")
        data = _read_recipe_file(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: not UTF-8 text (byte {exc.start})") from None
        return cls.from_dict(parse_yaml(text, f"recipe {path}"), source=str(path))

    @classmethod
    def from_yaml_text(cls, text: str) -> Recipe:
        """Parse a recipe from YAML text (``RecipeLoader``, see above)."""
        if not isinstance(text, str):
            raise RecipeError(f"recipe text must be a string, got {type(text).__name__}")
        return cls.from_dict(parse_yaml(text, "recipe"))

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


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with slimkit (``resolve_recipe`` takes them without a path)."""
    return sorted(p.stem for p in builtin_recipe_dir().glob("*.yaml"))


def _plain_name(name: str) -> bool:
    """Whether ``name`` can only be a shipped recipe's name: no folder part, nothing that leaves the folder."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in ("/", "\\", "\0", ":")) \
        and os.sep not in name and (os.altsep is None or os.altsep not in name)


def resolve_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A recipe from a YAML path, or from the name of a shipped sample (``int8-weight-only``).

    A name is looked up in the shipped folder only when it is a plain name: ``../x`` or
    ``a/b`` is a path, never a way out of that folder.
    """
    path = Path(name_or_path)
    if path.exists():
        return Recipe.from_yaml(path)
    name = os.fspath(name_or_path)
    if isinstance(name, str) and _plain_name(name):
        candidate = builtin_recipe_dir() / f"{name}.yaml"
        if candidate.is_file():
            return Recipe.from_yaml(candidate)
        shipped = shipped_recipes()
        raise RecipeError(f"recipe {name!r} not found: no such file, nor a shipped recipe{closest(name, shipped)}; "
                          f"shipped: {', '.join(shipped)}")
    raise RecipeError(f"recipe file {str(name_or_path)!r} not found")
