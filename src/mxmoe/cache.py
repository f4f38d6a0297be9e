"""The user cache directory and its JSON files: written atomically, under a lock, keyed entries.

Both the backend probe (``probe.json``) and tuning (``tuned.json``) keep one file each here.
A file holds ``{"format": N, "entries": {key_id: {"key": {...}, "written": t, ...}}}``: each
entry belongs to one key (device, driver, versions, source digest), so a machine whose drivers
or kernels change keeps its old entries apart, and only the newest few are kept.

Several processes (ranks of one job) may start at once: a writer takes an exclusive
``fcntl.flock`` on ``<file>.lock``, re-reads the file, changes it and replaces it with
``os.replace``, so a reader sees the old file or the new one, never half of one, and no update
is lost. A damaged file (bad JSON, another format) is ignored with a warning and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no lock; files stay atomic)
    fcntl = None

CACHE_DIR_ENV = "MXMOE_CACHE_DIR"
#: Seconds between attempts to take a busy lock.
_LOCK_POLL_S = 0.05

_warned: set[tuple[str, str]] = set()


def cache_dir() -> Path:
    """``$MXMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mxmoe``, else ``~/.cache/mxmoe``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mxmoe"
    try:
        return Path.home() / ".cache" / "mxmoe"
    except RuntimeError:  # no home directory (some containers)
        return Path(tempfile.gettempdir()) / "mxmoe-cache"


def warn_once(path: Path, what: str, message: str) -> None:
    """A RuntimeWarning about ``path``, once per (path, kind of problem) and process."""
    if (str(path), what) in _warned:
        return
    _warned.add((str(path), what))
    warnings.warn(f"mxmoe: {message}", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``<path>.lock`` (created if needed) for the ``with`` block.

    Yields True when the lock is held, False when it could not be had: the directory is not
    writable, or another process held it past ``timeout`` seconds (None: wait as long as it
    takes). The lock is the kernel's (``flock``): a holder that dies releases it.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        held = _acquire(fd, timeout)
        try:
            yield held
        finally:
            if held and fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, timeout: float | None) -> bool:
    if fcntl is None:
        return True
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    give_up_at = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= give_up_at:
                return False
            time.sleep(_LOCK_POLL_S)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class EntryFile:
    """One JSON file of keyed entries in the cache directory (see the module docstring).

    Args:
        name: the file name inside `cache_dir()` (read anew on each use: tests move it).
        file_format: the layout version; a file of another version is ignored and rewritten.
        max_entries: how many keys to keep (the most recently written).
        what: how warnings name the file ("backend probe cache").
    """

    def __init__(self, name: str, file_format: int, max_entries: int, what: str):
        self.name = name
        self.file_format = file_format
        self.max_entries = max_entries
        self.what = what

    @property
    def path(self) -> Path:
        return cache_dir() / self.name

    def entries(self) -> dict:
        """All entries; {} when the file is missing, or damaged (then with a warning)."""
        path = self.path
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            warn_once(path, "unreadable", f"cannot read the {self.what} {path} ({exc}); "
                                          "it is ignored")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # bad JSON and bad UTF-8
            self._warn_damaged(path, f"not JSON: {exc}")
            return {}
        if not isinstance(data, dict) or data.get("format") != self.file_format:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            self._warn_damaged(path, f"format {found!r}, expected {self.file_format}")
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            self._warn_damaged(path, "no 'entries' object")
            return {}
        return entries

    def entry(self, key_id: str, key: dict) -> dict | None:
        """The entry of ``key_id`` if it was written for exactly ``key``, else None."""
        entry = self.entries().get(key_id)
        if isinstance(entry, dict) and entry.get("key") == key:
            return entry
        return None

    def update(self, key_id: str, key: dict, change: Callable[[dict], None],
               timeout: float | None = 60.0) -> bool:
        """Apply ``change`` to the entry of ``key`` (a fresh one if missing) and write the file.

        Under the file's lock: re-read, change, trim to the newest `max_entries`, replace.
        Returns False (with one warning, never an exception) when the file cannot be written.
        """
        path = self.path
        with file_lock(path, timeout) as held:
            if not held and path.parent.is_dir() and os.access(path.parent, os.W_OK):
                warn_once(path, "lock", f"waited {timeout:g} s for the lock of the {self.what} "
                                        f"{path}; writing without it")
            entries = self.entries()
            entry = entries.get(key_id)
            if not isinstance(entry, dict) or entry.get("key") != key:
                entry = {"key": key}
            change(entry)
            entry["written"] = time.time()
            entries[key_id] = entry
            newest = sorted(entries, key=lambda k: _written(entries[k]), reverse=True)
            kept = {k: entries[k] for k in newest[: self.max_entries]}
            text = json.dumps({"format": self.file_format, "entries": kept}, indent=1,
                              sort_keys=True)
            try:
                atomic_write_text(path, text)
            except OSError as exc:
                warn_once(path, "unwritable",
                          f"cannot write the {self.what} {path} ({exc}); set {CACHE_DIR_ENV} "
                          "to a writable directory")
                return False
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _warn_damaged(self, path: Path, why: str) -> None:
        warn_once(path, "damaged", f"the {self.what} {path} is damaged ({why}); it is ignored "
                                   "and will be rewritten")


def _written(entry) -> float:
    value = entry.get("written") if isinstance(entry, dict) else None
    return value if isinstance(value, (int, float)) else 0.0


def key_id(key: dict) -> str:
    """A short stable id of a key (its sha256 over sorted JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


_DIGESTS: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}


def source_digest(names: tuple[str, ...], suffixes: tuple[str, ...] = (".py", ".json")) -> str:
    """sha256 of the package's files ``names`` (directories: their files ending in
    ``suffixes``), read once a process: a key holding it changes when one of them is edited."""
    if (names, suffixes) not in _DIGESTS:
        package = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for path in _files(package, names, suffixes):
            h.update(path.relative_to(package).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
        _DIGESTS[names, suffixes] = h.hexdigest()[:16]
    return _DIGESTS[names, suffixes]


def _files(package: Path, names: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    files = []
    for name in names:
        path = package / name
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [p for p in found if p.suffix in suffixes and p.is_file()]
    return files
