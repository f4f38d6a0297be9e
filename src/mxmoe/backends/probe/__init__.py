"""The capability probe: does a backend give the reference's answer on this device?

Each backend with ``needs_probe`` is run once on a tiny problem in a **child process**, because
a compiler or driver crash (segfault, abort, hang) must not take the caller down. The parts:

- `result`: the verdict (`ProbeResult`) and how one child run is judged;
- `watch`: starting a child, reading its output, killing it at its deadline;
- `key`: what a verdict depends on (device, driver, versions, kernel sources);
- `child`: the child program (``python -m mxmoe.backends.probe``);
- this module: `probe`, which asks the process memo, then the cache file, then a child.

Verdicts are kept in one file (`cache_path`, shared code in `mxmoe.cache`). When several
processes start at once (the ranks of one job), one runs the child while the others wait on a
lock and then read its verdict: one child per verdict and machine, and every process the same
answer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ... import cache
from ...cache import CACHE_DIR_ENV, cache_dir
from ...devices import driver_version
from . import watch
from .child import PROBE_SHAPE, check_backend, main
from .key import PROBED_SOURCES, device_fingerprint, probe_key, source_digest, with_index
from .result import RESULT_MARKER, TOLERANCE, ProbeResult, judge
from .watch import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, child_command, probe_timeout, run_child

__all__ = [
    "CACHE_DIR_ENV", "CACHE_FILE_NAME", "DEFAULT_TIMEOUT_S", "PROBED_SOURCES", "PROBE_SHAPE",
    "RESULT_MARKER", "TIMEOUT_ENV", "TOLERANCE", "ProbeResult", "cache_dir", "cache_path",
    "check_backend", "child_command", "device_fingerprint", "driver_version", "forget",
    "judge", "main", "probe", "probe_key", "probe_timeout", "run_child", "source_digest",
]

CACHE_FILE_NAME = "probe.json"
#: Bump when the layout of the cache file changes; other formats are ignored and rewritten.
CACHE_FORMAT = 1
#: Keys of older kernel sources pile up while developing; keep the most recent few.
MAX_CACHE_ENTRIES = 16
#: A cached timeout is believed this long, then probed again: a machine busy compiling (eight
#: ranks starting at once) can time a healthy backend out, and `auto` would then avoid it.
TIMEOUT_RETRY_S = 24 * 3600.0
#: Seconds a process waits for another one's child beyond that child's own timeout.
LOCK_SLACK_S = 30.0

_LOCK = threading.Lock()
#: (key id, backend) -> verdict: never probe twice in one process.
_MEMO: dict[tuple[str, str], ProbeResult] = {}


def _file() -> cache.EntryFile:
    return cache.EntryFile(CACHE_FILE_NAME, CACHE_FORMAT, MAX_CACHE_ENTRIES,
                           "backend probe cache")


def cache_path() -> Path:
    return _file().path


def probe(backend: str, device: torch.device | str, *, timeout: float | None = None) -> ProbeResult:
    """The verdict on ``backend`` for the CUDA ``device``: from memory, the cache file, or a child.

    Never raises for a failing backend: the failure is the verdict.
    """
    device = with_index(torch.device(device))
    key_id, key = probe_key(device)
    with _LOCK:  # two threads asking at once must not both start a child
        result = _MEMO.get((key_id, backend))
        if result is not None:
            return result
        result = _read_cached(key_id, key, backend)
        if result is None:
            timeout = probe_timeout() if timeout is None else timeout
            # One child per verdict on this machine: the others wait here, then read it.
            run_lock = cache_path().with_name(CACHE_FILE_NAME + ".child")
            with cache.file_lock(run_lock, timeout + watch.EXIT_GRACE_S + LOCK_SLACK_S):
                result = _read_cached(key_id, key, backend)
                if result is None:
                    result = run_child(backend, device, timeout=timeout,
                                       command=child_command(backend, str(device)))
                    _write_cached(key_id, key, result)
        _MEMO[(key_id, backend)] = result
        return result


def forget(*, cache_file: bool = True) -> None:
    """Drop this process's verdicts and (by default) the cache file: the next use re-probes."""
    with _LOCK:
        _MEMO.clear()
        if cache_file:
            _file().remove()


def _read_cached(key_id: str, key: dict, backend: str) -> ProbeResult | None:
    entry = _file().entry(key_id, key)
    results = entry.get("results") if entry is not None else None
    if not isinstance(results, dict) or backend not in results:
        return None
    try:
        result = ProbeResult.from_dict(results[backend])
    except ValueError:
        return None
    if result.timed_out and time.time() - result.probed_at > TIMEOUT_RETRY_S:
        return None
    return result


def _write_cached(key_id: str, key: dict, result: ProbeResult) -> None:
    """Add ``result`` to the cache file (atomically, under its lock); warn, never raise."""

    def add(entry: dict) -> None:
        if not isinstance(entry.get("results"), dict):
            entry["results"] = {}
        entry["results"][result.backend] = result.to_dict()

    _file().update(key_id, key, add)
