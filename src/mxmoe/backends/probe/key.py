"""The probe's cache key: everything a verdict on a device depends on.

The device (name, capability, driver, runtime, from `mxmoe.devices`), the torch, Triton and
mxmoe versions, a digest of the sources the kernels depend on (`PROBED_SOURCES`: editing a
kernel re-probes) and the switch between triton_dequant's two nibble conversions.
"""

from __future__ import annotations

import os

import torch

from ... import cache, devices, settings

#: What a kernel's answer depends on, relative to the package: editing any of these re-probes.
PROBED_SOURCES = ("kernels", "backends", "routing.py", "format.py", "activations.py",
                  "constants.py")

_KEYS: dict[tuple[str, str], tuple[str, dict]] = {}


def probe_key(device: torch.device) -> tuple[str, dict]:
    """(short id, what it hashes) for verdicts on the CUDA ``device``."""
    return _key_of(str(with_index(device)), os.environ.get("MXMOE_DEQUANT_PTX", "1"))


def _key_of(device: str, dequant_ptx: str) -> tuple[str, dict]:
    if (device, dequant_ptx) not in _KEYS:  # sources and driver are read once a process
        import mxmoe

        key = {
            **device_fingerprint(torch.device(device)),
            "torch": torch.__version__,
            "triton": devices.triton_version(),
            "mxmoe": mxmoe.__version__,
            "sources": source_digest(),
            "dequant_ptx": dequant_ptx,
        }
        _KEYS[(device, dequant_ptx)] = (cache.key_id(key), key)
    return _KEYS[(device, dequant_ptx)]


def device_fingerprint(device: torch.device) -> dict:
    """The CUDA device's name, compute capability, driver and CUDA (or HIP) runtime versions."""
    found = settings.device_facts(with_index(device))
    major, minor = found.capability
    stack = devices.software_stack()
    return {"device": found.name, "capability": f"{major}.{minor}", "driver": stack["driver"],
            "runtime": stack["runtime"]}


def source_digest() -> str:
    """sha256 of the `PROBED_SOURCES` (.py and .json files), read once a process."""
    return cache.source_digest(PROBED_SOURCES)


def with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
