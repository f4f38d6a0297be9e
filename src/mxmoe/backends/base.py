"""The interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import MXFP4Tensor
from ..validation import MoEProblem


@dataclass(frozen=True)
class MoEArgs:
    """One validated `fused_experts` call, as handed to a backend."""

    hidden_states: torch.Tensor  # [M, H] bf16/fp16/fp32
    w13: MXFP4Tensor  # [E, 2I, H]
    w2: MXFP4Tensor  # [E, H, I]
    topk_weights: torch.Tensor  # [M, k] float
    topk_ids: torch.Tensor  # [M, k] int32/int64, global expert ids
    w13_bias: torch.Tensor | None  # [E, 2I]
    w2_bias: torch.Tensor | None  # [E, H]
    alpha: float
    limit: float
    expert_map: torch.Tensor | None  # [E_global] -> local id or -1
    apply_router_weight_on_input: bool
    problem: MoEProblem


class Backend:
    """A way to compute `fused_experts`. Subclasses set the class attributes and `run`."""

    #: The name users pass as ``backend=``.
    name: str = ""
    #: One line for `mxmoe info`.
    description: str = ""
    #: True when the backend computes from the packed weights (no dense copy of them is kept).
    keeps_weights_packed: bool = True
    #: True when the backend's usability must be established by running it (the probe).
    needs_probe: bool = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (without running anything), or None."""
        return None

    def run(self, args: MoEArgs) -> torch.Tensor:
        """``[M, H]`` in ``args.hidden_states.dtype``; M > 0."""
        raise NotImplementedError
