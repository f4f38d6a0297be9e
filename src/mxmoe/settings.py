"""Process-wide facts, read once: the environment switches and each device's properties.

A fused-experts call on the decode path costs tens of microseconds of host time; reading a dozen
environment variables and querying the device on every call was a measurable share of it. Both
are read on first use and kept for the process. `refresh()` forgets them (tests that change the
environment call it; the test suite's ``monkeypatch`` does it for them).

Switches (all optional):

| variable | effect |
|---|---|
| ``TRITON_INTERPRET=1`` | Triton kernels run on the CPU in Triton's interpreter |
| ``MXMOE_BACKEND`` | overrides ``backend="auto"`` |
| ``MXMOE_VALIDATE=1`` | the data checks (ids, expert map) also run on GPU data (they synchronise) |
| ``MXMOE_CONFIG`` | a JSON `MoEConfig` forced on every Triton call |
| ``MXMOE_POISON=1`` | kernel outputs start as NaN, so an element never written shows |
| ``MXMOE_DEQUANT_PTX=0`` | the portable nibble conversion instead of the PTX one |
| ``MXMOE_TORCH_ROUTER=1`` | `route` uses torch ops instead of the fused Triton router |
| ``MXMOE_DECODE_PLANES=1`` | the direct decode GEMMs pass the activation as float32 planes |
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["Settings", "DeviceFacts", "current", "device_facts", "generation", "refresh"]


@dataclass(frozen=True)
class Settings:
    interpret: bool
    backend_override: str
    validate: bool
    forced_config: str
    poison: bool
    dequant_ptx: bool
    torch_router: bool
    decode_planes: bool

    @classmethod
    def from_environment(cls) -> "Settings":
        env = os.environ
        return cls(
            interpret=env.get("TRITON_INTERPRET", "0") == "1",
            backend_override=env.get("MXMOE_BACKEND", "").strip(),
            validate=env.get("MXMOE_VALIDATE", "") not in ("", "0"),
            forced_config=env.get("MXMOE_CONFIG", "").strip(),
            poison=env.get("MXMOE_POISON", "0") == "1",
            dequant_ptx=env.get("MXMOE_DEQUANT_PTX", "1") != "0",
            torch_router=env.get("MXMOE_TORCH_ROUTER", "0") == "1",
            decode_planes=env.get("MXMOE_DECODE_PLANES", "0") == "1",
        )


_current: Settings | None = None
_generation = 0


def current() -> Settings:
    """The switches, read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_environment()
    return _current


@dataclass(frozen=True)
class DeviceFacts:
    """What the kernels and the config lookup ask of a device."""

    type: str  # "cuda", "cpu", ...
    name: str  # e.g. "NVIDIA H200"; "" for the CPU
    capability: tuple[int, int]  # (major, minor); (0, 0) off CUDA
    sm_count: int  # multiprocessors; 0 off CUDA
    is_hip: bool  # an AMD GPU through ROCm


@functools.lru_cache(maxsize=None)
def _facts(device: torch.device) -> DeviceFacts:
    if device.type != "cuda":
        return DeviceFacts(device.type, "", (0, 0), 0, False)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return DeviceFacts("cuda", props.name, (props.major, props.minor),
                       props.multi_processor_count, torch.version.hip is not None)


def device_facts(device: torch.device | str) -> DeviceFacts:
    """The device's facts, queried once per process."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _facts(device)


def generation() -> int:
    """A number that changes with every `refresh`: what caches of decisions made from the
    switches (`mxmoe.plans`) key on."""
    return _generation


def refresh() -> None:
    """Forget the switches and the device facts: the next use reads them again."""
    global _current, _generation
    _current = None
    _generation += 1
    _facts.cache_clear()
