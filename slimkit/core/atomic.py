"""Write outputs to a temporary path and rename them into place, and never delete what slimkit did not write.

An interrupted or failed run leaves the previous artifact intact and no half-written file or
directory behind:

- ``atomic_dir(target)`` yields a temporary folder ``.NAME.tmp-PID.HOST-XXXX`` beside ``target``;
  on success it is swapped in under an exclusive lock (``fcntl.flock`` on ``.NAME.lock``), the
  previous output is restored if the second rename fails, and the temporary folder is removed
  on every failure. Temporaries of a process that no longer exists (SIGKILL, power loss) are
  swept by the next write of the same target; the pid and a host tag in the name say whose they are.
- SIGTERM becomes a ``Terminated`` exception while ``atomic_dir`` runs (or for a whole CLI
  command, ``terminate_on_sigterm``), so the cleanup runs; ``atomic_dir`` re-sends the signal
  afterwards when it installed the handler itself, so the process still dies by SIGTERM.
- Folders and files get the modes the umask asks for (``mkdtemp``/``mkstemp``, and safetensors,
  create 0700/0600 whatever it is).
- ``OutputKind`` describes what a slimkit output folder of one kind holds (its marker file and
  every path slimkit writes in it); ``check_output_dir`` refuses an existing folder that is
  not such an output, or that holds anything else, naming the first foreign file. Pass
  ``kind`` to ``atomic_dir`` and it checks again under the lock, just before the swap.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slimkit.core.errors import SlimkitError

try:  # POSIX; elsewhere the swap runs without the inter-process lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class OutputFolderError(SlimkitError):
    """An output folder slimkit refuses to write: it holds files slimkit did not write."""


class Terminated(BaseException):
    """SIGTERM, raised as an exception so ``finally`` blocks and ``atomic_dir`` clean up.

    A BaseException (like KeyboardInterrupt), so ``except Exception`` does not swallow it.
    """


# -- modes ---------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status``).

    ``os.umask`` can only be read by setting it, which would briefly change it for every
    thread; that is the fallback where /proc does not say.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask asks for.

    ``mkdtemp`` creates 0700 and some writers (safetensors) 0600 whatever the umask; after the
    rename those modes would be the output's. Links are left alone (chmod would follow them).
    """
    dir_mode, file_mode = _dir_mode(), _file_mode()
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode if os.path.isdir(path) else file_mode)


# -- temporary names: whose they are -------------------------------------------------------
_HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _owner_tag() -> str:
    """``PID.HOST``: lets a later run tell a dead process's leftovers from a live writer's."""
    return f"{os.getpid()}.{_HOST_TAG}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _stale(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of our temporaries (a prefix + ``PID.HOST-``) whose process is gone."""
    for prefix in prefixes:
        if not name.startswith(prefix):
            continue
        owner, sep, _ = name[len(prefix):].partition("-")
        pid, dot, host = owner.partition(".")
        # Another host's temporaries are never ours to judge; names without a pid (older
        # slimkit versions) are left alone: their owner cannot be told.
        return bool(sep and dot and pid.isdigit() and host == _HOST_TAG and not _process_alive(int(pid)))
    return False


def sweep_stale(target: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``target`` left by processes that no longer run.

    Returns what was removed. Leftovers of live processes (a concurrent writer), of other
    hosts and of older slimkit versions are kept.
    """
    target = Path(target)
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not _stale(entry.name, prefixes):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


# -- SIGTERM -------------------------------------------------------------------------------
def _raise_terminated(signum: int, frame: object) -> None:
    # A second SIGTERM must not interrupt the cleanup the first one starts.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("terminated (SIGTERM)")


def _install_sigterm() -> object | None:
    """Install the SIGTERM-to-exception handler; returns the previous handler, or None if nothing was installed.

    Only in the main thread (Python runs signal handlers there alone), and only over the
    default action: a handler the program installed itself, or ours already, is left in place.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """While active (main thread), SIGTERM raises ``Terminated``, so every cleanup runs; the handler is restored after."""
    previous = _install_sigterm()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back (this thread) while the two renames of a swap run; they arrive after."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- the lock ------------------------------------------------------------------------------
_HELD: set[int] = set()  # descriptors of the locks this process holds now


def _drop_inherited_locks() -> None:
    """In a forked child: close (never unlock) the parent's lock descriptors.

    A flock belongs to the open file description, which fork shares: a child that kept the
    descriptor would hold the parent's lock until it exits, and deadlock on it if it swaps too.
    """
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.lock`` beside ``target``, removed again on release.

    Removing a lock file races with a waiter that opened it before: after locking, the
    waiter checks that the path still names the file it locked, and opens the new one if not.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _file_mode())
        _HELD.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
        except BaseException:
            _HELD.discard(fd)
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        _HELD.discard(fd)
        os.close(fd)  # the holder we waited for removed it: lock the current file
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


# -- what an output folder holds -----------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
"""Files a transformers tokenizer's ``save_pretrained`` writes."""

_MAX_MARKER_BYTES = 64 * 1024 * 1024


def read_json_marker(path: Path) -> object:
    """The JSON content of a marker file, or None when it is missing, too large, unreadable or not JSON."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class OutputKind:
    """What a slimkit output folder of one kind is: a marker file and every path slimkit writes in it.

    ``paths`` are ``/``-separated patterns relative to the folder, matched one component at a
    time with ``fnmatch`` (``*`` never crosses a ``/``); a pattern ending in ``/`` is a folder,
    any other a regular file. ``marker_ok(content)`` checks the marker's JSON content, so a
    user's own ``config.json`` or ``report.json`` does not pass for slimkit's.
    """

    name: str
    marker: str
    paths: tuple[str, ...]
    marker_ok: Callable[[object], bool] | None = None

    def recognises(self, folder: Path) -> bool:
        """Whether ``folder`` holds this kind's marker (with slimkit's content)."""
        marker = folder / self.marker
        if self.marker_ok is None:
            return marker.is_file() and not marker.is_symlink()
        return self.marker_ok(read_json_marker(marker))

    def _allowed(self, rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        for pattern in self.paths:
            want_dir = pattern.endswith("/")
            pat = pattern.rstrip("/").split("/")
            if want_dir == is_dir and len(pat) == len(parts) and \
                    all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pat)):
                return True
        return False

    def first_foreign(self, folder: Path) -> str | None:
        """The first path (sorted, depth first) in ``folder`` that slimkit does not write in this kind, or None.

        Symbolic links and special files are always foreign: slimkit writes neither.
        """
        def walk(directory: Path, prefix: str) -> str | None:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    return rel
                is_dir = entry.is_dir(follow_symlinks=False)
                if not (is_dir or entry.is_file(follow_symlinks=False)) or not self._allowed(rel, is_dir):
                    return rel
                if is_dir:
                    found = walk(Path(entry.path), rel + "/")
                    if found is not None:
                        return found
            return None

        return walk(folder, "")


def _slimkit_checkpoint_meta(content: object) -> bool:
    return isinstance(content, dict) and content.get("format") == "slimkit"


MODEL_FOLDER = OutputKind(
    "model folder", "slimkit.json",
    ("model.safetensors", "slimkit.json", "config.json", "generation_config.json", "modules.json",
     "config_sentence_transformers.json", *TOKENIZER_FILES,
     # sentence-transformers modules (0_SlimkitEncoder, 1_Pooling, ...): their JSON and the encoder's tokenizer
     "[0-9]*_*/", "[0-9]*_*/*.json", *(f"[0-9]*_*/{name}" for name in TOKENIZER_FILES)),
    _slimkit_checkpoint_meta)
"""A slimkit checkpoint folder as ``slimkit.save`` writes it."""


def check_output_dir(target: str | os.PathLike, kind: OutputKind, *, hint: str = "choose another folder") -> None:
    """Raise ``OutputFolderError`` unless ``target`` is absent, an empty folder, or a slimkit ``kind`` output and nothing else.

    Replacing ``target`` then deletes nothing slimkit did not write. The message names the
    first foreign file; ``hint`` ends it (the CLI says which option to change).
    """
    target = Path(target)

    def refuse(reason: str) -> OutputFolderError:
        return OutputFolderError(f"refusing to overwrite {target}: {reason}; {hint}")

    if not os.path.lexists(target):
        return
    if target.is_symlink():
        raise refuse("it is a symbolic link (slimkit replaces folders, not links)")
    if not target.is_dir():
        raise refuse("it exists and is not a folder")
    try:
        with os.scandir(target) as it:
            if next(it, None) is None:
                return
        recognised = kind.recognises(target)
        foreign = kind.first_foreign(target)
    except OSError as exc:
        raise refuse(f"it cannot be read ({exc.strerror or exc})") from None
    if not recognised:
        what = f"; it holds {foreign!r}" if foreign else ""
        raise refuse(f"it is not empty and is not a slimkit {kind.name} (no slimkit {kind.marker}){what}")
    if foreign is not None:
        raise refuse(f"it holds {foreign!r}, which slimkit does not write in a {kind.name}")


# -- the writers ---------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _swap(tmp: Path, target: Path, kind: OutputKind | None, hint: str) -> None:
    """Rename ``tmp`` to ``target`` under the lock, keeping the previous ``target`` if anything fails."""
    old, swapped = None, False
    try:
        with _locked(target):
            if kind is not None:  # again, under the lock: the folder may have changed while the output was written
                check_output_dir(target, kind, hint=hint)
            with _signals_deferred():  # a signal now would land between the renames; it arrives after them
                if os.path.lexists(target):
                    old = target.parent / f".{target.name}.old-{_owner_tag()}-{secrets.token_hex(4)}"
                    os.replace(target, old)
                try:
                    os.replace(tmp, target)
                    swapped = True
                except BaseException:
                    if old is not None:
                        os.replace(old, target)  # put the previous output back
                    raise
    finally:
        if swapped and old is not None:  # also when a deferred signal arrives once the renames are done
            _remove(old)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, kind: OutputKind | None = None,
               hint: str = "choose another folder") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it replaces ``target``.

    On an exception (SIGTERM included, see the module docstring) the temporary directory is
    removed and ``target`` is untouched. With ``kind``, an existing ``target`` must be that
    kind of slimkit output holding nothing else (``check_output_dir``), checked before the
    caller writes anything and again just before the swap; else ``OutputFolderError``.
    """
    target = Path(target)
    if kind is not None:
        check_output_dir(target, kind, hint=hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    previous = _install_sigterm()
    terminated = False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))
        try:
            yield tmp
            _apply_umask(tmp)
            _swap(tmp, target, kind, hint)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    except Terminated:
        terminated = True
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            if terminated:  # cleaned up; now end the way SIGTERM ends a process that did not handle it
                os.kill(os.getpid(), signal.SIGTERM)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory (mode from the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory."""
    atomic_write_bytes(path, text.encode("utf-8"))


__all__ = [
    "MODEL_FOLDER", "TOKENIZER_FILES", "OutputFolderError", "OutputKind", "Terminated", "atomic_dir",
    "atomic_write_bytes", "atomic_write_text", "check_output_dir", "current_umask", "read_json_marker",
    "sweep_stale", "terminate_on_sigterm",
]
