"""`mxmoe::fused_experts`: the fused-experts computation as a PyTorch custom operator.

`mxmoe.fused_experts` validates its arguments in Python and calls this operator; so does the
`MXFP4MoE` layer, through it. To `torch.compile` the operator is opaque: dynamo records one
node, shapes come from the fake implementation (``[M, H]`` in the activation dtype), and the
real implementation runs at run time, eager or compiled alike. So a compiled model never
breaks its graph on mxmoe, whichever backend runs underneath.

The operator takes the MXFP4 weights as loose (blocks, scales) tensors because an operator's
schema only knows tensors and scalars; `fused_experts` is the place that unpacks `MXFP4Tensor`.
Callers should use `fused_experts`: the operator trusts that its arguments were validated.

Data checks (expert ids in range, expert-map values) read the tensors, so they run here, in the
real implementation, and never at trace time: on CPU tensors always, on GPUs only with
``MXMOE_VALIDATE=1`` (reading GPU data synchronises the host). A compiled model keeps them.

No autograd formula is registered: the operator is for inference. Calling ``backward`` through
it raises.
"""

from typing import Optional

import torch

from .activations import Activation
from .backends import MoEArgs, resolve_backend
from .format import MXFP4Tensor
from .validation import MoEProblem, check_routing_values, routing_values_checked

__all__ = ["fused_experts_op"]


def _problem(
    hidden_states: torch.Tensor,
    w13_blocks: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
    activation: str,
) -> MoEProblem:
    """The sizes of a call whose arguments were validated by `mxmoe.fused_experts`."""
    num_tokens, hidden = hidden_states.shape
    num_experts, two_i = w13_blocks.shape[:2]
    return MoEProblem(
        num_tokens=num_tokens,
        hidden=hidden,
        intermediate=two_i // 2,
        num_local_experts=num_experts,
        num_global_experts=num_experts if expert_map is None else expert_map.shape[0],
        top_k=topk_ids.shape[1],
        activation=Activation.parse(activation),
    )


@torch.library.custom_op("mxmoe::fused_experts", mutates_args=())
def fused_experts_op(
    hidden_states: torch.Tensor,  # [M, H] bf16/fp16/fp32
    w13_blocks: torch.Tensor,  # [E, 2I, H/2] uint8
    w13_scales: torch.Tensor,  # [E, 2I, H/32] uint8
    w2_blocks: torch.Tensor,  # [E, H, I/2] uint8
    w2_scales: torch.Tensor,  # [E, H, I/32] uint8
    topk_weights: torch.Tensor,  # [M, k] float
    topk_ids: torch.Tensor,  # [M, k] int32/int64
    w13_bias: Optional[torch.Tensor],  # [E, 2I]
    w2_bias: Optional[torch.Tensor],  # [E, H]
    expert_map: Optional[torch.Tensor],  # [E_global] int
    activation: str,
    alpha: float,
    limit: float,
    apply_router_weight_on_input: bool,
    backend: str,
) -> torch.Tensor:
    """``[M, H]`` in ``hidden_states.dtype``; see `mxmoe.fused_experts` for the arguments."""
    problem = _problem(hidden_states, w13_blocks, topk_ids, expert_map, activation)
    if routing_values_checked(hidden_states.device):
        check_routing_values(topk_ids, expert_map, problem)
    if problem.num_tokens == 0 or problem.num_local_experts == 0:
        # No tokens, or (expert parallelism over more ranks than experts) no local experts:
        # nothing to compute, and backends need not handle an empty weight tensor.
        return hidden_states.new_zeros((problem.num_tokens, problem.hidden))
    chosen = resolve_backend(backend, hidden_states.device, problem)
    args = MoEArgs(
        hidden_states=hidden_states,
        w13=MXFP4Tensor(w13_blocks, w13_scales),
        w2=MXFP4Tensor(w2_blocks, w2_scales),
        topk_weights=topk_weights,
        topk_ids=topk_ids,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        alpha=alpha,
        limit=limit,
        expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input,
        problem=problem,
    )
    return chosen.run(args)


@fused_experts_op.register_fake
def _fused_experts_fake(
    hidden_states,
    w13_blocks,
    w13_scales,
    w2_blocks,
    w2_scales,
    topk_weights,
    topk_ids,
    w13_bias,
    w2_bias,
    expert_map,
    activation,
    alpha,
    limit,
    apply_router_weight_on_input,
    backend,
):
    return hidden_states.new_empty(hidden_states.shape)
