"""Helpers shared by the subcommands: the environment header and random MoE problems."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch


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


@dataclass
class RandomMoE:
    """A random MoE problem with MXFP4 weights, for check and bench."""

    hidden_states: torch.Tensor
    w13: object
    w2: object
    w13_bias: torch.Tensor
    w2_bias: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


def random_moe(
    num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int,
    dtype: torch.dtype, device: torch.device | str, seed: int = 0,
) -> RandomMoE:
    from ..format import quantize_mxfp4
    from ..routing import route

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    w13 = quantize_mxfp4(randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5))
    w2 = quantize_mxfp4(randn(num_experts, hidden, inter, scale=inter**-0.5))
    weights, ids = route(randn(num_tokens, num_experts), top_k)
    return RandomMoE(
        hidden_states=randn(num_tokens, hidden).to(dtype),
        w13=w13,
        w2=w2,
        w13_bias=randn(num_experts, 2 * inter, scale=0.1).to(dtype),
        w2_bias=randn(num_experts, hidden, scale=0.1).to(dtype),
        topk_weights=weights,
        topk_ids=ids,
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (NaN anywhere in out counts as infinite)."""
    out = out.float()
    ref = ref.float()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("inf")
    denom = ref.abs().max().clamp_min(1e-30)
    return float((out - ref).abs().nan_to_num(0.0).max() / denom)
