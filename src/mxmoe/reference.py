"""The pure-torch fused MoE: the specification every fast path is tested against.

Computes in float32 on any device, one local expert at a time, and reads as the math:

    for each token m and slot j with local expert e = map(topk_ids[m, j]) (skipped if -1):
        x  = hidden[m]                      (times w[m, j] if apply_router_weight_on_input)
        h  = x @ W13[e]^T + b13[e]          [2I]
        a  = act(h)                         [I]   (swigluoai: interleaved rows; silu: halves)
        y  = a @ W2[e]^T + b2[e]            [H]
        out[m] += w[m, j] * y               (y alone if apply_router_weight_on_input)
"""

from __future__ import annotations

import torch

from .activations import Activation, apply_activation
from .format import MXFP4Tensor


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """int64 ``[M, k]``: the local expert of each (token, slot), -1 where held elsewhere.

    An id outside ``[0, E_global)`` maps to -1, as the kernels drop it (ids and map values out
    of range contribute nothing; `fused_experts` rejects them when it checks the data).
    """
    ids = topk_ids.to(torch.int64)
    if expert_map is None:
        return ids
    num_global = expert_map.numel()
    in_range = (ids >= 0) & (ids < num_global)
    local = expert_map.to(torch.int64)[ids.clamp(0, max(num_global - 1, 0))]
    return torch.where(in_range, local, -1)


def fused_experts_reference(
    hidden_states: torch.Tensor,
    w13: MXFP4Tensor,
    w2: MXFP4Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = Activation.SWIGLUOAI,
    alpha: float = 1.702,
    limit: float = 7.0,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """``[M, H]`` in float32. Arguments as `mxmoe.fused_experts`, assumed validated."""
    x = hidden_states.to(torch.float32)
    weights = topk_weights.to(torch.float32)
    local = local_expert_ids(topk_ids, expert_map)
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        token, slot = torch.nonzero(local == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        routing_weight = weights[token, slot].unsqueeze(1)
        inputs = x[token]
        if apply_router_weight_on_input:
            inputs = inputs * routing_weight
        h = inputs @ w13[expert].dequantize(torch.float32).T
        if w13_bias is not None:
            h = h + w13_bias[expert].to(torch.float32)
        a = apply_activation(h, activation, alpha, limit)
        y = a @ w2[expert].dequantize(torch.float32).T
        if w2_bias is not None:
            y = y + w2_bias[expert].to(torch.float32)
        if not apply_router_weight_on_input:
            y = y * routing_weight
        out.index_add_(0, token, y)
    return out
