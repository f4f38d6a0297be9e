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
def _count_pairs(topk_ids_ptr, expert_map_ptr, first, end, num_global, num_local,
                 HAS_MAP: tl.constexpr, NUM_BINS: tl.constexpr, STEP: tl.constexpr):
    """Pairs [first, end) per local expert (bin num_local: remote or out of range)."""
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for start in range(first, end, STEP):
        local = _local_expert(topk_ids_ptr, expert_map_ptr, start + tl.arange(0, STEP), end,
                              num_global, num_local, HAS_MAP)
        counts += tl.histogram(local, NUM_BINS)
    return counts


@triton.jit
def _padded_runs(counts, is_expert, BLOCK_M: tl.constexpr):
    """Each local expert's run padded to BLOCK_M rows: (ends, starts, rows in use)."""
    padded = (tl.where(is_expert, counts, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    return ends, ends - padded, tl.sum(padded, 0)


@triton.jit
def _fill_sentinels(sorted_ids_ptr, first, end, num_rows, sentinel, STEP: tl.constexpr):
    """sorted_ids[first:end] (clipped to num_rows) = sentinel."""
    for r in range(first, end, STEP):
        offs = r + tl.arange(0, STEP)
        tl.store(sorted_ids_ptr + offs, tl.full((STEP,), 0, tl.int32) + sentinel,
                 mask=offs < num_rows)


@triton.jit
def _scatter_pairs(topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, running, first, end,
                   num_global, num_local, HAS_MAP: tl.constexpr, NUM_BINS: tl.constexpr,
                   STEP: tl.constexpr):
    """Write pairs [first, end) to their rows: ``running`` is each expert's next free row;
    same-expert pairs keep their flat order."""
    bins = tl.arange(0, NUM_BINS)
    for start in range(first, end, STEP):
        offs = start + tl.arange(0, STEP)
        local = _local_expert(topk_ids_ptr, expert_map_ptr, offs, end, num_global, num_local,
                              HAS_MAP)
        onehot = (local[:, None] == bins[None, :]).to(tl.int32)  # (STEP, NUM_BINS)
        earlier = tl.cumsum(onehot, 0) - onehot  # same-expert pairs before this one in the step
        position = tl.sum((earlier + running[None, :]) * onehot, 1)
        tl.store(sorted_ids_ptr + position, offs, mask=local < num_local)
        running += tl.sum(onehot, 0)


@triton.jit
def _write_block_experts(expert_ids_ptr, ends, is_expert, total, first, end, max_blocks,
                         BLOCK_M: tl.constexpr, STEP: tl.constexpr):
    """expert_ids[first:end] (clipped to max_blocks). Block b belongs to the expert whose padded
    run covers row b * BLOCK_M: the number of experts whose run ends at or before that row
    (empty experts end where the last one did); -1 past the rows in use."""
    for b0 in range(first, end, STEP):
        offs_b = b0 + tl.arange(0, STEP)
        row = offs_b * BLOCK_M
        ended = (ends[None, :] <= row[:, None]) & is_expert[None, :]
        expert = tl.sum(ended.to(tl.int32), 1)
        expert = tl.where(row < total, expert, -1)
        tl.store(expert_ids_ptr + offs_b, expert, mask=offs_b < max_blocks)


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
    is_expert = tl.arange(0, NUM_BINS) < num_local
    counts = _count_pairs(topk_ids_ptr, expert_map_ptr, 0, num_pairs, num_global, num_local,
                          HAS_MAP, NUM_BINS, CHUNK)
    ends, starts, total = _padded_runs(counts, is_expert, BLOCK_M)
    tl.store(num_post_padded_ptr, total)
    _write_block_experts(expert_ids_ptr, ends, is_expert, total, 0, max_blocks, max_blocks,
                         BLOCK_M, CHUNK)
    _fill_sentinels(sorted_ids_ptr, 0, max_blocks * BLOCK_M, max_blocks * BLOCK_M, num_pairs,
                    CHUNK)
    # The scatter below overwrites some of those sentinels from other threads.
    tl.debug_barrier()
    _scatter_pairs(topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, starts, 0, num_pairs,
                   num_global, num_local, HAS_MAP, NUM_BINS, CHUNK)


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
    first = chunk * pairs_per_chunk
    counts = _count_pairs(topk_ids_ptr, expert_map_ptr, first,
                          tl.minimum(num_pairs, first + pairs_per_chunk), num_global, num_local,
                          HAS_MAP, NUM_BINS, SUB)
    tl.store(chunk_counts_ptr + chunk * NUM_BINS + tl.arange(0, NUM_BINS), counts)
    # This program's share of the sentinel fill (the scatter, two launches later, overwrites).
    row0 = chunk * rows_per_program
    _fill_sentinels(sorted_ids_ptr, row0, row0 + rows_per_program, num_rows, num_pairs, SUB)


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
    ends, starts, total = _padded_runs(tl.sum(per_chunk, 0), is_expert, BLOCK_M)
    tl.store(num_post_padded_ptr, total)
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
    first = chunk * pairs_per_chunk
    _scatter_pairs(topk_ids_ptr, expert_map_ptr, sorted_ids_ptr,
                   tl.load(chunk_base_ptr + chunk * NUM_BINS + bins), first,
                   tl.minimum(num_pairs, first + pairs_per_chunk), num_global, num_local,
                   HAS_MAP, NUM_BINS, SUB)
    b_first = chunk * blocks_per_program
    _write_block_experts(expert_ids_ptr, tl.load(ends_ptr + bins), bins < num_local,
                         tl.load(num_post_padded_ptr), b_first, b_first + blocks_per_program,
                         max_blocks, BLOCK_M, SUB)
