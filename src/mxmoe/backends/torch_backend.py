"""`backend="torch"`: the float32 reference, on any device."""

from __future__ import annotations

import torch

from ..reference import fused_experts_reference
from .base import Backend, MoEArgs


class TorchBackend(Backend):
    name = "torch"
    description = "pure-torch float32 reference (any device; the specification)"
    keeps_weights_packed = True  # dequantizes one expert at a time, keeps nothing

    def run(self, args: MoEArgs) -> torch.Tensor:
        out = fused_experts_reference(
            args.hidden_states,
            args.w13,
            args.w2,
            args.topk_weights,
            args.topk_ids,
            w13_bias=args.w13_bias,
            w2_bias=args.w2_bias,
            activation=args.problem.activation,
            alpha=args.alpha,
            limit=args.limit,
            expert_map=args.expert_map,
            apply_router_weight_on_input=args.apply_router_weight_on_input,
        )
        return out.to(args.hidden_states.dtype)
