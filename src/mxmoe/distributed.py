"""Expert and tensor parallelism over torch.distributed.

The partitions are pure functions of (size, world, rank), so that every rank, and the
checkpoint loader, computes the same slices without communicating. A rank sits at
``(ep_rank, tp_rank)`` of an ``ep_world x tp_world`` mesh (`ParallelLayout`): it holds the
experts `expert_range` (E, ep_world, ep_rank) and, of each, the slice `intermediate_range`
(I, tp_world, tp_rank) of the intermediate dimension. Its output is a partial sum; the layer
all-reduces it over the tp group, then over the ep group. See docs/parallelism.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import MXFP4_BLOCK_SIZE
from .format import MXFP4Tensor

__all__ = [
    "expert_range",
    "intermediate_range",
    "w13_row_ranges",
    "ParallelLayout",
    "ExpertShard",
    "check_local_layer",
    "make_expert_map",
    "shard_experts",
    "slice_w13",
    "slice_w13_bias",
    "slice_w2",
    "slice_w2_bias",
    "ep_tp_groups",
]


def _check_rank(world: int, rank: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got rank={rank}")


def expert_range(num_experts: int, world: int, rank: int) -> range:
    """The contiguous global experts that ``rank`` holds: the first ``E % world`` ranks hold one
    more than the others (E = 5 over 2 ranks: [0, 3) and [3, 5)). A rank may hold none when
    world > E."""
    _check_rank(world, rank)
    base, extra = divmod(num_experts, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def intermediate_range(intermediate: int, world: int, rank: int) -> range:
    """The slice of the intermediate dimension I that ``rank`` holds, along whole 32-element
    scale blocks: the blocks are split as evenly as possible (gpt-oss I = 2880 = 90 blocks over
    4 ranks: 23, 23, 22, 22 blocks = 736, 736, 704, 704), never padded and never cut.

    Raises ValueError when there are fewer blocks than ranks.
    """
    _check_rank(world, rank)
    if intermediate % MXFP4_BLOCK_SIZE != 0:
        raise ValueError(
            f"the intermediate size must be a multiple of {MXFP4_BLOCK_SIZE}, got {intermediate}"
        )
    blocks = intermediate // MXFP4_BLOCK_SIZE
    if world > blocks:
        raise ValueError(
            f"tensor parallelism over {world} ranks needs at least {world} blocks of "
            f"{MXFP4_BLOCK_SIZE} in the intermediate size, but I = {intermediate} has {blocks}"
        )
    block_range = expert_range(blocks, world, rank)
    return range(block_range.start * MXFP4_BLOCK_SIZE, block_range.stop * MXFP4_BLOCK_SIZE)


def w13_row_ranges(intermediate: int, inter: range, activation) -> list[range]:
    """Rows of w13 ``[E, 2I, H]`` (and of its bias) that hold the intermediate slice ``inter``:
    the activation's row map (`Activation.row_ranges`)."""
    from .activations import Activation

    return Activation.parse(activation).row_ranges(intermediate, inter)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the ``ep_world x tp_world`` mesh. The default is one process."""

    ep_rank: int = 0  # which experts: this rank's index in its expert-parallel group ...
    ep_world: int = 1  # ... of this many ranks
    tp_rank: int = 0  # which slice of I: its index in its tensor-parallel group ...
    tp_world: int = 1  # ... of this many ranks

    def __post_init__(self):
        _check_rank(self.ep_world, self.ep_rank)
        _check_rank(self.tp_world, self.tp_rank)

    @classmethod
    def from_groups(cls, ep_group=None, tp_group=None) -> "ParallelLayout":
        """The layout that process groups give this rank (None: a group of one).

        Raises ValueError, before any collective and so on every rank alike, when this
        process is not in a group, or when ``ep_group`` and ``tp_group`` (both larger than one)
        share any rank but this one, e.g. the same group passed twice: the partial outputs
        would then not cover every (expert, slice of I) pair exactly once.
        """
        ep_rank, ep_world = _rank_in("ep_group", ep_group)
        tp_rank, tp_world = _rank_in("tp_group", tp_group)
        if ep_world > 1 and tp_world > 1:
            import torch.distributed as dist

            ep_ranks = dist.get_process_group_ranks(ep_group)
            tp_ranks = dist.get_process_group_ranks(tp_group)
            shared = sorted(set(ep_ranks) & set(tp_ranks))
            if len(shared) != 1:
                raise ValueError(
                    f"ep_group {ep_ranks} and tp_group {tp_ranks} must be orthogonal (the rows "
                    f"and columns of an ep x tp mesh, sharing only this rank), but they share "
                    f"ranks {shared}; build them with mxmoe.distributed.ep_tp_groups"
                )
        return cls(ep_rank, ep_world, tp_rank, tp_world)

    def experts(self, num_experts: int) -> range:
        """The global experts this rank holds."""
        return expert_range(num_experts, self.ep_world, self.ep_rank)

    def intermediate(self, intermediate: int) -> range:
        """The slice of I this rank holds (ValueError when tp_world exceeds I's 32-blocks)."""
        return intermediate_range(intermediate, self.tp_world, self.tp_rank)


def _rank_in(name: str, group) -> tuple[int, int]:
    """(rank, world) of this process in ``group``; (0, 1) for None."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{name} was given but torch.distributed is not initialized: call "
            f"torch.distributed.init_process_group first"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of {name} "
            f"{dist.get_process_group_ranks(group)}"
        )
    return rank, dist.get_world_size(group)


def check_local_layer(num_experts: int, expert_map, w2_bias, ep_group, tp_group) -> None:
    """What a layer built from local weights and groups needs, checked without communicating
    (so every rank configured alike raises alike): orthogonal groups (`ParallelLayout.
    from_groups`), with an ep group of more than one rank an ``expert_map [E]`` (else every
    rank would compute every expert and the sum would count each several times), and the w2
    bias on tp rank 0 only (it is added once, before the sum).
    """
    layout = ParallelLayout.from_groups(ep_group, tp_group)
    ep_world, tp_rank = layout.ep_world, layout.tp_rank
    if ep_world > 1:
        if expert_map is None:
            raise ValueError(
                f"an ep_group of {ep_world} ranks needs an expert_map [E={num_experts}] (local "
                f"index or -1); use MXFP4MoE.shard or from_gpt_oss to build one"
            )
        if tuple(expert_map.shape) != (num_experts,):
            raise ValueError(
                f"expert_map must be [E] = ({num_experts},) like the router, got "
                f"{tuple(expert_map.shape)}"
            )
    if tp_rank != 0 and w2_bias is not None:
        raise ValueError(
            f"tp rank {tp_rank} was given a w2 bias: the outputs are summed over the tp group, "
            f"so only tp rank 0 may hold it"
        )


def make_expert_map(num_experts: int, experts: range, device=None) -> torch.Tensor:
    """int32 ``[num_experts]``: the local index of each global expert in ``experts``, else -1."""
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    expert_map[experts.start:experts.stop] = torch.arange(
        len(experts), dtype=torch.int32, device=device
    )
    return expert_map


# Every slice below is a fresh contiguous tensor (torch.cat and clone copy), never a view: the
# layer that was sharded can be freed, and its full-size storage with it.


def _rows(t: torch.Tensor, experts: range, runs: list[range]) -> torch.Tensor:
    """``t[experts]`` restricted to the row runs of dim 1, stacked in order, as a copy."""
    picked = t[experts.start:experts.stop]
    return torch.cat([picked[:, run.start:run.stop] for run in runs], dim=1)


def slice_w13(w13: MXFP4Tensor, experts: range, rows: list[range]) -> MXFP4Tensor:
    """w13 ``[E, 2I, H]`` -> ``[E_local, 2I_local, H]``: the experts, then the row runs of
    `w13_row_ranges`. Rows are whole (K = H is not split), so blocks and scales slice alike."""
    return MXFP4Tensor(_rows(w13.blocks, experts, rows), _rows(w13.scales, experts, rows))


def slice_w13_bias(bias: torch.Tensor | None, experts: range, rows: list[range]):
    """w13 bias ``[E, 2I]`` -> ``[E_local, 2I_local]``, the same rows as `slice_w13`."""
    if bias is None:
        return None
    return _rows(bias.unsqueeze(-1), experts, rows).squeeze(-1)


def slice_w2(w2: MXFP4Tensor, experts: range, inter: range) -> MXFP4Tensor:
    """w2 ``[E, H, I]`` -> ``[E_local, H, I_local]``: columns ``inter`` of K = I, i.e. bytes
    ``[start/2, stop/2)`` of the blocks and scales ``[start/32, stop/32)`` (``inter`` is
    block-aligned, so no scale block is cut)."""
    if inter.start % MXFP4_BLOCK_SIZE or inter.stop % MXFP4_BLOCK_SIZE:
        raise ValueError(
            f"slice_w2: the intermediate slice must follow {MXFP4_BLOCK_SIZE}-element blocks, "
            f"got [{inter.start}, {inter.stop})"
        )
    picked = slice(experts.start, experts.stop)
    blocks = w2.blocks[picked, :, inter.start // 2:inter.stop // 2]
    scales = w2.scales[picked, :, inter.start // MXFP4_BLOCK_SIZE:inter.stop // MXFP4_BLOCK_SIZE]
    return MXFP4Tensor(blocks.clone(memory_format=torch.contiguous_format),
                       scales.clone(memory_format=torch.contiguous_format))


def slice_w2_bias(bias: torch.Tensor | None, experts: range, tp_rank: int):
    """w2 bias ``[E, H]`` -> ``[E_local, H]`` on tp rank 0 and None on the others: the output
    is summed over the tp group, so the bias must be added by exactly one of its ranks."""
    if bias is None or tp_rank != 0:
        return None
    return bias[experts.start:experts.stop].clone(memory_format=torch.contiguous_format)


@dataclass
class ExpertShard:
    """One rank's part of a layer's experts, as `MXFP4MoE` takes them."""

    w13: MXFP4Tensor  # [E_local, 2I_local, H]
    w2: MXFP4Tensor  # [E_local, H, I_local]
    w13_bias: torch.Tensor | None  # [E_local, 2I_local]
    w2_bias: torch.Tensor | None  # [E_local, H], tp rank 0 only
    expert_map: torch.Tensor | None  # int32 [E_global]; None when ep_world == 1


def shard_experts(
    w13: MXFP4Tensor,
    w2: MXFP4Tensor,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    *,
    activation,
    layout: ParallelLayout,
) -> ExpertShard:
    """Slice whole expert tensors (w13 ``[E, 2I, H]``, w2 ``[E, H, I]``, biases) to ``layout``.

    Raises ValueError when the tp world is larger than the number of 32-blocks in I.
    """
    num_experts, two_i, _ = w13.shape
    intermediate = two_i // 2
    experts = layout.experts(num_experts)
    inter = layout.intermediate(intermediate)
    rows = w13_row_ranges(intermediate, inter, activation)
    expert_map = None
    if layout.ep_world > 1:
        expert_map = make_expert_map(num_experts, experts, device=w13.device)
    return ExpertShard(
        w13=slice_w13(w13, experts, rows),
        w2=slice_w2(w2, experts, inter),
        w13_bias=slice_w13_bias(w13_bias, experts, rows),
        w2_bias=slice_w2_bias(w2_bias, experts, layout.tp_rank),
        expert_map=expert_map,
    )


def ep_tp_groups(tp_size: int):
    """Split the default process group of W ranks into an ``ep x tp`` mesh, W = ep * tp, with
    tp inner (global ranks ``[e*tp, (e+1)*tp)`` form a tp group, so tensor parallelism stays on
    neighbouring GPUs), and return this rank's ``(ep_group, tp_group)``.

    Every rank must call it (each `torch.distributed.new_group` is collective). Raises
    ValueError, on every rank before any collective, when tp_size does not divide W.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size != 0:
        raise ValueError(f"tp_size must divide the world size {world}, got {tp_size}")
    ep_size = world // tp_size
    rank = dist.get_rank()
    ep_group = tp_group = None
    for e in range(ep_size):
        ranks = [e * tp_size + t for t in range(tp_size)]
        made = dist.new_group(ranks)
        if rank in ranks:
            tp_group = made
    for t in range(tp_size):
        ranks = [e * tp_size + t for e in range(ep_size)]
        made = dist.new_group(ranks)
        if rank in ranks:
            ep_group = made
    return ep_group, tp_group
