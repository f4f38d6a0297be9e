"""A safetensors checkpoint opened for reading: which file holds which tensor, and config.json.

Only headers are read when a checkpoint is opened; a tensor's bytes are read when a slice of it
is indexed (``safe_open(...).get_slice``), so a loader reads one layer, or one rank's part of
it, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

__all__ = ["SafetensorsCheckpoint", "INDEX_FILE", "SINGLE_FILE", "CONFIG_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class SafetensorsCheckpoint:
    """``path`` is a directory (``model.safetensors.index.json``, else ``model.safetensors``,
    else every ``*.safetensors`` in it) or one ``.safetensors`` file; ``config.json`` beside it
    is read when present (``.config``, else ``{}``). Use as ``with checkpoint: ...`` to read.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"checkpoint file must be a .safetensors file, got {path}")
            files = [path]
            directory = path.parent
            self._file_of = None
        elif path.is_dir():
            directory = path
            index = path / INDEX_FILE
            if index.is_file():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index}: expected a 'weight_map' object")
                self._file_of = {name: path / f for name, f in weight_map.items()}
                files = sorted(set(self._file_of.values()))
                for f in files:
                    if not f.is_file():
                        raise ValueError(f"{index} names {f.name}, which is not in {path}")
            else:
                single = path / SINGLE_FILE
                files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
                self._file_of = None
                if not files:
                    raise ValueError(f"no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors in {path}")
        else:
            raise ValueError(f"checkpoint path {path} does not exist")
        self.path = path
        if self._file_of is None:
            self._file_of = {}
            for f in files:
                with _open(f) as handle:
                    for name in handle.keys():
                        self._file_of[name] = f
        config_path = directory / CONFIG_FILE
        self.config: dict = _read_json(config_path) if config_path.is_file() else {}
        self._handles: dict[Path, object] = {}
        self._stack: contextlib.ExitStack | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def slice(self, name: str):
        """The lazy ``PySafeSlice`` of ``name`` (``get_shape``, ``get_dtype``, ``[...]``)."""
        if name not in self._file_of:
            raise ValueError(f"tensor {name!r} is not in the checkpoint {self.path}")
        f = self._file_of[name]
        if f not in self._handles:
            if self._stack is None:
                raise RuntimeError(f"{type(self).__name__}.slice needs `with checkpoint:`")
            self._handles[f] = self._stack.enter_context(_open(f))
        return self._handles[f].get_slice(name)

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(safetensors dtype, shape)`` of ``name``, from the header only."""
        sl = self.slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as exc:  # neither ValueError nor OSError: callers could not catch it
        raise ValueError(f"cannot read the safetensors file {path}: {exc}") from exc


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
