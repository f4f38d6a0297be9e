"""`mxmoe.route`, the public router: its arguments validated, then the fused Triton router
(eager CUDA, no gradient wanted) or the pure-torch one (`mxmoe.routing.route_torch`, everywhere else). An eager
call reuses the plan of its signature, validated when made.

`route_grouped_sigmoid` is DeepSeek-V3's router (sigmoid scores, a correction bias for the
choice, groups of experts): validated, then pure torch (`route_grouped_sigmoid_torch`) on every
device."""

from __future__ import annotations

import torch

from . import settings
from .plans import SignatureCache, tensor_key
from .routing import GroupedSigmoidRouting, route_grouped_sigmoid_torch, route_torch
from .validation import check_grouped_route_args, check_route_args

__all__ = ["route", "route_grouped_sigmoid"]

#: Above this many experts the fused router would hold too wide a row in registers.
_TRITON_ROUTER_MAX_EXPERTS = 1024
#: Eager routers by signature (logits metadata, top_k, renormalize, switches' generation).
_ROUTE_PLANS = SignatureCache(256)


def route(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts.

    Args:
        router_logits: ``[M, E]`` float.
        top_k: experts per token, ``1 <= top_k <= E``.
        renormalize: softmax over the top-k logits (gpt-oss; equal to dividing the chosen
            probabilities by their sum). ``False`` keeps the probabilities of the softmax over
            all E.

    Returns:
        ``(topk_weights float32 [M, top_k], topk_ids int32 [M, top_k])``, highest weight first.
    """
    if (not torch.compiler.is_compiling() and type(router_logits) is torch.Tensor
            and not (router_logits.requires_grad and torch.is_grad_enabled())):
        # Eager, no gradient wanted: the signature's plan (validated when made). A gradient
        # to the logits (a router being trained) takes the differentiable torch path: the
        # fused router's outputs carry none.
        return eager_route_plan(router_logits, top_k, renormalize)(router_logits)
    check_route_args(router_logits, top_k, renormalize)
    return route_torch(router_logits, top_k, renormalize)


def eager_route_plan(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """The eager router of ``router_logits``' signature (validated when made): ``plan(logits)
    -> (weights, ids)`` for any logits of that signature. For callers that route many calls of
    one signature (`mxmoe.MXFP4MoE`'s eager forward) and keep it."""
    key = (tensor_key(router_logits), type(top_k), top_k, type(renormalize), renormalize,
           settings.generation())
    plan = _ROUTE_PLANS.get(key)
    if plan is None:
        plan = _route_plan(router_logits, top_k, renormalize)
        _ROUTE_PLANS.put(key, plan)
    return plan


def _route_plan(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """The router of one signature, its arguments checked: the fused Triton router's plan, or
    the torch one."""
    check_route_args(router_logits, top_k, renormalize)
    if _use_triton_router(router_logits):
        from .kernels.route import RoutePlan

        return RoutePlan(router_logits, top_k, renormalize)
    return lambda logits: route_torch(logits, top_k, renormalize)


def _use_triton_router(router_logits: torch.Tensor) -> bool:
    # Under torch.compile the torch path is traced (inductor fuses it); the Triton router is for
    # eager and CUDA-graph decode steps.
    if torch.compiler.is_compiling() or not router_logits.is_cuda:
        return False
    switches = settings.current()
    return (not switches.interpret and router_logits.shape[1] <= _TRITON_ROUTER_MAX_EXPERTS
            and not switches.torch_router)


def route_grouped_sigmoid(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    routing: GroupedSigmoidRouting,
    *,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts the way DeepSeek-V3 does (``topk_method: noaux_tc``).

    Args:
        router_logits: ``[M, E]`` float (DeepSeek-V3 computes them in float32).
        correction_bias: ``[E]`` float, ``e_score_correction_bias``: added to the sigmoid
            scores to choose the experts, never to their weights.
        top_k: experts per token, at most the experts of the ``routing.topk_group`` groups kept.
        routing: the groups and the scaling factor (`GroupedSigmoidRouting`).
        renormalize: divide the chosen scores by their sum (``norm_topk_prob``) before scaling.

    Returns:
        ``(topk_weights float32 [M, top_k], topk_ids int32 [M, top_k])``, ordered by the
        corrected score, highest first; see `route_grouped_sigmoid_torch`.

    Raises:
        TypeError / ValueError: naming the argument whose type, shape or value does not fit.
    """
    check_grouped_route_args(router_logits, correction_bias, top_k, routing, renormalize)
    return route_grouped_sigmoid_torch(router_logits, correction_bias, top_k, routing,
                                       renormalize)
