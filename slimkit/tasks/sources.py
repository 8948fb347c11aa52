"""Data sources: one spec that names a user's data, read into records the same way everywhere.

A ``DataSpec`` names where data lives (a file, a folder, or an in-memory object) and how to
read it (which field holds the text, which split, how to cut a text file). ``read_source``
turns it into ``TextRecords`` (a list of texts, optional labels) or ``TensorRecords`` (an
input tensor, optional labels), independent of any model: calibration, evaluation and
distillation all read user data through here, so a spec means the same thing in each.

Supported sources:

* text files (any UTF-8 file not listed below), cut into lines, paragraphs or kept whole;
* folders of text files (recursive, sorted, hidden and non-text files skipped);
* image folders (one sub-folder per class, torchvision ``ImageFolder`` layout);
* JSON (a list of records), JSONL, CSV/TSV and Parquet records, chat records included;
* Hugging Face datasets: ``Dataset``/``DatasetDict`` objects or ``save_to_disk`` folders;
* tensors: ``.npz``, ``.npy``, ``.safetensors``, in-memory tensors, dicts and
  ``(inputs, labels)`` tuples. Never pickle: ``np.load(allow_pickle=False)`` and safetensors only.

Built-in corpus names ("stdlib", "digits") are *not* read here; ``is_builtin_name`` tells the
caller when to resolve one itself. Layering: this module imports only the standard library,
numpy, torch and ``slimkit.core.errors``; pyarrow, datasets and PIL are imported lazily.
"""

from __future__ import annotations

import csv
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import torch

from slimkit.core.errors import ConfigError, DataError, closest

#: Text sources are read whole, so larger ones are refused before reading (module-level so a test can lower it).
MAX_TEXT_BYTES = 2 * 1024**3
UNITS = ("auto", "line", "paragraph", "file")
TEXT_FIELDS = ("text", "content", "prompt")
CHAT_FIELDS = ("messages", "conversations")
LABEL_FIELDS = ("label", "labels", "y")
INPUT_KEYS = ("inputs", "x", "input")
LABEL_KEYS = ("labels", "y", "label")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})

_SNIFF_BYTES = 8192
_JSON_SUFFIXES = frozenset({".json"})
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
_CSV_SUFFIXES = frozenset({".csv", ".tsv"})
_PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# "\n", then any whitespace (blank lines may hold spaces), then "\n": a paragraph break.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# ShareGPT-style chats ("conversations": [{"from": "human", "value": ...}]) use other role names.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

_FIELD_KINDS = {"field": "str", "label_field": "str", "n": "int", "seq_len": "int", "chat_template": "bool",
                "seed": "int", "split": "str", "unit": "str"}
_OPTIONAL = frozenset({"field", "label_field", "n", "seq_len", "split"})


# -- the spec -------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Where a user's data lives and how to read it.

    ``source`` is a path (str or PathLike), a built-in corpus name the caller resolves, or,
    through the Python API, an in-memory object (list of str, list of record dicts,
    ``datasets.Dataset``/``DatasetDict``, tensor, dict of tensors, ``(inputs, labels)`` tuple).
    ``n``, ``seq_len`` and ``seed`` are carried for the caller (how many samples/windows,
    window length, sampling seed); ``read_source`` itself does not sample.
    """

    source: Any
    field: str | None = None
    label_field: str | None = None
    n: int | None = None
    seq_len: int | None = None
    chat_template: bool = False
    seed: int = 0
    split: str | None = None
    unit: str = "auto"

    def __post_init__(self) -> None:
        if self.source is None or (isinstance(self.source, str) and not self.source.strip()):
            raise ConfigError("a data spec needs a source: a file, a folder or a built-in corpus name")
        for key, kind in _FIELD_KINDS.items():
            value = getattr(self, key)
            if value is None and key in _OPTIONAL:
                continue
            ok = {"str": isinstance(value, str) and value != "",
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "bool": isinstance(value, bool)}[kind]
            if not ok:
                raise ConfigError(f"data spec key {key!r} needs {_KIND_WORDS[kind]}, got {value!r}")
        for key in ("n", "seq_len"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data spec key {key!r} must be at least 1, got {value}")
        if self.unit not in UNITS:
            raise ConfigError(f"data spec key 'unit' must be one of {', '.join(UNITS)}, got {self.unit!r}"
                              f"{closest(self.unit, UNITS)}")

    @classmethod
    def parse(cls, spec: Any) -> DataSpec:
        """A ``DataSpec`` from a DataSpec (returned as is), a dict of its keys, or a string.

        The string form (used by the CLI) is ``"PATH"`` or ``"PATH?key=value&key=value"``, e.g.
        ``"chats.jsonl?field=messages&chat_template=true&n=32"``; values are converted to the
        key's type (int; bool from true/false/1/0/yes/no). A PathLike becomes a path source
        with no options; a dict whose values are all tensors/arrays, and any other object,
        becomes an in-memory source. Unknown keys and bad values raise ``ConfigError``.
        """
        if isinstance(spec, DataSpec):
            return spec
        if isinstance(spec, Mapping) and not _is_tensor_dict(spec):
            return cls._from_dict(spec)
        if isinstance(spec, str):
            return cls._from_string(spec)
        if isinstance(spec, os.PathLike):
            return cls(source=os.fspath(spec))
        return cls(source=spec)

    @classmethod
    def _from_dict(cls, spec: Mapping) -> DataSpec:
        names = [f.name for f in fields(cls)]
        for key in spec:
            if key not in names:
                raise ConfigError(f"unknown data spec key {key!r}{closest(str(key), names)}; "
                                  f"valid keys: {', '.join(names)}")
        if "source" not in spec:
            raise ConfigError("a data spec needs 'source': a file, a folder or a built-in corpus name")
        values = {key: _convert(key, value) for key, value in spec.items() if key != "source"}
        source = spec["source"]
        return cls(source=os.fspath(source) if isinstance(source, os.PathLike) else source, **values)

    @classmethod
    def _from_string(cls, spec: str) -> DataSpec:
        text = spec.strip()
        if not text:
            raise ConfigError("a data spec needs a source: a file, a folder or a built-in corpus name")
        path, query = _split_query(text)
        if not query:
            return cls(source=path)
        names = [f.name for f in fields(cls) if f.name != "source"]
        values: dict[str, Any] = {}
        for item in query.split("&"):
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = unquote(key).strip()
            if not sep:
                raise ConfigError(f"data spec option {item!r} in {spec!r} needs the form key=value")
            if key == "source":
                raise ConfigError(f"in {spec!r} the source goes before '?', not in a source= option")
            if key not in names:
                raise ConfigError(f"unknown data spec key {key!r} in {spec!r}{closest(key, names)}; "
                                  f"valid keys: {', '.join(names)}")
            if key in values:
                raise ConfigError(f"data spec key {key!r} is given twice in {spec!r}")
            values[key] = _convert(key, unquote(raw))
        return cls(source=path, **values)

    def to_dict(self) -> dict:
        """The spec as a dict: ``source`` as a string plus the fields that differ from their defaults.

        Path sources round-trip: ``DataSpec.parse(spec.to_dict()) == spec``. An in-memory source
        is written as a short description (for reports), which does not round-trip.
        """
        out: dict[str, Any] = {"source": _source_name(self.source)}
        for f in fields(self):
            if f.name != "source" and getattr(self, f.name) != f.default:
                out[f.name] = getattr(self, f.name)
        return out

    def describe(self) -> str:
        """Short text for reports, e.g. ``"my.jsonl (field 'text')"``."""
        parts = []
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        if self.label_field is not None:
            parts.append(f"labels {self.label_field!r}")
        if self.split is not None:
            parts.append(f"split {self.split!r}")
        if self.unit != "auto":
            parts.append(f"unit {self.unit!r}")
        if self.chat_template:
            parts.append("chat template")
        name = _source_name(self.source)
        return f"{name} ({', '.join(parts)})" if parts else name


_KIND_WORDS = {"str": "a non-empty string", "int": "a whole number", "bool": "true or false"}


def _convert(key: str, value: Any) -> Any:
    """``value`` converted to the type of spec key ``key`` (strings from the CLI or YAML); else ConfigError."""
    kind = _FIELD_KINDS[key]
    if value is None and key in _OPTIONAL:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
    elif isinstance(value, str) and value.strip():
        return value.strip()
    raise ConfigError(f"data spec key {key!r} needs {_KIND_WORDS[kind]}, got {value!r}")


def _split_query(text: str) -> tuple[str, str]:
    """(path, query) of a CLI spec string: the query starts at the first '?' whose prefix is not itself a path."""
    if "?" not in text or os.path.exists(text):
        return text, ""
    # A '?' may belong to a file name; prefer the split whose path part exists.
    positions = [i for i, ch in enumerate(text) if ch == "?"]
    for i in positions:
        if os.path.exists(text[:i]):
            return text[:i], text[i + 1:]
    return text[:positions[0]], text[positions[0] + 1:]


def is_builtin_name(source: Any) -> bool:
    """True when ``source`` looks like a built-in corpus name ("stdlib", "digits") rather than a path.

    That is a plain non-empty ``str`` with no path separator, no whitespace, no '?', no suffix,
    and no file or folder of that name in the working directory. The caller resolves such a
    name itself; ``read_source`` reads only paths and in-memory objects.
    """
    if not isinstance(source, str) or not source or source in (".", ".."):
        return False
    if any(sep in source for sep in ("/", "\\", "?")) or any(ch.isspace() for ch in source):
        return False
    return Path(source).suffix == "" and not os.path.exists(source)


# -- the records ----------------------------------------------------------------------


@dataclass
class TextRecords:
    """Texts read from a source, with an optional label per text and a description for the report."""

    texts: list[str]
    description: str
    labels: list | None = None


@dataclass
class TensorRecords:
    """Samples read from a source: float32 ``inputs`` of shape (N, ...) (images: (N, C, H, W) in [0, 1]),
    optional ``labels`` with N rows, a description, and for image folders the class names in label order."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    description: str
    classes: list[str] | None = None


# -- reading --------------------------------------------------------------------------


def read_source(spec: DataSpec | str | dict, tokenizer: Any = None, *, image_size: tuple[int, int] | None = None,
                channels: int | None = None, max_records: int | None = None) -> TextRecords | TensorRecords:
    """Read the records a spec names.

    ``spec`` is anything ``DataSpec.parse`` accepts. ``tokenizer`` is needed only to render
    chat records with ``chat_template=True``. ``image_size`` (H, W) and ``channels`` (1 or 3)
    apply to image folders; giving either says images are expected, so a folder without
    them is refused. ``max_records`` keeps at most that many records (texts, rows, samples,
    images), the first ones in reading order; JSONL, CSV and Parquet stop reading there,
    which also lifts the up-front 2 GB refusal for JSONL and CSV.

    Returns ``TextRecords`` for text, record and dataset sources and ``TensorRecords`` for
    tensor and image sources. Every problem with the data raises ``DataError`` naming the
    source and what to fix; a bad argument raises ``ConfigError``.
    """
    spec = DataSpec.parse(spec)
    if image_size is not None:
        if (not isinstance(image_size, Sequence) or len(image_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
            raise ConfigError(f"image_size must be two positive whole numbers (height, width), got {image_size!r}")
        image_size = (int(image_size[0]), int(image_size[1]))
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if max_records is not None and (isinstance(max_records, bool) or not isinstance(max_records, int)
                                    or max_records < 1):
        raise ConfigError(f"max_records must be a whole number of at least 1, got {max_records!r}")
    if spec.chat_template:
        _check_chat_tokenizer(tokenizer)
    reader = _Reader(spec, tokenizer, image_size, channels, max_records)
    source = spec.source
    if isinstance(source, (str, os.PathLike)):
        return reader.path(Path(os.fspath(source)), os.fspath(source))
    return reader.memory(source)


def _check_chat_tokenizer(tokenizer: Any) -> None:
    """Refuse ``chat_template=True`` up front when there is no tokenizer, or it has no chat template."""
    if tokenizer is None:
        raise DataError("chat_template is set but no tokenizer was given to render the chats; set chat_template: "
                        "false to join the messages as plain text, or use a model that has a tokenizer")
    if not getattr(tokenizer, "chat_template", None) or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template; set chat_template: false "
                        "to join the messages as plain text, or use a tokenizer that has one")


class _Reader:
    """One ``read_source`` call: the spec and options, and one method per kind of source."""

    def __init__(self, spec: DataSpec, tokenizer: Any, image_size: tuple[int, int] | None, channels: int | None,
                 max_records: int | None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.channels = channels
        self.max_records = max_records

    def limit(self, items: list) -> list:
        """The first ``max_records`` items."""
        return items if self.max_records is None else items[:self.max_records]

    def refuse_chat_template(self, name: str, what: str) -> None:
        """chat_template only means something for chat records; say so instead of ignoring it."""
        if self.spec.chat_template:
            raise DataError(f"chat_template is set but {name} is {what}, not chat records; set chat_template: false, "
                            "or give JSON/JSONL/Parquet records with a 'messages' field")

    # -- paths ------------------------------------------------------------------------

    def path(self, path: Path, name: str) -> TextRecords | TensorRecords:
        """Dispatch a path source on what it is: folder kind, or file suffix."""
        if not os.path.exists(name):
            raise DataError(_missing_path_message(name))
        if path.is_dir():
            return self.folder(path, name)
        suffix = path.suffix.lower()
        if suffix in _JSON_SUFFIXES:
            return self.json_file(path, name)
        if suffix in _JSONL_SUFFIXES:
            return self.rows(_jsonl_rows(path, name, self.max_records), name)
        if suffix in _CSV_SUFFIXES:
            return self.rows(_csv_rows(path, name, self.max_records), name)
        if suffix in _PARQUET_SUFFIXES:
            return self.parquet(path, name)
        if suffix in (".npz", ".npy", ".safetensors"):
            self.refuse_chat_template(name, "a tensor file")
            return self.tensors(_load_arrays(path, name, suffix), name, single=suffix == ".npy")
        return self.text_file(path, name)

    def text_file(self, path: Path, name: str) -> TextRecords:
        """A UTF-8 text file cut by ``unit`` ("auto": paragraphs when blank lines separate blocks, else lines)."""
        self.refuse_chat_template(name, "a text file")
        _check_size(name, path.stat().st_size)
        text = _decode(path.read_bytes())
        if text is None:
            raise DataError(f"{name} is not a text file (it holds NUL bytes or is not UTF-8): give a UTF-8 text file, "
                            "or .npz/.safetensors/.parquet for binary data")
        texts, unit = split_text(text, self.spec.unit)
        if not texts:
            raise DataError(f"{name} holds no text (it is empty or only whitespace)")
        texts = self.limit(texts)
        return TextRecords(texts=texts, description=f"{len(texts)} {_plural(unit, len(texts))} of {name}")

    def folder(self, path: Path, name: str) -> TextRecords | TensorRecords:
        """A save_to_disk dataset, an image folder, or a folder of text files, in that order of precedence."""
        if (path / "dataset_dict.json").is_file() or ((path / "dataset_info.json").is_file()
                                                      and (path / "state.json").is_file()):
            datasets = _import_datasets()
            try:
                dataset = datasets.load_from_disk(str(path))
            except Exception as exc:  # the library raises many types for a damaged folder; the user can fix any
                raise DataError(f"{name} looks like a saved Hugging Face dataset but cannot be loaded: "
                                f"{_first_line(exc)}") from exc
            return self.dataset(dataset, name)
        classes = _image_classes(path)
        if classes is not None:
            return self.images(classes, name)
        if self.image_size is not None or self.channels is not None:
            raise DataError(f"{name} holds no images: an image folder needs one sub-folder per class holding "
                            f"{'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} files")
        return self.text_folder(path, name)

    def text_folder(self, path: Path, name: str) -> TextRecords:
        """Every UTF-8 file under a folder (sorted by path, hidden ones skipped), one text per file by default."""
        self.refuse_chat_template(name, "a folder of text files")
        files = _walk_files(path)
        total = sum(f.stat().st_size for f in files)
        if total > MAX_TEXT_BYTES:
            raise DataError(f"the files under {name} total {_human_bytes(total)}; text sources over "
                            f"{_human_bytes(MAX_TEXT_BYTES)} are refused because they are read whole: "
                            "point at a smaller folder or a sample of it")
        unit = "file" if self.spec.unit == "auto" else self.spec.unit
        texts: list[str] = []
        read = skipped = 0
        for file in files:
            text = _decode(file.read_bytes())
            if text is None:  # images, archives, .pyc: not text, skipped rather than refused
                skipped += 1
                continue
            parts, _ = split_text(text, unit)
            if parts:
                read += 1
                texts.extend(parts)
            if self.max_records is not None and len(texts) >= self.max_records:
                break
        if not texts:
            seen = f"{len(files)} files, none of them UTF-8 text with content" if files else "no files"
            raise DataError(f"{name} holds no text files ({seen}; hidden files are skipped)")
        texts = self.limit(texts)
        what = (f"{len(texts)} {_plural('file', len(texts))} under {name}" if unit == "file"
                else f"{len(texts)} {_plural(unit, len(texts))} from {read} {_plural('file', read)} under {name}")
        if skipped:
            what += f" ({skipped} non-text {_plural('file', skipped)} skipped)"
        return TextRecords(texts=texts, description=what)

    def images(self, classes: dict[str, list[Path]], name: str) -> TensorRecords:
        """An image folder: (N, C, H, W) float32 in [0, 1], labels = index of the class folder in sorted order."""
        self.refuse_chat_template(name, "an image folder")
        Image = _import_pil()
        empty = [c for c, files in classes.items() if not files]
        if empty:
            raise DataError(f"class folder {empty[0]!r} in {name} holds no images: every sub-folder is a class and "
                            "needs at least one image; remove it or add images")
        items = [(label, file) for label, files in enumerate(classes.values()) for file in files]
        items = self.limit(items)
        # First pass reads headers only (cheap): modes decide the default channels, sizes must agree.
        modes, sizes = [], {}
        for _, file in items:
            try:
                with Image.open(file) as image:
                    modes.append(image.mode)
                    sizes.setdefault((image.height, image.width), file)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{file} in {name} is not a readable image: {_first_line(exc)}") from exc
        if self.image_size is None and len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise DataError(f"the images in {name} differ in size ({f1.name} is {s1[0]}x{s1[1]}, {f2.name} is "
                            f"{s2[0]}x{s2[1]}, height x width): pass an image size to resize them, or resize the files")
        channels = self.channels or (1 if all(m in _GRAY_MODES for m in modes) else 3)
        arrays = []
        for _, file in items:
            try:
                with Image.open(file) as image:
                    image.load()
                    array = _image_array(image, channels)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{file} in {name} is not a readable image: {_first_line(exc)}") from exc
            tensor = torch.from_numpy(array).permute(2, 0, 1)
            if self.image_size is not None and tuple(tensor.shape[1:]) != self.image_size:
                tensor = torch.nn.functional.interpolate(tensor[None], size=self.image_size, mode="bilinear",
                                                         align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
            arrays.append(tensor)
        inputs = torch.stack(arrays).contiguous()
        labels = torch.tensor([label for label, _ in items], dtype=torch.long)
        shape = "x".join(str(s) for s in inputs.shape[1:])
        return TensorRecords(inputs=inputs, labels=labels, classes=list(classes),
                             description=f"{len(items)} {_plural('image', len(items))} in {len(classes)} "
                                         f"{_plural('class', len(classes))} under {name} ({shape})")

    # -- records ----------------------------------------------------------------------

    def json_file(self, path: Path, name: str) -> TextRecords:
        """A JSON list of records (or of strings), or a dict holding exactly one such list."""
        _check_size(name, path.stat().st_size)
        text = _decode(path.read_bytes())
        if text is None:
            raise DataError(f"{name} is not a text file (it holds NUL bytes or is not UTF-8): save it as UTF-8 JSON")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
        if isinstance(data, dict):
            lists = [key for key, value in data.items() if isinstance(value, list)]
            if len(lists) != 1:
                found = f"its lists are under {', '.join(map(repr, lists))}" if lists else "it holds no list"
                raise DataError(f"{name} is not a list of records: a JSON object must hold exactly one list of "
                                f"records (like {{\"data\": [...]}}); {found}")
            data = data[lists[0]]
        if not isinstance(data, list):
            raise DataError(f"{name} is not a list of records: it holds {_kind(data)}; give a list of objects like "
                            "[{\"text\": ...}, ...]")
        if data and all(isinstance(item, str) for item in data):
            if self.spec.field is not None:
                raise DataError(f"field {self.spec.field!r} is set but {name} holds plain strings, not records: "
                                "remove the field option")
            return self.text_list(self.limit(data), name)
        return self.rows(iter(self.limit(data)), name)

    def parquet(self, path: Path, name: str) -> TextRecords:
        """Parquet records read in batches, only the needed columns, stopping at ``max_records``."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"reading {name} needs pyarrow: pip install pyarrow") from exc
        try:
            table = pq.ParquetFile(path)
            first = next(table.iter_batches(batch_size=1), None)
            first_row = first.to_pylist()[0] if first is not None and first.num_rows else None
            if first_row is None:
                raise DataError(f"{name} holds no records")
            text_field, is_chat, label_field = self.pick_fields(first_row, name)
            columns = [text_field] + ([label_field] if label_field else [])
            rows: list[dict] = []
            for batch in table.iter_batches(batch_size=4096, columns=columns):
                rows.extend(batch.to_pylist())
                if self.max_records is not None and len(rows) >= self.max_records:
                    break
        except (OSError, ValueError, pa.ArrowException) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{name} is not a readable Parquet file: {_first_line(exc)}") from exc
        return self.rows(iter(self.limit(rows)), name)

    def rows(self, rows: Iterator[dict], name: str) -> TextRecords:
        """Records (dicts) from any row source: the text (or chat) field and the labels, checked per record."""
        rows = iter(rows)
        first = next(rows, None)
        if first is None:
            raise DataError(f"{name} holds no records")
        if not isinstance(first, Mapping):
            raise DataError(f"{name} is not a list of records: record 1 is {_kind(first)}, not an object with named "
                            "fields")
        text_field, is_chat, label_field = self.pick_fields(first, name)
        values, labels = [], []
        for number, record in enumerate(_chain(first, rows), start=1):
            if not isinstance(record, Mapping):
                raise DataError(f"record {number} of {name} is {_kind(record)}, not an object with named fields")
            if text_field not in record:
                raise DataError(f"record {number} of {name} has no field {text_field!r}; it has: "
                                f"{_field_list(record)}")
            values.append(record[text_field])
            if label_field is not None:
                if label_field not in record:
                    raise DataError(f"record {number} of {name} has no label field {label_field!r}; it has: "
                                    f"{_field_list(record)}")
                labels.append(record[label_field])
        return self.columns(values, labels if label_field else None, text_field, is_chat, name)

    def columns(self, values: Sequence, labels: list | None, text_field: str, is_chat: bool, name: str) -> TextRecords:
        """The text (or chat) column turned into texts; per-record type checks name the record."""
        texts: list[str] = []
        for number, value in enumerate(values, start=1):
            if is_chat:
                texts.append(self.render_chat(value, number, text_field, name))
            elif isinstance(value, str):
                texts.append(value)
            else:
                raise DataError(f"record {number} of {name}: field {text_field!r} holds {_kind(value)}, not text; "
                                "choose a text field with field=...")
        if not texts or not any(text.strip() for text in texts):
            raise DataError(f"{name} holds no text (every {text_field!r} value is empty)")
        if labels is not None:
            labels = _int_labels(labels)
        kind = "chats" if is_chat else "records"
        how = f"field {text_field!r}" + (", chat template" if is_chat and self.spec.chat_template else "")
        return TextRecords(texts=texts, labels=labels, description=f"{len(texts)} {kind} of {name} ({how})")

    def pick_fields(self, first: Mapping, name: str) -> tuple[str, bool, str | None]:
        """(text field, whether it holds chats, label field or None), chosen from the first record."""
        field = self.spec.field
        if field is not None:
            _require_field(first, field, name, "field")
        else:
            field = next((f for f in CHAT_FIELDS if isinstance(first.get(f), (list, tuple))), None)
            field = field or next((f for f in TEXT_FIELDS if isinstance(first.get(f), str)), None)
            if field is None:
                strings = [k for k, v in first.items() if isinstance(v, str) and k not in LABEL_FIELDS
                           and k != self.spec.label_field]
                if len(strings) != 1:
                    raise DataError(f"cannot tell which field of {name} holds the text; set field to one of: "
                                    f"{_field_list(first)}")
                field = strings[0]
        is_chat = isinstance(first[field], (list, tuple))
        if self.spec.chat_template and not is_chat:
            raise DataError(f"chat_template is set but field {field!r} of {name} holds plain text, not a list of "
                            "{'role', 'content'} messages; set chat_template: false or choose the messages field")
        label_field = self.spec.label_field
        if label_field is not None:
            _require_field(first, label_field, name, "label field")
        else:
            label_field = next((f for f in LABEL_FIELDS if f in first and f != field), None)
        return field, is_chat, label_field

    def render_chat(self, messages: Any, number: int, field: str, name: str) -> str:
        """One chat as text: the tokenizer's chat template, or "role: content" lines."""
        where = f"record {number} of {name}"
        if not isinstance(messages, (list, tuple)) or not messages:
            raise DataError(f"{where}: field {field!r} must be a non-empty list of {{'role', 'content'}} messages")
        chat = []
        for message in messages:
            if isinstance(message, Mapping) and "role" not in message and "from" in message and "value" in message:
                message = {"role": _SHAREGPT_ROLES.get(message["from"], message["from"]), "content": message["value"]}
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise DataError(f"{where}: every message in {field!r} must be an object with 'role' and 'content'")
            content = message["content"]
            if isinstance(content, list):  # multimodal parts: keep the text ones for plain joining
                if not self.spec.chat_template:
                    content = "\n".join(p["text"] for p in content if isinstance(p, Mapping)
                                        and isinstance(p.get("text"), str))
            elif not isinstance(content, str):
                raise DataError(f"{where}: a message's 'content' is {_kind(content)}, not text")
            chat.append({**message, "content": content})
        if not self.spec.chat_template:
            return "\n".join(f"{m['role']}: {m['content']}" for m in chat)
        try:
            text = self.tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception as exc:  # template errors (e.g. roles must alternate) come from the user's data
            raise DataError(f"{where}: the tokenizer's chat template failed: {_first_line(exc)}") from exc
        if not isinstance(text, str):
            raise DataError(f"{where}: the chat template gave a {type(text).__name__}, not text")
        return text

    # -- datasets and memory ----------------------------------------------------------

    def dataset(self, dataset: Any, name: str) -> TextRecords:
        """A Hugging Face Dataset or DatasetDict (the split chosen by ``split``, or its only split)."""
        if hasattr(dataset, "column_names") and isinstance(dataset.column_names, dict):  # a DatasetDict
            splits = list(dataset)
            if self.spec.split is not None:
                if self.spec.split not in splits:
                    raise DataError(f"{name} has no split {self.spec.split!r}{closest(self.spec.split, splits)}; "
                                    f"its splits: {', '.join(splits)}")
                dataset, name = dataset[self.spec.split], f"{name} split {self.spec.split!r}"
            elif len(splits) == 1:
                dataset, name = dataset[splits[0]], f"{name} split {splits[0]!r}"
            else:
                raise DataError(f"{name} has several splits ({', '.join(splits) or 'none'}): choose one with split=...")
        elif self.spec.split is not None:
            raise DataError(f"split {self.spec.split!r} is set but {name} is a single dataset with no splits; "
                            "remove the split option")
        if self.max_records is not None and len(dataset) > self.max_records:
            dataset = dataset.select(range(self.max_records))
        if len(dataset) == 0:
            raise DataError(f"{name} holds no records")
        text_field, is_chat, label_field = self.pick_fields(dataset[0], name)
        labels = list(dataset[label_field]) if label_field else None
        return self.columns(list(dataset[text_field]), labels, text_field, is_chat, name)

    def text_list(self, texts: list, name: str) -> TextRecords:
        """Texts given as they are (a list of str, or a JSON list of strings)."""
        self.refuse_chat_template(name, "a list of texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"item {i} of {name} is {_kind(text)}, not text")
        if not any(text.strip() for text in texts):
            raise DataError(f"{name} holds no text (it is empty or only whitespace)")
        return TextRecords(texts=list(texts), description=f"{len(texts)} {_plural('text', len(texts))} of {name}")

    def memory(self, source: Any) -> TextRecords | TensorRecords:
        """An in-memory source: list of str or records, dataset, tensor, dict of tensors, (inputs, labels)."""
        name = _source_name(source)
        module = type(source).__module__.split(".")[0]
        if module == "datasets" and type(source).__name__ in ("Dataset", "DatasetDict"):
            return self.dataset(source, name)
        if isinstance(source, (torch.Tensor, np.ndarray)):
            self.refuse_chat_template(name, "a tensor")
            return self.tensors({"inputs": source}, name, single=True)
        if isinstance(source, Mapping):
            self.refuse_chat_template(name, "a dict of tensors")
            return self.tensors(dict(source), name, single=False)
        if (isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], (torch.Tensor, np.ndarray))
                and (source[1] is None or isinstance(source[1], (torch.Tensor, np.ndarray)))):
            self.refuse_chat_template(name, "an (inputs, labels) tuple")
            return self._tensor_records(source[0], source[1], name, "inputs", "labels")
        if isinstance(source, (list, tuple)):
            if source and all(isinstance(item, Mapping) for item in source):
                return self.rows(iter(self.limit(list(source))), name)
            if self.spec.field is not None and source and not isinstance(source[0], Mapping):
                raise DataError(f"field {self.spec.field!r} is set but {name} holds plain texts, not records")
            if not source:
                raise DataError(f"{name} holds no text (the list is empty)")
            return self.text_list(self.limit(list(source)), name)
        raise DataError(f"cannot read {_kind(source)} as data: give a file or folder path, a list of str, "
                        "a datasets.Dataset, a tensor, a dict of tensors or an (inputs, labels) tuple")

    # -- tensors ----------------------------------------------------------------------

    def tensors(self, arrays: dict[str, Any], name: str, *, single: bool) -> TensorRecords:
        """Inputs and labels chosen by key from an archive or dict (``field``/``label_field``, then defaults)."""
        if not arrays:
            raise DataError(f"{name} holds no arrays")
        keys = list(arrays)
        if single:
            input_key = keys[0]
        elif self.spec.field is not None:
            input_key = self.spec.field
            if input_key not in arrays:
                raise DataError(f"{name} has no array {input_key!r}{closest(input_key, keys)}; its arrays: "
                                f"{', '.join(keys)}")
        elif len(keys) == 1:
            input_key = keys[0]
        else:
            input_key = next((k for k in INPUT_KEYS if k in arrays), None)
            if input_key is None:
                raise DataError(f"cannot tell which array of {name} holds the inputs; set field to one of: "
                                f"{', '.join(keys)}")
        label_key = self.spec.label_field
        if label_key is not None:
            if label_key not in arrays:
                raise DataError(f"{name} has no label array {label_key!r}{closest(label_key, keys)}; its arrays: "
                                f"{', '.join(keys)}")
        elif not single:
            label_key = next((k for k in LABEL_KEYS if k in arrays and k != input_key), None)
        labels = arrays[label_key] if label_key is not None else None
        return self._tensor_records(arrays[input_key], labels, name, input_key, label_key)

    def _tensor_records(self, inputs: Any, labels: Any, name: str, input_key: str,
                        label_key: str | None) -> TensorRecords:
        """Checked float32 inputs (finite, at least 1-D) and labels with one row per sample."""
        x = _as_tensor(inputs, f"array {input_key!r} of {name}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise DataError(f"array {input_key!r} of {name} holds no samples (shape {tuple(x.shape)})")
        x = self.limit_tensor(x).to(torch.float32)
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1)
        if bad.any():
            raise DataError(f"array {input_key!r} of {name} holds NaN or inf (first in sample "
                            f"{int(bad.nonzero()[0])}): clean the data")
        y = None
        if labels is not None:
            y = self.limit_tensor(_as_tensor(labels, f"label array {label_key!r} of {name}"))
            if y.dim() == 0 or y.shape[0] != x.shape[0]:
                raise DataError(f"{name}: {x.shape[0]} inputs ({input_key!r}) but labels {label_key!r} have shape "
                                f"{tuple(y.shape)}; give one label per sample")
            y = y.to(torch.float32) if y.is_floating_point() else y.to(torch.long)
        shape = "x".join(str(s) for s in x.shape[1:]) or "scalar"
        desc = f"{x.shape[0]} samples of {name} ({input_key!r}, {shape}" + (f", labels {label_key!r})" if y is not None
                                                                          else ")")
        return TensorRecords(inputs=x.contiguous(), labels=y, description=desc)

    def limit_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The first ``max_records`` rows."""
        return t if self.max_records is None else t[:self.max_records]


# -- helpers: text --------------------------------------------------------------------


def split_text(text: str, unit: str) -> tuple[list[str], str]:
    """(texts, unit used): ``text`` cut by ``unit``, each piece stripped, empty pieces dropped.

    "auto" means paragraphs when at least one blank line separates non-empty blocks, else lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if unit == "file":
        parts = [text]
    elif unit == "line":
        parts = text.split("\n")
    else:
        parts = _PARAGRAPH_BREAK.split(text)
        if unit == "auto":
            if sum(1 for p in parts if p.strip()) >= 2:
                unit = "paragraph"
            else:
                unit, parts = "line", text.split("\n")
    return [p.strip() for p in parts if p.strip()], unit


def _decode(data: bytes) -> str | None:
    """The UTF-8 text of ``data`` (a BOM dropped), or None when it is binary (NUL in the first 8 KB) or not UTF-8."""
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _check_size(name: str, size: int) -> None:
    """Refuse a text source too large to read whole, before reading it."""
    if size > MAX_TEXT_BYTES:
        raise DataError(f"{name} is {_human_bytes(size)}; text sources over {_human_bytes(MAX_TEXT_BYTES)} are refused "
                        "because they are read whole: split it or pass a sample of it")


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root`` (hidden folders pruned), sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(folder) / f for f in files if not f.startswith("."))
    return sorted((f for f in found if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def _jsonl_rows(path: Path, name: str, max_records: int | None) -> Iterator[dict]:
    """Records of a JSONL file, one per non-blank line, read lazily up to ``max_records``."""
    if max_records is None:
        _check_size(name, path.stat().st_size)
    _check_text_head(path, name)
    count = 0
    with open(path, encoding="utf-8-sig") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"line {number} of {name} is not valid JSON: {exc.msg} "
                                    f"(column {exc.colno})") from exc
                yield record
                count += 1
                if max_records is not None and count >= max_records:
                    return
        except UnicodeDecodeError as exc:
            raise DataError(f"{name} is not a text file (not UTF-8): save it as UTF-8") from exc


def _csv_rows(path: Path, name: str, max_records: int | None) -> Iterator[dict]:
    """Records of a CSV (or TSV) file with a header row, read lazily up to ``max_records``."""
    if max_records is None:
        _check_size(name, path.stat().st_size)
    _check_text_head(path, name)
    limit = csv.field_size_limit()
    # Long texts exceed csv's 128 KB default field limit; lift it while reading (restored below).
    csv.field_size_limit(min(MAX_TEXT_BYTES, 2**31 - 1))
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            try:
                for count, row in enumerate(reader, start=1):
                    row.pop(None, None)  # cells beyond the header have no name
                    yield row
                    if max_records is not None and count >= max_records:
                        return
            except csv.Error as exc:
                raise DataError(f"{name} is not valid CSV near line {reader.line_num}: {_first_line(exc)}") from exc
            except UnicodeDecodeError as exc:
                raise DataError(f"{name} is not a text file (not UTF-8): save it as UTF-8") from exc
    finally:
        csv.field_size_limit(limit)


def _check_text_head(path: Path, name: str) -> None:
    """Refuse a record file whose first 8 KB hold NUL bytes (binary)."""
    with open(path, "rb") as handle:
        if b"\x00" in handle.read(_SNIFF_BYTES):
            raise DataError(f"{name} is not a text file (it holds NUL bytes): save it as UTF-8 text")


def _chain(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _require_field(first: Mapping, field: str, name: str, what: str) -> None:
    """DataError naming the fields that exist unless the first record of ``name`` has ``field``."""
    if field not in first:
        raise DataError(f"{name} has no {what} {field!r}{closest(field, map(str, first))}; its records have: "
                        f"{_field_list(first)}")


def _field_list(record: Mapping) -> str:
    return ", ".join(repr(k) for k in record) or "no fields"


def _int_labels(labels: list) -> list:
    """Labels as ints when every one is a whole number written as text (CSV cells are strings)."""
    if labels and all(isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v) for v in labels):
        return [int(v) for v in labels]
    return labels


# -- helpers: images and tensors ------------------------------------------------------


def _image_classes(root: Path) -> dict[str, list[Path]] | None:
    """Class name -> sorted image files, when ``root`` is an image folder; else None.

    An image folder has non-hidden sub-folders holding image files directly. A sub-folder
    that holds files but no image (say ``docs/guide/*.md`` next to ``docs/img/*.png``) means
    this is a folder of documents, not of classes; an empty sub-folder is kept, as an empty
    class the reader refuses.
    """
    classes: dict[str, list[Path]] = {}
    has_files: dict[str, bool] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in sub.iterdir() if f.is_file() and not f.name.startswith(".")]
        classes[sub.name] = sorted((f for f in files if f.suffix.lower() in IMAGE_SUFFIXES), key=lambda f: f.name)
        has_files[sub.name] = bool(files)
    if not any(classes.values()):
        return None
    if any(has_files[c] and not images for c, images in classes.items()):
        return None
    return classes


def _image_array(image: Any, channels: int) -> np.ndarray:
    """A PIL image as float32 (H, W, channels) in [0, 1]; 16/32-bit grayscale scaled by 65535, not clipped to 8 bits."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        array = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)[..., None]
        return np.ascontiguousarray(np.repeat(array, 3, axis=2) if channels == 3 else array)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(array[..., None] if channels == 1 else array)


def _load_arrays(path: Path, name: str, suffix: str) -> dict[str, Any]:
    """The arrays of a .npz / .npy / .safetensors file (no pickle); a damaged file raises DataError."""
    kind = {".npz": "npz", ".npy": "npy", ".safetensors": "safetensors"}[suffix]
    try:
        if suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return dict(load_file(str(path)))
            except SafetensorError as exc:
                raise ValueError(str(exc)) from exc
        if suffix == ".npy":
            return {"inputs": np.load(path, allow_pickle=False)}
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.ndarray):  # a .npy file named .npz
            return {"inputs": archive}
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{name} is not a readable {kind} file: {_first_line(exc)}") from exc


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    """A CPU tensor from a tensor or numeric array; DataError for strings or objects."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} is not numeric (dtype {array.dtype})")
    return torch.from_numpy(np.array(array, copy=True))  # a copy: npz arrays may be read-only


def _is_tensor_dict(value: Mapping) -> bool:
    return bool(value) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value.values())


# -- helpers: names and messages ------------------------------------------------------


def _source_name(source: Any) -> str:
    """How a source is named in messages and reports: the path as given, or a short in-memory description."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    kind = type(source).__name__
    if isinstance(source, torch.Tensor):
        return f"in-memory tensor {tuple(source.shape)}"
    if isinstance(source, np.ndarray):
        return f"in-memory array {source.shape}"
    if isinstance(source, Mapping):
        return f"in-memory dict of {len(source)} {_plural('array', len(source))}"
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], (torch.Tensor, np.ndarray)):
        return "in-memory (inputs, labels) tuple"
    if isinstance(source, (list, tuple)):
        return f"in-memory {kind} of {len(source)} {_plural('item', len(source))}"
    return f"in-memory {kind}"


def _missing_path_message(name: str) -> str:
    """'X is not a file or folder', with a hint: a close sibling name, built-in names, or in-memory texts."""
    hint = ""
    parent = Path(name).parent
    try:
        if parent.is_dir():
            hint = closest(Path(name).name, [p.name for p in list(parent.iterdir())[:1000]])
    except OSError:
        pass
    shown = name if len(name) <= 80 else name[:77] + "..."
    message = f"{shown!r} is not a file or folder{hint}"
    if is_builtin_name(name):
        message += " (a name without a path or suffix is a built-in corpus, resolved by the caller)"
    elif "\n" in name or len(name) > 255:
        message += " (to use texts held in memory, pass a list of str)"
    return message


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("reading a Hugging Face dataset needs the datasets package: pip install datasets") from exc
    return datasets


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("reading an image folder needs Pillow: pip install pillow") from exc
    return Image


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _human_bytes(size: int) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _plural(word: str, count: int) -> str:
    return word if count == 1 else word + ("es" if word.endswith("s") else "s")


def _kind(value: Any) -> str:
    """'an int', 'a list', 'null' (a missing CSV cell or JSON null): what a value is, for messages."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
