"""Backends: one interface (`Backend`), several implementations, chosen by name or by `auto`.

Each backend lives in its own module and is imported only when first used, so that
``import mxmoe`` never compiles or imports Triton code.
"""

from __future__ import annotations

import importlib
import os

import torch

from .base import Backend, MoEArgs

__all__ = ["Backend", "MoEArgs", "BACKEND_NAMES", "get_backend", "resolve_backend", "backends"]

#: name -> (module, class). Order is the order `mxmoe info` prints.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("mxmoe.backends.torch_backend", "TorchBackend"),
    "triton_dequant": ("mxmoe.backends.triton_dequant", "TritonDequantBackend"),
    "triton_scaled": ("mxmoe.backends.triton_scaled", "TritonScaledBackend"),
    "bf16": ("mxmoe.backends.bf16", "BF16Backend"),
}

BACKEND_NAMES = tuple(_REGISTRY)
_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {['auto', *_REGISTRY]}")
    if name not in _instances:
        module, cls = _REGISTRY[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend name: (usable here, why not — or '' when usable)."""
    device = torch.device(device) if device is not None else _default_device()
    table = {}
    for name in _REGISTRY:
        reason = get_backend(name).unavailable_reason(device)
        table[name] = (reason is None, reason or "")
    return table


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Turn ``name`` (or ``auto``, or the ``MXMOE_BACKEND`` override of ``auto``) into a backend."""
    if name == "auto":
        name = os.environ.get("MXMOE_BACKEND", "") or "auto"
    if name == "auto":
        # Until the probe and the tuned tables decide: the inline-dequant kernel on GPUs.
        name = "triton_dequant" if device.type == "cuda" else "torch"
    backend = get_backend(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        usable = [n for n, (ok, _) in backends(device).items() if ok]
        raise ValueError(f"backend {name!r} is not usable on {device}: {reason}; usable: {usable}")
    return backend
