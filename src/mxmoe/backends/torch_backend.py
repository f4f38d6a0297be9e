"""`backend="torch"`: the float32 reference, on any device and any weight layout."""

from __future__ import annotations

import torch

from ..problem import MoECall
from ..reference import fused_experts_reference
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    description = "pure-torch float32 reference (any device; the specification)"
    keeps_weights_packed = True  # dequantizes one expert at a time, keeps nothing

    def run(self, call: MoECall) -> torch.Tensor:
        out = fused_experts_reference(
            call.hidden_states,
            call.w13,
            call.w2,
            call.topk_weights,
            call.topk_ids,
            w13_bias=call.w13_bias,
            w2_bias=call.w2_bias,
            activation=call.activation,
            alpha=call.alpha,
            limit=call.limit,
            expert_map=call.expert_map,
            apply_router_weight_on_input=call.apply_router_weight_on_input,
        )
        return out.to(call.hidden_states.dtype)
