"""The functional API: `fused_experts`."""

from __future__ import annotations

import torch

from .activations import Activation
from .backends import MoEArgs, resolve_backend
from .constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from .format import MXFP4Tensor
from .validation import check_fused_experts_args

__all__ = ["fused_experts"]


def fused_experts(
    hidden_states: torch.Tensor,
    w13: MXFP4Tensor,
    w2: MXFP4Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation | str = "swigluoai",
    alpha: float = GPT_OSS_SWIGLU_ALPHA,
    limit: float = GPT_OSS_SWIGLU_LIMIT,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The MoE experts of a layer on MXFP4 weights: gated GEMM1, GEMM2, routing-weighted sum.

    Args:
        hidden_states: ``[M, H]`` bf16, fp16 or fp32.
        w13: `MXFP4Tensor` ``[E, 2I, H]``; rows interleave gate/up for ``"swigluoai"``, are
            ``[gate | up]`` halves for ``"silu"``.
        w2: `MXFP4Tensor` ``[E, H, I]``.
        topk_weights: ``[M, k]`` float routing weights.
        topk_ids: ``[M, k]`` int32/int64 global expert ids.
        w13_bias: ``[E, 2I]`` or None. w2_bias: ``[E, H]`` or None (added before the weighting).
        activation: ``"swigluoai"`` (gpt-oss, with ``alpha`` and ``limit``) or ``"silu"``.
        expert_map: ``[E_global]`` int: the local index of each global expert, -1 when another
            rank holds it (its pairs contribute nothing).
        apply_router_weight_on_input: scale each pair's input by its weight instead of its output.
        backend: ``"auto"``, ``"torch"``, ``"triton_dequant"``, ``"triton_scaled"`` or ``"bf16"``.

    Returns:
        ``[M, H]`` in ``hidden_states.dtype``.
    """
    problem = check_fused_experts_args(
        hidden_states, w13, w2, topk_weights, topk_ids,
        w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
        alpha=alpha, limit=limit, expert_map=expert_map,
    )
    if problem.num_tokens == 0 or problem.num_local_experts == 0:
        # No tokens, or (expert parallelism over more ranks than experts) no local experts:
        # nothing to compute, and backends need not handle an empty weight tensor.
        return hidden_states.new_zeros((problem.num_tokens, problem.hidden))
    chosen = resolve_backend(backend, hidden_states.device, problem)
    args = MoEArgs(
        hidden_states=hidden_states,
        w13=w13,
        w2=w2,
        topk_weights=topk_weights,
        topk_ids=topk_ids,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        alpha=float(alpha),
        limit=float(limit),
        expert_map=expert_map,
        apply_router_weight_on_input=bool(apply_router_weight_on_input),
        problem=problem,
    )
    return chosen.run(args)
