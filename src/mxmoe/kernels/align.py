"""Launcher of the alignment kernels (`_align`): sort the (token, slot) pairs by local expert,
each expert's run padded to the M tile (the `mxmoe.routing.Alignment` contract).

Up to `ALIGN_ONE_PROGRAM_MAX_PAIRS` pairs it is one Triton program; above, three launches over
chunks of pairs (count, offsets, scatter) that spread over the GPU. No host synchronisation.
"""

from __future__ import annotations

import torch

from .. import settings
from ..routing import Alignment, max_aligned_blocks
from ._align import align_count_kernel, align_kernel, align_offsets_kernel, align_scatter_kernel
from .launch import LaunchPlan, Launcher, Ref, Step, Workspace, cdiv, next_power_of_2

#: Up to this many (token, slot) pairs the alignment runs as one Triton program; above, as three
#: launches over chunks of pairs (count, offsets, scatter) that spread over the GPU.
ALIGN_ONE_PROGRAM_MAX_PAIRS = 1024
#: Chunks of pairs of the multi-program alignment (its offsets program holds a chunk x expert
#: table in registers), and the pairs each step of the alignments' loops takes (each step holds
#: a pairs x experts one-hot table): both shrink with many experts to stay in registers.
ALIGN_MAX_CHUNKS = 64
ALIGN_SUB = 128
_ALIGN_TABLE_ELEMENTS = 32768  # as measured on the H100 with 256 bins (gpt-oss-120b)

_align_one = Launcher(align_kernel)
_align_count = Launcher(align_count_kernel)
_align_offsets = Launcher(align_offsets_kernel)
_align_scatter = Launcher(align_scatter_kernel)


def _align_sizes(num_bins: int) -> tuple[int, int]:
    """(pairs per loop step, most chunks) for ``num_bins`` expert bins (powers of two)."""
    if settings.current().interpret:
        return 16, 4
    fit = max(1, _ALIGN_TABLE_ELEMENTS // num_bins)
    return max(16, min(ALIGN_SUB, fit)), max(4, min(ALIGN_MAX_CHUNKS, fit))


class AlignmentRefs:
    """Where the planned alignment's outputs lie: `Ref`s with `routing.Alignment`'s fields."""

    def __init__(self, sorted_ids: Ref, expert_ids: Ref, num_tokens_post_padded: Ref,
                 block_m: int):
        self.sorted_ids = sorted_ids
        self.expert_ids = expert_ids
        self.num_tokens_post_padded = num_tokens_post_padded
        self.block_m = block_m


def plan_align(steps: list, workspace: Workspace, topk_ids: Ref, expert_map: Ref | None,
               num_pairs: int, block_m: int, num_local: int, num_global: int) -> AlignmentRefs:
    """Append the alignment's launches to ``steps``, its buffers taken from ``workspace``.

    ``topk_ids`` and ``expert_map`` must name flat unit-stride int tensors (the kernels index
    them flat); `fused_moe` makes them so.
    """
    max_blocks = max_aligned_blocks(num_pairs, num_local, block_m)
    rows = max_blocks * block_m
    sorted_ids = workspace.take((rows,), torch.int32)
    expert_ids = workspace.take((max_blocks,), torch.int32)
    total = workspace.take((1,), torch.int32)
    aligned = AlignmentRefs(sorted_ids, expert_ids, total, block_m)
    has_map = expert_map is not None
    emap = expert_map if has_map else topk_ids
    num_bins = next_power_of_2(num_local + 1)
    sub, max_chunks = _align_sizes(num_bins)
    if num_pairs <= ALIGN_ONE_PROGRAM_MAX_PAIRS:
        steps.append(Step(_align_one, (1,), dict(
            topk_ids_ptr=topk_ids, expert_map_ptr=emap, sorted_ids_ptr=sorted_ids,
            expert_ids_ptr=expert_ids, num_post_padded_ptr=total, num_pairs=num_pairs,
            num_global=num_global, num_local=num_local, max_blocks=max_blocks,
            HAS_MAP=has_map, BLOCK_M=block_m, NUM_BINS=num_bins, CHUNK=sub, num_warps=4,
        )))
        return aligned

    pairs_per_chunk = cdiv(cdiv(num_pairs, max_chunks), sub) * sub
    chunks = cdiv(num_pairs, pairs_per_chunk)
    chunk_counts = workspace.take((max_chunks * num_bins,), torch.int32)
    chunk_base = workspace.take((max_chunks * num_bins,), torch.int32)
    ends = workspace.take((num_bins,), torch.int32)
    steps.append(Step(_align_count, (chunks,), dict(
        topk_ids_ptr=topk_ids, expert_map_ptr=emap, sorted_ids_ptr=sorted_ids,
        chunk_counts_ptr=chunk_counts, num_pairs=num_pairs, num_global=num_global,
        num_local=num_local, pairs_per_chunk=pairs_per_chunk, num_rows=rows,
        rows_per_program=cdiv(cdiv(rows, chunks), sub) * sub,
        HAS_MAP=has_map, NUM_BINS=num_bins, SUB=sub, num_warps=4,
    )))
    steps.append(Step(_align_offsets, (1,), dict(
        chunk_counts_ptr=chunk_counts, chunk_base_ptr=chunk_base, ends_ptr=ends,
        num_post_padded_ptr=total, num_chunks=chunks, num_local=num_local,
        BLOCK_M=block_m, NUM_BINS=num_bins, MAX_CHUNKS=max_chunks,
        num_warps=8 if num_bins >= 128 else 4,
    )))
    steps.append(Step(_align_scatter, (chunks,), dict(
        topk_ids_ptr=topk_ids, expert_map_ptr=emap, sorted_ids_ptr=sorted_ids,
        expert_ids_ptr=expert_ids, chunk_base_ptr=chunk_base, ends_ptr=ends,
        num_post_padded_ptr=total, num_pairs=num_pairs, num_global=num_global,
        num_local=num_local, pairs_per_chunk=pairs_per_chunk, max_blocks=max_blocks,
        blocks_per_program=cdiv(cdiv(max_blocks, chunks), sub) * sub,
        HAS_MAP=has_map, BLOCK_M=block_m, NUM_BINS=num_bins, SUB=sub, num_warps=4,
    )))
    return aligned


def align(topk_ids: torch.Tensor, block_m: int, num_local: int, num_global: int,
          expert_map: torch.Tensor | None) -> Alignment:
    """Sort the pairs by local expert, padded to ``block_m`` (the planned launches, run once).

    ``topk_ids`` and ``expert_map`` must be flat unit-stride int tensors.
    """
    steps: list = []
    workspace = Workspace(2)
    aligned = plan_align(steps, workspace, Ref.of(0, topk_ids),
                         None if expert_map is None else Ref.of(1, expert_map),
                         topk_ids.numel(), block_m, num_local, num_global)
    buffer = torch.empty(max(workspace.nbytes, 1), dtype=torch.uint8, device=topk_ids.device)
    tensors = (topk_ids, expert_map, buffer)
    LaunchPlan(steps).run(tensors)
    return Alignment(aligned.sorted_ids.materialize(tensors),
                     aligned.expert_ids.materialize(tensors),
                     aligned.num_tokens_post_padded.materialize(tensors), block_m)
