"""Errors slimkit raises for a user's mistake.

Everything deriving from ``SlimkitError`` is a problem the user can fix (a file, a key, a
layer, a setting); the CLI prints its message on one line and exits with code 2.
Anything else escaping slimkit is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlimkitError(Exception):
    """A user-fixable problem; the message names what to fix."""


class ConfigError(SlimkitError, ValueError):
    """An invalid algorithm config: unknown key, value out of range, impossible setting."""


class RecipeError(SlimkitError, ValueError):
    """A recipe file that cannot be read or does not validate."""


class ModelLoadError(SlimkitError):
    """A model that cannot be found, read or rebuilt (missing path, corrupt weights, wrong architecture)."""


class DataError(SlimkitError, ValueError):
    """Calibration or evaluation data that cannot be used (empty, NaN, mismatched shapes)."""


class UnsupportedError(SlimkitError):
    """A model, layer or option this technique cannot handle."""


class NothingCompressedError(UnsupportedError):
    """A step that changed (almost) nothing of what it was asked to compress."""


class BrokenModelError(UnsupportedError):
    """A step after which the model no longer runs (or returns NaN/inf) on example inputs."""


def closest(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint naming the closest of ``choices`` to ``word``, or '' when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
