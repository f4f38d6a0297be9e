"""What every format's reader gives `MXFP4MoE.from_pretrained`: one layer's MoE for this rank."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..activations import Activation
from ..constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from ..format import MXFP4Tensor
from ..routing import GroupedSigmoidRouting

__all__ = ["PretrainedMoE"]


@dataclass
class PretrainedMoE:
    """One layer's MoE as this rank read it: `MXFP4MoE`'s constructor arguments, but the
    backend and the process groups (the caller's), all on the device asked for."""

    w13: MXFP4Tensor  # [E_local, 2 * I_local, H]
    w2: MXFP4Tensor  # [E_local, H, I_local]
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor | None  # [E]
    w13_bias: torch.Tensor | None  # [E_local, 2 * I_local]
    w2_bias: torch.Tensor | None  # [E_local, H]; None on tensor-parallel ranks other than 0
    top_k: int
    activation: Activation
    renormalize: bool = True
    alpha: float = GPT_OSS_SWIGLU_ALPHA
    limit: float = GPT_OSS_SWIGLU_LIMIT
    expert_map: torch.Tensor | None = None  # [E] int32 when the experts are split over ranks
    #: DeepSeek-V3: its grouped sigmoid router and e_score_correction_bias [E].
    routing: GroupedSigmoidRouting | None = None
    router_correction_bias: torch.Tensor | None = None
    #: DeepSeek-V3: the shared-experts MLP (`GatedMLP` or `MXFP4GatedMLP`), whole on every rank.
    shared_experts: torch.nn.Module | None = None

    def layer_arguments(self) -> dict:
        """The fields as keyword arguments of `MXFP4MoE` (the tensors themselves, no copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
