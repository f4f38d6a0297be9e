"""Helpers for tests: random MoE problems and error metrics."""

from __future__ import annotations

import torch

import mxmoe


def make_moe(m, h, i, e, k, *, dtype=torch.float32, device="cpu", seed=0, bias=True,
             e_global=None):
    """Random MXFP4 MoE problem. Returns a dict of fused_experts keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    e_global = e_global or e

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    w13 = mxmoe.quantize_mxfp4(randn(e, 2 * i, h, scale=h**-0.5)).to(device)
    w2 = mxmoe.quantize_mxfp4(randn(e, h, i, scale=i**-0.5)).to(device)
    weights, ids = mxmoe.route(randn(m, e_global), k)
    return dict(
        hidden_states=randn(m, h).to(dtype).to(device),
        w13=w13,
        w2=w2,
        topk_weights=weights.to(device),
        topk_ids=ids.to(device),
        w13_bias=randn(e, 2 * i, scale=0.1).to(dtype).to(device) if bias else None,
        w2_bias=randn(e, h, scale=0.1).to(dtype).to(device) if bias else None,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalized max error: max|out - ref| / max|ref|; NaN in out counts as infinite."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def rms_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalized RMS error: ||out - ref|| / ||ref||."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_expert_map(num_global: int, num_local: int, generator: torch.Generator) -> torch.Tensor:
    """int32 expert map: ``num_local`` random global experts numbered 0..num_local-1, the rest
    remote (-1)."""
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    chosen = torch.randperm(num_global, generator=generator)[:num_local]
    expert_map[chosen] = torch.arange(num_local, dtype=torch.int32)
    return expert_map
