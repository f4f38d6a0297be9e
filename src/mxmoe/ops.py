"""`mxmoe::fused_experts`: the fused-experts computation as a PyTorch custom operator.

`mxmoe.fused_experts` validates its arguments in Python and calls this operator (through
`run_fused_experts`); so does the `MXFP4MoE` layer, through it. To `torch.compile` the operator
is opaque: dynamo records one node, shapes come from the fake implementation (``[M, H]`` in the
activation dtype), and the real implementation runs at run time. So a compiled model never
breaks its graph on mxmoe, whichever backend runs underneath. (Plain eager inference skips the
dispatcher: see `run_fused_experts`.)

The operator takes the MXFP4 weights as loose (blocks, scales) tensors because an operator's
schema only knows tensors and scalars; `fused_experts` is the place that unpacks `MXFP4Tensor`.
Callers should use `fused_experts`: the operator trusts that its arguments were validated.

Data checks (expert ids in range, expert-map values) read the tensors, so they run here, in the
real implementation, and never at trace time: on CPU tensors always, on GPUs only with
``MXMOE_VALIDATE=1`` (reading GPU data synchronises the host). A compiled model keeps them.

Gradients: ``mxmoe::fused_experts_backward``, a second opaque operator, gives those of
hidden_states, topk_weights and the biases, in float32 pure torch, recomputing the forward one
expert at a time as `mxmoe.reference` does: right for every backend (all compute the
reference's math), slow, and enough to train what lies around frozen MXFP4 experts; it also
lets a model be compiled with gradients enabled. The weights are constants: MXFP4 codes have no
gradient. (Autograd cannot be used inside an operator's kernel: the autograd dispatch keys are
excluded there, so the derivatives are written out.)
"""

from typing import Optional

import torch

from .activations import Activation, apply_activation, split_gate_up
from .backends import MoEArgs, resolve_backend
from .format import MXFP4Tensor
from .reference import local_expert_ids
from .validation import MoEProblem, check_routing_values, routing_values_checked

__all__ = ["run_fused_experts", "fused_experts_op", "fused_experts_backward_op"]


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


def _fused_experts_impl(
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


fused_experts_op = torch.library.custom_op(
    "mxmoe::fused_experts", _fused_experts_impl, mutates_args=()
)


def run_fused_experts(
    hidden_states: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: Optional[torch.Tensor],
    w2_bias: Optional[torch.Tensor],
    expert_map: Optional[torch.Tensor],
    activation: str,
    alpha: float,
    limit: float,
    apply_router_weight_on_input: bool,
    backend: str,
) -> torch.Tensor:
    """Run ``mxmoe::fused_experts``: through the dispatcher whenever PyTorch must see the
    operator, else its implementation directly.

    The dispatcher round trip of a Python custom operator costs tens of microseconds a call
    (measured on the CPU), as much as a decode step's whole MoE kernel on a GPU. So the operator
    is dispatched while `torch.compile` or ``torch.export`` traces (dynamo, or fake / meta
    tensors, or any dispatch mode), and when a gradient is wanted; plain eager inference calls
    the implementation itself, which computes the same thing.
    """
    args = (hidden_states, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights, topk_ids,
            w13_bias, w2_bias, expert_map, activation, alpha, limit,
            apply_router_weight_on_input, backend)
    if _must_dispatch(hidden_states, topk_weights, w13_bias, w2_bias):
        return fused_experts_op(*args)
    return _fused_experts_impl(*args)


def _must_dispatch(hidden_states, topk_weights, w13_bias, w2_bias) -> bool:
    if torch.compiler.is_compiling():
        return True
    # A subclass (FakeTensor, functional tensors) or an active dispatch mode means a tracer.
    if type(hidden_states) is not torch.Tensor or hidden_states.is_meta:
        return True
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return True
    if torch.is_grad_enabled():
        return any(t is not None and t.requires_grad
                   for t in (hidden_states, topk_weights, w13_bias, w2_bias))
    return False


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


def _activation_backward(
    h: torch.Tensor, grad_a: torch.Tensor, activation: Activation, alpha: float, limit: float
) -> torch.Tensor:
    """``d act(h) / d h`` applied to ``grad_a [P, I]``: ``[P, 2I]`` in the row layout of h."""
    gate, up = split_gate_up(h, activation)
    if activation is Activation.SWIGLUOAI:
        # a = g * sigmoid(alpha * g) * (u + 1), g = min(gate, limit), u = clamp(up, +-limit);
        # a clamp passes the gradient where its input is inside the bounds, bounds included.
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        sig = torch.sigmoid(alpha * g)
        grad_gate = grad_a * (sig + alpha * g * sig * (1 - sig)) * (u + 1) * (gate <= limit)
        grad_up = grad_a * g * sig * ((up >= -limit) & (up <= limit))
        # Rows interleave gate (even) and up (odd).
        return torch.stack([grad_gate, grad_up], dim=-1).flatten(-2)
    # a = silu(gate) * up, rows are [gate | up] halves.
    sig = torch.sigmoid(gate)
    grad_gate = grad_a * up * sig * (1 + gate * (1 - sig))
    grad_up = grad_a * gate * sig
    return torch.cat([grad_gate, grad_up], dim=-1)


def _fused_experts_backward_reference(
    grad_out, hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map,
    activation, alpha, limit, apply_router_weight_on_input,
):
    """float32 ``(grad hidden [M, H], grad topk_weights [M, k], grad w13_bias [E, 2I],
    grad w2_bias [E, H])``; the forward (`fused_experts_reference`) is recomputed per expert."""
    x = hidden_states.to(torch.float32)
    g_out = grad_out.to(torch.float32)
    weights = topk_weights.to(torch.float32)
    local = local_expert_ids(topk_ids, expert_map)
    num_experts, two_i, hidden = w13.shape
    grad_x = torch.zeros_like(x)
    grad_weights = torch.zeros_like(weights)
    grad_b13 = x.new_zeros((num_experts, two_i))
    grad_b2 = x.new_zeros((num_experts, hidden))
    for expert in range(num_experts):
        token, slot = torch.nonzero(local == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        r = weights[token, slot].unsqueeze(1)  # [P, 1]
        w13_e = w13[expert].dequantize(torch.float32)  # [2I, H]
        w2_e = w2[expert].dequantize(torch.float32)  # [H, I]
        inputs = x[token] * r if apply_router_weight_on_input else x[token]
        h = inputs @ w13_e.T
        if w13_bias is not None:
            h = h + w13_bias[expert].to(torch.float32)
        grad_y = g_out[token]  # [P, H]
        if not apply_router_weight_on_input:
            # out += r * y: d/dr = <g, y>, d/dy = r * g.
            a = apply_activation(h, activation, alpha, limit)
            y = a @ w2_e.T
            if w2_bias is not None:
                y = y + w2_bias[expert].to(torch.float32)
            grad_weights[token, slot] = (grad_y * y).sum(dim=1)
            grad_y = grad_y * r
        grad_b2[expert] = grad_y.sum(dim=0)
        grad_h = _activation_backward(h, grad_y @ w2_e, activation, alpha, limit)  # [P, 2I]
        grad_b13[expert] = grad_h.sum(dim=0)
        grad_inputs = grad_h @ w13_e  # [P, H]
        if apply_router_weight_on_input:
            # inputs = r * x: d/dr = <grad_inputs, x>, d/dx = r * grad_inputs.
            grad_weights[token, slot] = (grad_inputs * x[token]).sum(dim=1)
            grad_inputs = grad_inputs * r
        grad_x.index_add_(0, token, grad_inputs)
    return grad_x, grad_weights, grad_b13, grad_b2


@torch.library.custom_op("mxmoe::fused_experts_backward", mutates_args=())
def fused_experts_backward_op(
    grad_out: torch.Tensor,  # [M, H]
    hidden_states: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: Optional[torch.Tensor],
    w2_bias: Optional[torch.Tensor],
    expert_map: Optional[torch.Tensor],
    activation: str,
    alpha: float,
    limit: float,
    apply_router_weight_on_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``fused_experts`` for hidden_states, topk_weights, w13_bias and w2_bias
    (each in its input's dtype; an empty tensor for an absent bias)."""
    grads = _fused_experts_backward_reference(
        grad_out, hidden_states, MXFP4Tensor(w13_blocks, w13_scales),
        MXFP4Tensor(w2_blocks, w2_scales), topk_weights, topk_ids, w13_bias, w2_bias, expert_map,
        Activation.parse(activation), alpha, limit, apply_router_weight_on_input,
    )
    grad_x, grad_weights, grad_w13_bias, grad_w2_bias = grads
    # An absent bias gets its own empty tensor: an operator's outputs may not alias each other.
    return (
        grad_x.to(hidden_states.dtype),
        grad_weights.to(topk_weights.dtype),
        hidden_states.new_empty(0) if w13_bias is None else grad_w13_bias.to(w13_bias.dtype),
        hidden_states.new_empty(0) if w2_bias is None else grad_w2_bias.to(w2_bias.dtype),
    )


@fused_experts_backward_op.register_fake
def _fused_experts_backward_fake(grad_out, hidden_states, w13_blocks, w13_scales, w2_blocks,
                                 w2_scales, topk_weights, topk_ids, w13_bias, w2_bias, *scalars):
    biases = [hidden_states.new_empty(0) if b is None else torch.empty_like(b)
              for b in (w13_bias, w2_bias)]
    return torch.empty_like(hidden_states), torch.empty_like(topk_weights), biases[0], biases[1]


def _setup_context(ctx, inputs, output):
    (hidden_states, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights, topk_ids,
     w13_bias, w2_bias, expert_map, activation, alpha, limit, apply_router_weight_on_input,
     _backend) = inputs
    ctx.save_for_backward(hidden_states, w13_blocks, w13_scales, w2_blocks, w2_scales,
                          topk_weights, topk_ids, w13_bias, w2_bias, expert_map)
    ctx.scalars = (activation, alpha, limit, apply_router_weight_on_input)


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    grad_x, grad_weights, grad_w13_bias, grad_w2_bias = fused_experts_backward_op(
        grad_out, *saved, *ctx.scalars
    )
    w13_bias, w2_bias = saved[7], saved[8]
    return (
        grad_x, None, None, None, None,  # hidden_states, the weights' blocks and scales
        grad_weights, None,  # topk_weights, topk_ids
        None if w13_bias is None else grad_w13_bias,
        None if w2_bias is None else grad_w2_bias,
        None, None, None, None, None, None,  # expert_map and the scalars
    )


fused_experts_op.register_autograd(_backward, setup_context=_setup_context)
