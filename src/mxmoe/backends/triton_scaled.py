"""`backend="triton_scaled"`: the same fused MoE with `tl.dot_scaled` as the inner product."""

from __future__ import annotations

import torch

from ._triton_common import triton_unavailable_reason
from .base import Backend, MoEArgs


class TritonScaledBackend(Backend):
    name = "triton_scaled"
    description = "Triton fused MoE with tl.dot_scaled(bf16/fp16 x e2m1) as the inner product"
    keeps_weights_packed = True
    needs_probe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return triton_unavailable_reason(device)

    def run(self, args: MoEArgs) -> torch.Tensor:
        from ..kernels.fused_moe import fused_moe

        return fused_moe(args, mode="scaled")
