"""Alignment of (token, slot) pairs by expert, in Triton.

Same contract and same (stable) order as `mxmoe.routing.align_by_expert`. Decode-sized problems
take one program (one launch instead of a dozen small torch ops, which is what a decode step's
latency is made of); larger ones take three launches over chunks of pairs (below).
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


# ---------------------------------------------------------------------------------------------
# Many pairs (prefill): the same alignment in three launches that spread over the GPU. The pairs
# are cut into at most MAX_CHUNKS contiguous chunks; every chunk is counted by its own program,
# one program turns the per-chunk counts into each chunk's first row per expert, and the chunks
# are scattered in parallel. Within an expert, chunk c's pairs come after those of chunks < c,
# in flat order inside the chunk: the same stable order as the one-program kernel.

@triton.jit
def align_count_kernel(
    topk_ids_ptr, expert_map_ptr,
    sorted_ids_ptr,  # (num_rows,) int32 out: every entry set to the sentinel num_pairs here
    chunk_counts_ptr,  # (MAX_CHUNKS, NUM_BINS) int32 out: pairs of each chunk per local expert
    num_pairs, num_global, num_local, pairs_per_chunk, num_rows, rows_per_program,
    HAS_MAP: tl.constexpr,
    NUM_BINS: tl.constexpr,
    SUB: tl.constexpr,
):
    """Grid: (chunks,). pairs_per_chunk and rows_per_program are multiples of SUB."""
    chunk = tl.program_id(0)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    first = chunk * pairs_per_chunk
    for start in range(first, first + pairs_per_chunk, SUB):
        offs = start + tl.arange(0, SUB)
        local = _local_expert(topk_ids_ptr, expert_map_ptr, offs, tl.minimum(num_pairs,
                              first + pairs_per_chunk), num_global, num_local, HAS_MAP)
        counts += tl.histogram(local, NUM_BINS)
    tl.store(chunk_counts_ptr + chunk * NUM_BINS + tl.arange(0, NUM_BINS), counts)

    # This program's share of the sentinel fill (the scatter, two launches later, overwrites).
    row0 = chunk * rows_per_program
    for r in range(row0, row0 + rows_per_program, SUB):
        offs_r = r + tl.arange(0, SUB)
        tl.store(sorted_ids_ptr + offs_r, tl.full((SUB,), 0, tl.int32) + num_pairs,
                 mask=offs_r < num_rows)


@triton.jit
def align_offsets_kernel(
    chunk_counts_ptr,  # (MAX_CHUNKS, NUM_BINS) int32 in: rows past num_chunks unused
    chunk_base_ptr,  # (MAX_CHUNKS, NUM_BINS) int32 out: first row of each chunk per expert
    ends_ptr,  # (NUM_BINS,) int32 out: end row of each expert's padded run (0 past the last)
    num_post_padded_ptr,  # (1,) int32 out
    num_chunks, num_local,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    """Grid: (1,)."""
    chunks = tl.arange(0, MAX_CHUNKS)
    bins = tl.arange(0, NUM_BINS)
    is_expert = bins < num_local
    grid = chunks[:, None] * NUM_BINS + bins[None, :]
    per_chunk = tl.load(chunk_counts_ptr + grid,
                        mask=(chunks[:, None] < num_chunks) & is_expert[None, :], other=0)
    counts = tl.sum(per_chunk, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(num_post_padded_ptr, tl.sum(padded, 0))
    tl.store(ends_ptr + bins, ends)
    before = tl.cumsum(per_chunk, 0) - per_chunk  # pairs of earlier chunks, per expert
    tl.store(chunk_base_ptr + grid, starts[None, :] + before)


@triton.jit
def align_scatter_kernel(
    topk_ids_ptr, expert_map_ptr,
    sorted_ids_ptr,  # (max_blocks * BLOCK_M,) int32 out
    expert_ids_ptr,  # (max_blocks,) int32 out
    chunk_base_ptr, ends_ptr, num_post_padded_ptr,  # from align_offsets_kernel
    num_pairs, num_global, num_local, pairs_per_chunk, max_blocks, blocks_per_program,
    HAS_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
    SUB: tl.constexpr,
):
    """Grid: (chunks,). Scatter this chunk's pairs, and write this program's share of the
    block -> expert table."""
    chunk = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    is_expert = bins < num_local
    running = tl.load(chunk_base_ptr + chunk * NUM_BINS + bins)
    first = chunk * pairs_per_chunk
    for start in range(first, first + pairs_per_chunk, SUB):
        offs = start + tl.arange(0, SUB)
        local = _local_expert(topk_ids_ptr, expert_map_ptr, offs, tl.minimum(num_pairs,
                              first + pairs_per_chunk), num_global, num_local, HAS_MAP)
        onehot = (local[:, None] == bins[None, :]).to(tl.int32)  # (SUB, NUM_BINS)
        earlier = tl.cumsum(onehot, 0) - onehot
        position = tl.sum((earlier + running[None, :]) * onehot, 1)
        tl.store(sorted_ids_ptr + position, offs, mask=local < num_local)
        running += tl.sum(onehot, 0)

    ends = tl.load(ends_ptr + bins)
    total = tl.load(num_post_padded_ptr)
    b_first = chunk * blocks_per_program
    for b0 in range(b_first, b_first + blocks_per_program, SUB):
        offs_b = b0 + tl.arange(0, SUB)
        row = offs_b * BLOCK_M
        ended = (ends[None, :] <= row[:, None]) & is_expert[None, :]
        expert = tl.sum(ended.to(tl.int32), 1)
        expert = tl.where(row < total, expert, -1)
        tl.store(expert_ids_ptr + offs_b, expert, mask=offs_b < max_blocks)
