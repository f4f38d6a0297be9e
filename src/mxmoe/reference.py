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
from .constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from .format import MXFP4Tensor
from .problem import MoECall


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


#: `mxmoe.fused_experts`' keyword arguments but ``backend``, with its defaults (a test holds the
#: two to the same names and values).
FUSED_EXPERTS_OPTIONS = {
    "w13_bias": None,
    "w2_bias": None,
    "activation": Activation.SWIGLUOAI,
    "alpha": GPT_OSS_SWIGLU_ALPHA,
    "limit": GPT_OSS_SWIGLU_LIMIT,
    "expert_map": None,
    "apply_router_weight_on_input": False,
}


def fused_experts_reference(hidden_states: torch.Tensor, w13: MXFP4Tensor, w2: MXFP4Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            **options) -> torch.Tensor:
    """``[M, H]`` in float32 for `mxmoe.fused_experts`' arguments (``options``: its keyword
    arguments, `FUSED_EXPERTS_OPTIONS`), assumed valid: `reference_experts` on that call."""
    unknown = set(options) - set(FUSED_EXPERTS_OPTIONS)
    if unknown:
        raise TypeError(f"fused_experts_reference got unexpected keyword arguments "
                        f"{sorted(unknown)}; it takes {list(FUSED_EXPERTS_OPTIONS)}")
    options = {**FUSED_EXPERTS_OPTIONS, **options}
    activation = Activation.parse(options.pop("activation"))
    return reference_experts(MoECall(
        hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights,
        topk_ids=topk_ids, backend="torch",
        problem=MoECall.sizes(hidden_states, w13, topk_ids, options["expert_map"], activation),
        **options,
    ))


def reference_experts(call: MoECall) -> torch.Tensor:
    """``[M, H]`` in float32: the specification, on one validated call (what the torch backend
    runs)."""
    x = call.hidden_states.to(torch.float32)
    weights = call.topk_weights.to(torch.float32)
    local = local_expert_ids(call.topk_ids, call.expert_map)
    w13, w2, w13_bias, w2_bias = call.w13, call.w2, call.w13_bias, call.w2_bias
    on_input = call.apply_router_weight_on_input
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        token, slot = torch.nonzero(local == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        routing_weight = weights[token, slot].unsqueeze(1)
        inputs = x[token]
        if on_input:
            inputs = inputs * routing_weight
        h = inputs @ w13[expert].dequantize(torch.float32).T
        if w13_bias is not None:
            h = h + w13_bias[expert].to(torch.float32)
        a = apply_activation(h, call.activation, call.alpha, call.limit)
        y = a @ w2[expert].dequantize(torch.float32).T
        if w2_bias is not None:
            y = y + w2_bias[expert].to(torch.float32)
        if not on_input:
            y = y * routing_weight
        out.index_add_(0, token, y)
    return out
