"""`backend="torch"`: the float32 reference, on any device and any weight layout."""

from __future__ import annotations

import torch

from ..problem import MoECall
from ..reference import reference_experts
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    description = "pure-torch float32 reference (any device; the specification)"
    keeps_weights_packed = True  # dequantizes one expert at a time, keeps nothing

    def run(self, call: MoECall) -> torch.Tensor:
        return reference_experts(call).to(call.hidden_states.dtype)
