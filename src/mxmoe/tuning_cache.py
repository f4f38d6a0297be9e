"""The user's tuned configs: what `mxmoe tune` and first-use tuning (`mxmoe.autotune`) found
on this machine, kept in ``tuned.json`` in the user cache (`mxmoe.cache.cache_dir`).

An entry holds one table per device and software stack: it is keyed by the device (name,
capability), the driver, the CUDA runtime, torch, Triton and a digest of the kernel sources,
so a driver update or an edited kernel does not reuse timings that no longer hold. A table has
the shape of a shipped one: ``{"configs": {backend: {"H.._I.._E.._k..": {"M": config}}},
"fastest": {problem: {"M": backend}}}``. `mxmoe.kernels.configs.select` reads it first.
"""

from __future__ import annotations

from . import cache, devices
from .settings import DeviceFacts

FILE_NAME = "tuned.json"
FILE_FORMAT = 1
MAX_ENTRIES = 16
#: The sources tuned timings depend on (relative to the package; .py files only: the shipped
#: tables are data, not kernels).
TUNED_SOURCES = ("kernels",)

_TABLES: dict[DeviceFacts, dict] = {}


def _file() -> cache.EntryFile:
    return cache.EntryFile(FILE_NAME, FILE_FORMAT, MAX_ENTRIES, "tuning cache")


def key_of(facts: DeviceFacts) -> tuple[str, dict]:
    """(id, key) of the tuned entry for ``facts`` and this software stack."""
    key = {
        "device": facts.name,
        "capability": list(facts.capability),
        **devices.software_stack(),
        "sources": cache.source_digest(TUNED_SOURCES, (".py",)),
    }
    return cache.key_id(key), key


def table(facts: DeviceFacts) -> dict:
    """This device's tuned table ({} if none), read from the file once a process."""
    found = _TABLES.get(facts)
    if found is None:
        entry = _file().entry(*key_of(facts))
        found = _TABLES[facts] = _valid_table(entry or {}, warn=True)
    return found


def record(facts: DeviceFacts, backend: str, problem: str, num_tokens: int, config: dict,
           *, fastest: str | None = None) -> bool:
    """Store ``config`` for (backend, problem, M) and, if given, which backend is fastest there.

    Written under the file's lock, atomically; False (with a warning) when it cannot be.
    """
    def add(entry: dict) -> None:
        table = _valid_table(entry)
        table["configs"].setdefault(backend, {}).setdefault(problem, {})[str(num_tokens)] = config
        if fastest is not None:
            table["fastest"].setdefault(problem, {})[str(num_tokens)] = fastest
        entry.update(table)

    ok = _file().update(*key_of(facts), add)
    forget()
    return ok


def forget() -> None:
    """Drop the tables read by this process (the next `table` call reads the file again)."""
    _TABLES.clear()
    from .kernels import configs

    configs.clear_memo()


def path():
    return _file().path


def _valid_table(entry: dict, *, warn: bool = False) -> dict:
    """The entry's configs and fastest-backend maps; a part that is not a map is dropped (with
    a warning when ``warn``: the file parsed, but this device's entry in it is damaged)."""
    configs = entry.get("configs")
    fastest = entry.get("fastest")
    damaged = [name for name, part in (("configs", configs), ("fastest", fastest))
               if part is not None and not isinstance(part, dict)]
    if warn and damaged:
        cache.warn_once(path(), "entry", f"this device's entry in the tuning cache {path()} is "
                        f"damaged ({', '.join(damaged)} not a map); that part is ignored")
    return {"configs": configs if isinstance(configs, dict) else {},
            "fastest": fastest if isinstance(fastest, dict) else {}}
