"""`mxmoe::fused_experts`: the fused-experts computation as a PyTorch custom operator.

`mxmoe.fused_experts` validates its arguments in Python and calls this operator whenever PyTorch
must see the call (`must_dispatch`: traced, or a gradient wanted); so does the `MXFP4MoE`
layer. To `torch.compile` the operator is opaque: dynamo records one node, shapes come from the
fake implementation (``[M, H]`` in the activation dtype), and the real implementation runs at
run time. So a compiled model never breaks its graph on mxmoe, whichever backend runs
underneath. Plain eager inference skips the dispatcher, whose round trip for a Python custom
operator costs tens of microseconds a call (as much as a decode step's GPU work), and runs the
signature's plan (`mxmoe.plans`) directly: the same computation.

The operator's schema only knows tensors and scalars, so a call crosses it flattened (each
weight as blocks, scales and its layout's name): `mxmoe.problem.OP_ARGS` is that argument list,
written once, and `MoECall.op_args` / `MoECall.from_op_args` flatten and rebuild. Callers should
use `fused_experts`: the operator trusts that its arguments were validated.

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

import torch

from . import plans, scratch
from .activations import Activation
from .problem import OP_ARG_NAMES, MoECall, op_schema
from .reference import local_expert_ids

__all__ = ["must_dispatch", "fused_experts_op", "fused_experts_backward_op"]


def must_dispatch(hidden_states, topk_weights, w13_bias, w2_bias) -> bool:
    """Whether a call must go through the operator: traced, or a gradient wanted."""
    if torch.compiler.is_compiling():
        return True
    # A subclass (FakeTensor, functional tensors) or an active dispatch mode means a tracer.
    if type(hidden_states) is not torch.Tensor or hidden_states.is_meta:
        return True
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return True
    if torch.is_grad_enabled():
        return any(isinstance(t, torch.Tensor) and t.requires_grad
                   for t in (hidden_states, topk_weights, w13_bias, w2_bias))
    return False


def _fused_experts_impl(*args) -> torch.Tensor:
    # The operator is how compiled graphs run the experts; their CUDA-graph trees own every
    # allocation made here, so the plan keeps no scratch past the call (`mxmoe.scratch`).
    with scratch.fresh_per_call():
        return plans.run_call(MoECall.from_op_args(*args))


fused_experts_op = torch.library.custom_op(
    "mxmoe::fused_experts", _fused_experts_impl, mutates_args=(), schema=op_schema("Tensor")
)


@fused_experts_op.register_fake
def _fused_experts_fake(hidden_states, *rest):
    return hidden_states.new_empty(hidden_states.shape)


def _activation_backward(
    h: torch.Tensor, grad_a: torch.Tensor, activation: Activation, alpha: float, limit: float
) -> torch.Tensor:
    """``d act(h) / d h`` applied to ``grad_a [P, I]``: ``[P, 2I]`` in the row layout of h."""
    return activation.backward(h, grad_a, alpha, limit)


def _backward_reference(grad_out: torch.Tensor, call: MoECall):
    """float32 ``(grad hidden [M, H], grad topk_weights [M, k], grad w13_bias [E, 2I],
    grad w2_bias [E, H])``; the forward (`fused_experts_reference`) is recomputed per expert."""
    activation, alpha, limit = call.activation, call.alpha, call.limit
    on_input = call.apply_router_weight_on_input
    w13, w2, w13_bias, w2_bias = call.w13, call.w2, call.w13_bias, call.w2_bias
    x = call.hidden_states.to(torch.float32)
    g_out = grad_out.to(torch.float32)
    weights = call.topk_weights.to(torch.float32)
    local = local_expert_ids(call.topk_ids, call.expert_map)
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
        inputs = x[token] * r if on_input else x[token]
        h = inputs @ w13_e.T
        if w13_bias is not None:
            h = h + w13_bias[expert].to(torch.float32)
        grad_y = g_out[token]  # [P, H]
        if not on_input:
            # out += r * y: d/dr = <g, y>, d/dy = r * g.
            a = activation.forward(h, alpha, limit)
            y = a @ w2_e.T
            if w2_bias is not None:
                y = y + w2_bias[expert].to(torch.float32)
            grad_weights[token, slot] = (grad_y * y).sum(dim=1)
            grad_y = grad_y * r
        grad_b2[expert] = grad_y.sum(dim=0)
        grad_h = _activation_backward(h, grad_y @ w2_e, activation, alpha, limit)  # [P, 2I]
        grad_b13[expert] = grad_h.sum(dim=0)
        grad_inputs = grad_h @ w13_e  # [P, H]
        if on_input:
            # inputs = r * x: d/dr = <grad_inputs, x>, d/dx = r * grad_inputs.
            grad_weights[token, slot] = (grad_inputs * x[token]).sum(dim=1)
            grad_inputs = grad_inputs * r
        grad_x.index_add_(0, token, grad_inputs)
    return grad_x, grad_weights, grad_b13, grad_b2


def _fused_experts_backward_impl(grad_out, *args):
    """Gradients of ``fused_experts`` for hidden_states, topk_weights, w13_bias and w2_bias
    (each in its input's dtype; an empty tensor for an absent bias)."""
    call = MoECall.from_op_args(*args)
    grad_x, grad_weights, grad_w13_bias, grad_w2_bias = _backward_reference(grad_out, call)
    empty = call.hidden_states.new_empty(0)
    # An absent bias gets its own empty tensor: an operator's outputs may not alias each other.
    return (
        grad_x.to(call.hidden_states.dtype),
        grad_weights.to(call.topk_weights.dtype),
        empty if call.w13_bias is None else grad_w13_bias.to(call.w13_bias.dtype),
        empty.clone() if call.w2_bias is None else grad_w2_bias.to(call.w2_bias.dtype),
    )


fused_experts_backward_op = torch.library.custom_op(
    "mxmoe::fused_experts_backward", _fused_experts_backward_impl, mutates_args=(),
    schema=op_schema("(Tensor, Tensor, Tensor, Tensor)", prefix="Tensor grad_out, "),
)


@fused_experts_backward_op.register_fake
def _fused_experts_backward_fake(grad_out, *args):
    named = dict(zip(OP_ARG_NAMES, args))
    hidden_states, topk_weights = named["hidden_states"], named["topk_weights"]
    biases = [hidden_states.new_empty(0) if b is None else torch.empty_like(b)
              for b in (named["w13_bias"], named["w2_bias"])]
    return torch.empty_like(hidden_states), torch.empty_like(topk_weights), biases[0], biases[1]


#: The inputs that get a gradient, by name; every other input gets None.
_DIFFERENTIABLE = ("hidden_states", "topk_weights", "w13_bias", "w2_bias")


def _setup_context(ctx, inputs, output):
    tensors = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    ctx.tensor_positions = tensors
    ctx.save_for_backward(*(inputs[i] for i in tensors))
    ctx.inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]


def _backward(ctx, grad_out):
    inputs = list(ctx.inputs)
    for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
        inputs[position] = tensor
    grads = dict(zip(_DIFFERENTIABLE, fused_experts_backward_op(grad_out, *inputs)))
    named = dict(zip(OP_ARG_NAMES, inputs))
    return tuple(
        grads[name] if name in grads and named[name] is not None else None
        for name in OP_ARG_NAMES
    )


fused_experts_op.register_autograd(_backward, setup_context=_setup_context)
