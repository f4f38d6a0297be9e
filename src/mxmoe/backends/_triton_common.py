"""What the Triton backends share: whether Triton can run on a device at all."""

from __future__ import annotations

import os

import torch


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (static checks only; the probe runs them)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if interpreting:
            return "TRITON_INTERPRET=1 is set: Triton runs on the CPU only"
        return None
    if device.type == "cpu":
        if interpreting:
            return None
        return "no GPU: Triton kernels run on the CPU only under TRITON_INTERPRET=1"
    return f"Triton does not run on {device.type} devices"
