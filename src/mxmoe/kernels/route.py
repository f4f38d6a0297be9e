"""Launcher of the fused router (`_route`): softmax -> top-k -> renormalize in one launch."""

from __future__ import annotations

import torch

from ._route import route_kernel
from .launch import Launcher, cdiv, next_power_of_2

_route = Launcher(route_kernel)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [M, k], ids int32 [M, k])`` of ``router_logits [M, E]`` on a GPU."""
    m, e = router_logits.shape
    weights = torch.empty((m, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((m, top_k), dtype=torch.int32, device=router_logits.device)
    if m == 0:
        return weights, ids
    block_e = next_power_of_2(e)
    rows = max(1, min(16, 4096 // block_e))
    _route(
        (cdiv(m, rows),), logits_ptr=router_logits, weights_ptr=weights, ids_ptr=ids,
        M=m, E=e, stride_lm=router_logits.stride(0), stride_le=router_logits.stride(1),
        TOP_K=top_k, K_PAD=next_power_of_2(top_k), RENORMALIZE=renormalize,
        BLOCK_E=block_e, ROWS=rows, num_warps=4,
    )
    return weights, ids
