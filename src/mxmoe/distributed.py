"""Expert and tensor parallelism over torch.distributed.

The partitions are pure functions of (size, world, rank), so that every rank, and the
checkpoint loader, computes the same slices without communicating.
"""

from __future__ import annotations

from .constants import MXFP4_BLOCK_SIZE

__all__ = ["expert_range", "intermediate_range", "w13_row_ranges"]


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
    """Rows of w13 ``[E, 2I, H]`` (and of its bias) that hold the intermediate slice ``inter``.

    ``"swigluoai"`` interleaves gate and up rows, so the slice is one run ``[2*start, 2*stop)``;
    ``"silu"`` stores ``[gate | up]`` halves, so it is two runs, ``[start, stop)`` and
    ``[I + start, I + stop)``, which the local layer stacks in that order (again ``[gate | up]``).
    """
    from .activations import Activation

    if Activation.parse(activation) is Activation.SWIGLUOAI:
        return [range(2 * inter.start, 2 * inter.stop)]
    return [inter, range(intermediate + inter.start, intermediate + inter.stop)]
