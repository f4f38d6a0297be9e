"""Launcher of the fused router (`_route`): softmax -> top-k -> renormalize in one launch.

`RoutePlan` is the launch of one logits signature (shape, strides, dtype), worked out once; a
call allocates one buffer for both outputs and launches (`launch.LaunchPlan`).
"""

from __future__ import annotations

import torch

from ._route import route_kernel
from .launch import LaunchPlan, Launcher, Ref, Step, cdiv, next_power_of_2

_route = Launcher(route_kernel)

_LOGITS, _OUT = 0, 1


class RoutePlan:
    """The fused router's launch for logits of ``router_logits``' signature: a call returns
    ``(weights float32 [M, k], ids int32 [M, k])``, both contiguous views of one buffer."""

    def __init__(self, router_logits: torch.Tensor, top_k: int, renormalize: bool):
        m, e = router_logits.shape
        self.shape = (2, m, top_k)
        block_e = next_power_of_2(e)
        rows = max(1, min(16, 4096 // block_e))
        plane = (m, top_k), (top_k, 1)
        self.launches = LaunchPlan([] if m == 0 else [Step(_route, (cdiv(m, rows),), dict(
            logits_ptr=Ref.of(_LOGITS, router_logits),
            weights_ptr=Ref(_OUT, torch.float32, *plane),
            ids_ptr=Ref(_OUT, torch.int32, *plane, offset=m * top_k * 4),
            M=m, E=e, stride_lm=router_logits.stride(0), stride_le=router_logits.stride(1),
            TOP_K=top_k, K_PAD=next_power_of_2(top_k), RENORMALIZE=renormalize,
            BLOCK_E=block_e, ROWS=rows, num_warps=4,
        ))])

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(self.shape, dtype=torch.int32, device=router_logits.device)
        self.launches.run((router_logits, out))
        return out[0].view(torch.float32), out[1]


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [M, k], ids int32 [M, k])`` of ``router_logits [M, E]`` on a GPU."""
    return RoutePlan(router_logits, top_k, renormalize)(router_logits)
