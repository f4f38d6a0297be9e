"""The functional API: `fused_experts`."""

from __future__ import annotations

import torch

from .activations import Activation
from .constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from .format import MXFP4Tensor
from . import plans
from .ops import fused_experts_op, must_dispatch
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

    Validation: every call checks types, dtypes, shapes and devices and raises TypeError or
    ValueError naming the argument. The data checks (``topk_ids`` in ``[0, E_global)``,
    ``expert_map`` values in ``[-1, E_local)``) read the tensors, so they run only where that
    costs no host synchronisation: always on the CPU, on a GPU only with ``MXMOE_VALIDATE=1``.
    Unchecked, an out-of-range pair (id < 0 or >= E_global, or mapped outside ``[0, E_local)``)
    contributes nothing, like a pair of a remote expert, on every backend; no kernel reads
    outside the weights for it.

    Strided inputs: the kernels take the strides of ``hidden_states``, the weights and the
    biases, so views (transposed, sliced) work without a copy; ``topk_ids``, ``topk_weights``
    and ``expert_map`` are flattened into contiguous copies when they are not already.

    Returns:
        ``[M, H]`` in ``hidden_states.dtype``.

    Runs the ``mxmoe::fused_experts`` operator (`mxmoe.ops`), so it compiles under
    ``torch.compile(fullgraph=True)``. Gradients reach hidden_states, topk_weights and the
    biases through a slow pure-torch backward; the MXFP4 weights are constants.
    """
    if not must_dispatch(hidden_states, topk_weights, w13_bias, w2_bias):
        # Eager: the signature's plan (validated when it was made; `mxmoe.plans`).
        return plans.run(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias,
                         activation, alpha, limit, expert_map, apply_router_weight_on_input,
                         backend)
    call = check_fused_experts_args(
        hidden_states, w13, w2, topk_weights, topk_ids,
        w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
        alpha=alpha, limit=limit, expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input, backend=backend,
    )
    # Traced or differentiated: the operator does the rest (data checks, backend choice, the
    # run); to torch.compile it is one opaque node, so a compiled caller keeps one graph.
    return fused_experts_op(*call.op_args())
