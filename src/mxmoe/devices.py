"""The software a device runs under, read once a process: driver, CUDA runtime, torch, Triton.

The device itself (name, capability, SM count) is `mxmoe.settings.device_facts`; what is here
completes it for cache keys (a tuned timing or a probe verdict holds for one driver and one
set of libraries). `refresh()` forgets it (tests).
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import torch


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def family(capability: tuple[int, int]) -> str | None:
    """'sm_90' for compute capability (9, 0): the parts whose kernels compile alike; None off
    CUDA (capability (0, 0))."""
    if not capability or tuple(capability) == (0, 0):
        return None
    return f"sm_{capability[0]}{capability[1]}"


@functools.lru_cache(maxsize=None)
def software_stack() -> dict[str, str]:
    """{"driver", "runtime", "torch", "triton"} versions, read once a process."""
    return {
        "driver": driver_version(),
        "runtime": torch.version.cuda or getattr(torch.version, "hip", None) or "unknown",
        "torch": torch.__version__,
        "triton": triton_version(),
    }


def refresh() -> None:
    software_stack.cache_clear()


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
