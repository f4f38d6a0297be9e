"""Alignment of (token, slot) pairs by expert in one Triton program (decode-sized problems).

Same contract and same (stable) order as `mxmoe.routing.align_by_expert`; one launch instead of
a dozen small torch ops, which is what a decode step's latency is made of.
"""

import triton
import triton.language as tl


@triton.jit
def _local_expert(topk_ids_ptr, expert_map_ptr, offs, num_pairs, num_global, num_local,
                  HAS_MAP: tl.constexpr):
    """Local expert of each pair; pairs out of range, remote or past the end -> num_local."""
    inside = offs < num_pairs
    # int64 until the range checks: an int64 id such as 2**32 + 1 must not wrap onto expert 1.
    ids = tl.load(topk_ids_ptr + offs, mask=inside, other=-1).to(tl.int64)
    local = ids
    if HAS_MAP:
        in_range = inside & (ids >= 0) & (ids < num_global)
        local = tl.load(expert_map_ptr + ids, mask=in_range, other=-1).to(tl.int64)
    valid = inside & (local >= 0) & (local < num_local)
    return tl.where(valid, local, num_local).to(tl.int32)


@triton.jit
def align_kernel(
    topk_ids_ptr,  # (num_pairs,) int32/int64 global expert ids
    expert_map_ptr,  # (num_global,) int32/int64 local id or -1 (unused without HAS_MAP)
    sorted_ids_ptr,  # (max_blocks * BLOCK_M,) int32 out
    expert_ids_ptr,  # (max_blocks,) int32 out
    num_post_padded_ptr,  # (1,) int32 out
    num_pairs,
    num_global,
    num_local,
    max_blocks,
    HAS_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,  # a power of two > num_local (bin num_local collects the rest)
    CHUNK: tl.constexpr,
):
    """Grid: (1,)."""
    bins = tl.arange(0, NUM_BINS)
    is_expert = bins < num_local

    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        local = _local_expert(topk_ids_ptr, expert_map_ptr, start + tl.arange(0, CHUNK),
                              num_pairs, num_global, num_local, HAS_MAP)
        counts += tl.histogram(local, NUM_BINS)
    counts = tl.where(is_expert, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(num_post_padded_ptr, total)

    # Block b belongs to the expert whose padded run covers row b * BLOCK_M: the number of
    # experts whose run ends at or before that row (empty experts end where the last one did).
    for b0 in range(0, max_blocks, CHUNK):
        offs_b = b0 + tl.arange(0, CHUNK)
        row = offs_b * BLOCK_M
        ended = (ends[None, :] <= row[:, None]) & is_expert[None, :]
        expert = tl.sum(ended.to(tl.int32), 1)
        expert = tl.where(row < total, expert, -1)
        tl.store(expert_ids_ptr + offs_b, expert, mask=offs_b < max_blocks)

    for p0 in range(0, max_blocks * BLOCK_M, CHUNK):
        offs_p = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + offs_p, tl.full((CHUNK,), 0, tl.int32) + num_pairs,
                 mask=offs_p < max_blocks * BLOCK_M)
    # The scatter below overwrites some of those sentinels from other threads.
    tl.debug_barrier()

    running = starts
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        local = _local_expert(topk_ids_ptr, expert_map_ptr, offs, num_pairs, num_global,
                              num_local, HAS_MAP)
        onehot = (local[:, None] == bins[None, :]).to(tl.int32)  # (CHUNK, NUM_BINS)
        earlier = tl.cumsum(onehot, 0) - onehot  # same-expert pairs before this one in the chunk
        position = tl.sum((earlier + running[None, :]) * onehot, 1)
        tl.store(sorted_ids_ptr + position, offs, mask=local < num_local)
        running += tl.sum(onehot, 0)
