"""Backends: one interface (`Backend`), several implementations, chosen by name or by `auto`.

Each backend lives in its own module and is imported only when first used, so that
``import mxmoe`` never compiles or imports Triton code. Whether a backend is usable is decided
by its static check (`Backend.unavailable_reason`) and then, for backends with ``needs_probe``
on a CUDA device, by running it (`mxmoe.backends.probe`) — never by a list of device names.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import settings
from .base import Backend

if TYPE_CHECKING:
    from ..layouts import Layout
    from ..problem import MoEProblem
    from .probe import ProbeResult

__all__ = [
    "fastest_layout",
    "Backend",
    "BackendStatus",
    "BACKEND_NAMES",
    "backend_status",
    "backend_statuses",
    "backends",
    "forget_decisions",
    "get_backend",
    "reprobe",
    "resolve_backend",
]

#: name -> (module, factory): the one registry. Order is the order `mxmoe info` prints. A
#: factory is a class or a function that returns the backend; imported on first use.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("mxmoe.backends.torch_backend", "TorchBackend"),
    "triton_dequant": ("mxmoe.backends.triton", "triton_dequant"),
    "triton_scaled": ("mxmoe.backends.triton", "triton_scaled"),
    "bf16": ("mxmoe.backends.triton", "bf16"),
}

BACKEND_NAMES = tuple(_REGISTRY)
#: Overrides ``backend="auto"`` (not an explicit name) when set.
BACKEND_ENV = "MXMOE_BACKEND"
#: What `auto` tries on a GPU when no tuned table prefers another, best first. All keep the
#: weights packed; ``bf16`` (a dense copy, 3.8x the memory) runs only when asked for by name.
_AUTO_ORDER_GPU = ("triton_dequant", "triton_scaled", "torch")
#: Elsewhere the reference is the only fast path (the Triton interpreter is for tests).
_AUTO_ORDER_OTHER = ("torch",)

_instances: dict[str, Backend] = {}
#: (name, device, TRITON_INTERPRET) -> BackendStatus; see `backend_status`.
_STATUS_MEMO: dict[tuple, "BackendStatus"] = {}
#: (device, TRITON_INTERPRET, problem sizes) -> the name `auto` chose.
_AUTO_MEMO: dict[tuple, str] = {}
#: Token counts vary call to call; past this many remembered choices, start over.
_AUTO_MEMO_MAX = 4096


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {_known_names()}")
    if name not in _instances:
        module, cls = _REGISTRY[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def _known_names() -> list[str]:
    return ["auto", *_REGISTRY]


@dataclass(frozen=True)
class BackendStatus:
    """Whether one backend is usable on one device, and how that was decided."""

    name: str
    usable: bool
    #: Why not; '' when usable.
    reason: str
    #: The probe's verdict; None when no probe ran (static check failed, or none needed here).
    probe: "ProbeResult | None" = None


def backend_status(name: str, device: torch.device | str) -> BackendStatus:
    """Static check first; then, for ``needs_probe`` backends on a CUDA device, the probe.

    Decided once per (backend, device, ``TRITON_INTERPRET``) a process: `fused_experts` asks on
    every call, and a verdict does not change while the process runs.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    key = (name, device, settings.current().interpret)
    status = _STATUS_MEMO.get(key)
    if status is None:
        status = _STATUS_MEMO[key] = _decide_status(name, device)
    return status


def _decide_status(name: str, device: torch.device) -> BackendStatus:
    backend = get_backend(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        return BackendStatus(name, False, reason)
    if backend.needs_probe and device.type == "cuda":
        from . import probe  # imported late: `python -m mxmoe.backends.probe` must load it first

        verdict = probe.probe(name, device)
        return BackendStatus(name, verdict.usable, verdict.reason, verdict)
    return BackendStatus(name, True, "")


def reprobe() -> None:
    """Forget every verdict and `auto` choice, in memory and on disk: the next use probes again."""
    from . import probe

    probe.forget()
    forget_decisions()


def forget_decisions() -> None:
    """Forget this process's statuses and `auto` choices (not the probe's own memo or file)."""
    _STATUS_MEMO.clear()
    _AUTO_MEMO.clear()
    _warned_reference_on.clear()


def backend_statuses(device: torch.device | str | None = None) -> list[BackendStatus]:
    """`backend_status` of every backend, in registry order (probes what is not yet known)."""
    device = torch.device(device) if device is not None else _default_device()
    return [backend_status(name, device) for name in _REGISTRY]


def backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend name: (usable here, why not — or '' when usable).

    On a CUDA device this runs the capability probe for each Triton backend not yet probed for
    this device and these versions (a child process each; cached on disk).
    """
    return {s.name: (s.usable, s.reason) for s in backend_statuses(device)}


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_backend(
    name: str, device: torch.device | str, problem: "MoEProblem | None" = None,
    layout: str | None = None,
) -> Backend:
    """Turn ``name`` (or ``auto``, or the ``MXMOE_BACKEND`` override of ``auto``) into a backend.

    Args:
        name: a backend name or ``"auto"``.
        device: where the call runs.
        problem: the call's sizes; `auto` looks up the fastest backend for its size class.
        layout: the weights' layout name; `auto` only picks a backend that reads it (a tuned
            table may call tl.dot_scaled fastest, which reads only the plain layout).

    Raises:
        ValueError: an unknown name (listing the known ones), or a backend not usable here
            (saying why and listing the usable ones).
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    origin = ""
    if name == "auto":
        override = settings.current().backend_override
        if override:
            name, origin = override, f" (from {BACKEND_ENV})"
    if name == "auto":
        return get_backend(_auto_choice(device, problem, layout))
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}{origin}; known backends: {_known_names()}")
    status = backend_status(name, device)
    if not status.usable:
        usable = [s.name for s in backend_statuses(device) if s.usable]
        raise ValueError(
            f"backend {name!r}{origin} is not usable on {device}: {status.reason}; "
            f"usable here: {usable}"
        )
    return get_backend(name)


def _auto_choice(device: torch.device, problem: "MoEProblem | None",
                 layout: str | None = None) -> str:
    """`_decide_auto`, remembered per device, problem size and weight layout."""
    sizes = None if problem is None else (
        problem.num_tokens, problem.hidden, problem.intermediate, problem.num_local_experts,
        problem.top_k,
    )
    key = (device, settings.current().interpret, sizes, layout)
    name = _AUTO_MEMO.get(key)
    if name is None:
        if len(_AUTO_MEMO) >= _AUTO_MEMO_MAX:
            _AUTO_MEMO.clear()
        name = _AUTO_MEMO[key] = _decide_auto(device, problem, layout)
    return name


def _decide_auto(device: torch.device, problem: "MoEProblem | None",
                 layout: str | None = None) -> str:
    """The first usable of: the tuned table's choice for this size class, then the defaults;
    of those that read ``layout`` when it is given."""
    order = _AUTO_ORDER_GPU if device.type == "cuda" else _AUTO_ORDER_OTHER
    if layout is not None:
        order = tuple(n for n in order if layout in get_backend(n).layouts)
    preferred = _tuned_preference(device, problem) if device.type == "cuda" else None
    # A table entry naming an unknown or dense backend is ignored, not obeyed: auto never
    # trades 3.8x the memory for speed, and a stale table must not break inference.
    if (preferred in _REGISTRY and get_backend(preferred).keeps_weights_packed
            and (layout is None or layout in get_backend(preferred).layouts)):
        order = (preferred, *(n for n in order if n != preferred))
    reasons = []
    for name in order:
        status = backend_status(name, device)
        if status.usable:
            if name == "torch" and device.type == "cuda":
                _warn_reference_on_gpu(device, reasons)
            return name
        reasons.append(f"{name}: {status.reason}")
    raise ValueError(f"backend='auto': no backend is usable on {device} ({'; '.join(reasons)})")


_warned_reference_on: set[torch.device] = set()


def _warn_reference_on_gpu(device: torch.device, reasons: list[str]) -> None:
    """Say once per device that `auto` fell back to the slow reference, and why."""
    if device in _warned_reference_on:
        return
    _warned_reference_on.add(device)
    warnings.warn(
        f"mxmoe: backend='auto' runs the pure-torch reference on {device} because no Triton "
        f"backend is usable ({'; '.join(reasons)}); `mxmoe info` shows the probe table",
        RuntimeWarning,
        stacklevel=6,  # the caller of fused_experts
    )


def _tuned_preference(device: torch.device, problem: "MoEProblem | None") -> str | None:
    """What the tuned data (user cache, this device's table, its family's) calls fastest for
    this device and size class, if it says."""
    if problem is None:
        return None
    from ..kernels.configs import fastest_backend

    return fastest_backend(settings.device_facts(device), problem.num_tokens, problem.hidden,
                           problem.intermediate, problem.num_local_experts, problem.top_k)


def fastest_layout(device: torch.device | str, backend: str = "auto") -> "Layout":
    """The layout whose kernels run fastest for ``backend`` on ``device`` (what a layer built
    with ``layout="auto"`` converts to, once): MMA_LANES for the dequantizing Triton kernels
    (``auto`` or ``triton_dequant``) on an NVIDIA GPU of compute capability 9.0 or newer, where
    the prefill GEMMs (which read only MMA_LANES) run past the decode range and the decode GEMMs
    read it as fast as the plain layout (benchmarks/NOTES.md section 17); the plain layout
    everywhere else (tl.dot_scaled reads only it; the general kernel reads MMA_LANES 1.3-1.8x
    slower; the torch backends convert any layout)."""
    from ..layouts import MMA_LANES, PLAIN

    device = torch.device(device)
    switches = settings.current()
    if backend == "auto" and switches.backend_override:
        backend = switches.backend_override  # what auto will resolve to
    if backend not in ("auto", "triton_dequant") or device.type != "cuda":
        return PLAIN
    if switches.interpret:
        return PLAIN
    facts = settings.device_facts(device)
    return MMA_LANES if not facts.is_hip and facts.capability >= (9, 0) else PLAIN
