"""Where a loader puts the weights, checked before any byte is read."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a `torch.device` (CPU when None); ValueError in mxmoe's words when it is a
    CUDA device this torch cannot use (torch's own message is a bare AssertionError)."""
    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a string like 'cuda:0', got "
                         f"{device!r} ({exc})") from None
    if device.type == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else \
                f"built for CUDA {torch.version.cuda}, but no CUDA GPU is visible"
            raise ValueError(
                f"device={str(device)!r}: this torch ({torch.__version__}) is {build}; pass "
                f"device='cpu' (the weights then run on the torch reference backend), or "
                f"install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    return device
