"""Helpers shared by the subcommands: the environment header.

Random problems and the relative error live in `mxmoe.testing`; `random_moe` and
`relative_error` are re-exported here only for the modules that still import them from here
(`cli/check.py`, `tune.py`): import them from `mxmoe.testing`.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..testing import random_moe, relative_error  # noqa: F401  (re-exported, see above)


def git_sha() -> str:
    """The checkout's commit; ``MXMOE_GIT_SHA`` where the tree was copied without its .git."""
    if os.environ.get("MXMOE_GIT_SHA"):
        return os.environ["MXMOE_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Device and versions, for table headers and JSON results."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "device": "cpu (" + (platform.processor() or platform.machine()) + ")",
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return info


def header(info: dict) -> str:
    return (
        f"device: {info['device']} | driver: {info['driver']} | CUDA: {info['cuda']} | "
        f"torch: {info['torch']} | Triton: {info['triton']} | git: {info['git_sha']} | "
        f"{info['date']}"
    )
