"""Facts about a device that do not change while a process runs, read once per device.

`facts(device)` gives a `DeviceFacts` (name, compute capability, SM count, driver and library
versions); the first call for a device asks torch and the driver, later calls return the same
object. `refresh()` forgets them (tests that fake a device, or a process that wants to re-read).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DeviceFacts:
    """What kernel choices depend on about one device (and the software that drives it)."""

    #: "NVIDIA H100 80GB HBM3"; "cpu" for the CPU.
    name: str
    #: (major, minor) for a CUDA device, None otherwise.
    capability: tuple[int, int] | None
    #: Streaming multiprocessors (CUDA), or CPU cores.
    sm_count: int
    #: Kernel driver version ("580.95.05"), "unknown", or "" on the CPU.
    driver: str = ""
    #: CUDA (or HIP) runtime torch was built with; "" on the CPU.
    runtime: str = ""
    torch: str = torch.__version__
    triton: str = ""
    #: torch's device type: "cuda" or "cpu".
    kind: str = "cuda"

    @property
    def slug(self) -> str:
        """The name as a file name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
        return device_slug(self.name)

    @property
    def family(self) -> str | None:
        """'sm_90' for compute capability 9.0: the parts whose kernels compile alike."""
        if self.capability is None:
            return None
        return f"sm_{self.capability[0]}{self.capability[1]}"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


_FACTS: dict[str, DeviceFacts] = {}


def facts(device: torch.device | str | None = None) -> DeviceFacts:
    """The facts of ``device`` (default: the current CUDA device), read once a process."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    found = _FACTS.get(key)
    if found is None:
        found = _FACTS[key] = _read(device)
    return found


def refresh() -> None:
    """Forget every device's facts: the next `facts` call reads them again."""
    _FACTS.clear()


def _read(device: torch.device) -> DeviceFacts:
    if device.type != "cuda":
        return DeviceFacts(name=device.type, capability=None, sm_count=os.cpu_count() or 1,
                           triton=triton_version(), kind=device.type)
    props = torch.cuda.get_device_properties(device.index)
    return DeviceFacts(
        name=props.name,
        capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        driver=driver_version(device.index),
        runtime=torch.version.cuda or getattr(torch.version, "hip", None) or "unknown",
        triton=triton_version(),
    )


def driver_version(index: int = 0) -> str:
    """The kernel driver's version (e.g. 580.95.05), without initialising anything new."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__
