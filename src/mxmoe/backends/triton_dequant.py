"""`backend="triton_dequant"`: the fused MoE kernel that dequantizes MXFP4 tiles in its K loop."""

from __future__ import annotations

import torch

from ._triton_common import triton_unavailable_reason
from .base import Backend, MoEArgs


class TritonDequantBackend(Backend):
    name = "triton_dequant"
    description = "Triton fused MoE, MXFP4 tiles dequantized to bf16/fp16 inside the GEMM loop"
    keeps_weights_packed = True
    needs_probe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return triton_unavailable_reason(device)

    def run(self, args: MoEArgs) -> torch.Tensor:
        from ..kernels.fused_moe import fused_moe

        return fused_moe(args, mode="dequant")
