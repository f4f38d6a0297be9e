"""Which part of a layer this process reads: its experts (``ep_group``) and its slice of I
(``tp_group``), worked out before any tensor is read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import expert_range, intermediate_range

__all__ = ["RankPart", "rank_part", "check_top_k"]


@dataclass
class RankPart:
    """``experts`` / ``intermediate``: None for all; ``expert_map`` [E] int32 or None;
    ``keep_w2_bias``: False on tensor-parallel ranks other than 0 (added once after the
    all-reduce)."""

    experts: range | None
    intermediate: range | None
    expert_map: torch.Tensor | None
    keep_w2_bias: bool

    def expert_map_on(self, device: torch.device) -> torch.Tensor | None:
        return None if self.expert_map is None else self.expert_map.to(device)


def _group_position(group, what: str) -> tuple[int, int]:
    """(rank, world) of this process in ``group``; ValueError when it is not a member."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{what} was given but torch.distributed is not initialized")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {what}")
    return rank, world


def rank_part(num_experts: int, intermediate: int, ep_group=None, tp_group=None) -> RankPart:
    if ep_group is not None and tp_group is not None and ep_group is tp_group:
        raise ValueError("ep_group and tp_group must be different process groups")
    experts, expert_map = None, None
    if ep_group is not None:
        rank, world = _group_position(ep_group, "ep_group")
        experts = expert_range(num_experts, world, rank)
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[experts.start:experts.stop] = torch.arange(len(experts), dtype=torch.int32)
    inter, keep_w2_bias = None, True
    if tp_group is not None:
        rank, world = _group_position(tp_group, "tp_group")
        inter = intermediate_range(intermediate, world, rank)
        keep_w2_bias = rank == 0
    return RankPart(experts, inter, expert_map, keep_w2_bias)


def check_top_k(top_k, num_experts: int, *, source: str, hint: str) -> int:
    """``top_k`` as given, else from config (``source`` names where); in [1, E]."""
    if top_k is None:
        raise ValueError(f"top_k is required: {source}; pass top_k=... ({hint})")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
    return top_k
