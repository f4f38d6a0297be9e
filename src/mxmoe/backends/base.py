"""The interface every backend implements."""

from __future__ import annotations

import torch

from ..layouts import LAYOUTS
from ..problem import MoECall


class Backend:
    """A way to compute `fused_experts`. Subclasses set the attributes and `run`."""

    #: The name users pass as ``backend=`` (and tuning tables are keyed on).
    name: str = ""
    #: One line for `mxmoe info`.
    description: str = ""
    #: True when the backend computes from the packed weights (no dense copy of them is kept).
    keeps_weights_packed: bool = True
    #: True when the backend's usability must be established by running it (the probe).
    needs_probe: bool = False
    #: The weight layouts (`mxmoe.layouts` names) it reads, the one it runs fastest on first.
    layouts: tuple[str, ...] = tuple(LAYOUTS)

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (without running anything), or None."""
        return None

    def run(self, call: MoECall) -> torch.Tensor:
        """``[M, H]`` in ``call.hidden_states.dtype``; M > 0, weights in one of `layouts`."""
        raise NotImplementedError

    def plan(self, call: MoECall):
        """A runner for every call of ``call``'s signature (`mxmoe.plans`), or None to have each
        call handed to `run`. The runner is called as ``runner(hidden_states, topk_weights,
        topk_ids, w13, w2, w13_bias, w2_bias, expert_map)`` with tensors of the same metadata
        as ``call``'s and must compute what `run` computes; it must keep no tensor of ``call``.
        """
        return None
