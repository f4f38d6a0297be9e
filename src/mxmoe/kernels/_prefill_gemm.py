"""The grouped GEMM of the fused MoE for the compute-bound regime (prefill): a Hopper structure.

One kernel for both GEMMs, with MXFP4 weights in the MMA_LANES layout (`mxmoe.layouts`):
- GEMM1: A = hidden states (rows gathered through the aligned pair ids, ``pair // top_k``),
  W = w13; epilogue: bias, gated activation (N/2 output columns).
- GEMM2: A = GEMM1's activations; W = w2; epilogue: bias, routing weight.

Structure:
- Swap-AB: the accumulator is ``C^T = W X^T``, (BLOCK_N weight rows, BLOCK_M tokens). The
  decoded weight tile is the MMA's *register* operand (Hopper's wgmma takes A from registers), so
  it never goes through shared memory after the upcast; the token tile is the shared-memory
  operand, BLOCK_M wide (wgmma's N, up to 256), which spreads the upcast over more MMA work.
- Persistent: ``num_programs`` programs walk the (M block, N tile) work items of the blocks in
  use, GROUP_M M blocks at a time along N, so concurrent programs share weight and token tiles
  in L2. Blocks past ``num_tokens_post_padded`` (the only blocks without a local expert) are
  never visited.
- The K loop is software-pipelined (``tl.range(num_stages=...)``): the packed weight bytes and
  the token tile go global -> shared asynchronously (cp.async; TMA for a token tile given as a
  tensor descriptor), several stages deep. The scales (a few hundred bytes a step, too few per
  thread for cp.async) are byte loads issued one step ahead. With ``W_TMA`` the codes and the
  K-major scales are TMA boxes too, the tile's rows as they lie (gated: gate and up rows
  interleaved, paired in the epilogue). (Triton 3.6's automatic warp specialization,
  ``tl.range(warp_specialize=True)``, does not take this loop on sm_90 even with every load a
  descriptor: with 8 warps it is not applied (not even to bf16 operands), with 4 its pass fails
  on the register-operand upcast; scripts/inspect_warp_specialize.py.)
- Weights upcast in registers: each lane's eight codes of a row and 32-group are one 32-bit
  word of the MMA_LANES layout, loaded as an int32; `_upcast_mma_lanes_words` turns it into
  its four bf16x2 operand registers (a rotation and a mask each, then the E8M0 scale: PTX, bf16
  on NVIDIA) or the same bits through float32 (fp16/fp32, the interpreter).
- Gated epilogue without a shuffle: a tile's weight rows are ordered so that the gate and up
  rows of an output column are rows ``r`` and ``r + 8`` of a 16-row group, which the MMA
  accumulator layout gives to the same thread.

Rows of A and of the output are either pair rows (``a[pair // A_ROW_DIV]``, ``out[pair]``: the
contract of `fused_moe._Gemm.launch`) or *sorted* rows: row ``i`` of the alignment (what GEMM1
can write for GEMM2 to read as contiguous tiles, by TMA).

``DENSE`` runs the same structure on dense weights in the dot dtype (both MMA operands from
shared memory): what the upcast costs is the difference.
"""

import triton
import triton.language as tl

from ._grouped import (GATE_UP_8_APART, WEIGHT_AFTER_BIAS, WEIGHT_BEFORE_BIAS, WEIGHT_NONE,
                       _gated_tile_rows, _output_columns)
from ._moe_gemm import _upcast_mma_lanes_words

# A_ROWS / OUT_ROWS: how the rows of A and of the output are indexed
ROWS_PAIR = tl.constexpr(0)  # A: a[pair // A_ROW_DIV]; out: out[pair]
ROWS_SORTED = tl.constexpr(1)  # row i of the alignment (sorted_ids[i]'s slot); padding included

__all__ = ["prefill_gemm_kernel", "gather_rows_kernel", "ROWS_PAIR", "ROWS_SORTED"]


@triton.jit
def _paired_tile_rows(pid_n, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                      INTERLEAVED: tl.constexpr):
    """(weight rows, their mask) of N tile ``pid_n``. Gated: row ``t`` of the tile is the gate
    (``t % 16 < 8``) or the up row (``t % 16 >= 8``) of output column
    ``pid_n * BLOCK_N / 2 + 8 * (t // 16) + t % 8``."""
    return _gated_tile_rows(pid_n, N, GATED, INTERLEAVED, BLOCK_N, GATE_UP_8_APART)


@triton.jit
def _load_scale_runs(s_ptr, first_row, num_rows, offs_g, K, stride_sn, stride_sk,
                     ROWS: tl.constexpr, EVEN_K: tl.constexpr):
    """(GROUPS, ROWS) scales of rows ``first_row + 0..ROWS-1`` (rows >= num_rows: 0). In the
    K-major scales of MMA_LANES (stride_sn == 1) each group's run is contiguous bytes."""
    rows = first_row + tl.arange(0, ROWS)
    mask = rows[None, :] < num_rows
    if not EVEN_K:
        mask = mask & (offs_g[:, None] < K // 32)
    return tl.load(s_ptr + offs_g[:, None] * stride_sk + rows[None, :].to(tl.int64) * stride_sn,
                   mask=mask, other=0)


@triton.jit
def _tile_scales(s_ptr, pid_n, N, k0, K, stride_sn, stride_sk, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K / 32) scales of N tile ``pid_n``, its rows in `_paired_tile_rows`'
    order, loaded as runs of consecutive rows and put in that order in registers."""
    GROUPS: tl.constexpr = BLOCK_K // 32
    offs_g = k0 // 32 + tl.arange(0, GROUPS)
    if not GATED:
        runs = _load_scale_runs(s_ptr, pid_n * BLOCK_N, N, offs_g, K, stride_sn, stride_sk,
                                BLOCK_N, EVEN_K)
        return tl.trans(runs)
    if INTERLEAVED:
        # Rows 2c (gate) and 2c + 1 (up) of columns c: one run of BLOCK_N rows.
        runs = _load_scale_runs(s_ptr, pid_n * BLOCK_N, N, offs_g, K, stride_sn, stride_sk,
                                BLOCK_N, EVEN_K)
        by_side = tl.reshape(runs, (GROUPS, BLOCK_N // 16, 8, 2))  # (g, a, b, side)
    else:
        half = N // 2
        first = pid_n * (BLOCK_N // 2)
        gate = _load_scale_runs(s_ptr, first, half, offs_g, K, stride_sn, stride_sk,
                                BLOCK_N // 2, EVEN_K)
        up = _load_scale_runs(s_ptr + half * stride_sn, first, half, offs_g, K, stride_sn,
                              stride_sk, BLOCK_N // 2, EVEN_K)
        by_side = tl.join(tl.reshape(gate, (GROUPS, BLOCK_N // 16, 8)),
                          tl.reshape(up, (GROUPS, BLOCK_N // 16, 8)))
    # Tile row 16a + 8 side + b.
    tile = tl.reshape(tl.permute(by_side, (0, 1, 3, 2)), (GROUPS, BLOCK_N))
    return tl.trans(tile)


@triton.jit
def _retired(acc):
    """``acc`` through an empty inline asm (no instruction): a use that is not a dot, so Triton
    waits for every pending wgmma here. The portable upcast, and any tile whose tokens come by
    cp.async, need it on Triton 3.6, which otherwise lets the next K step's upcast write the
    registers of wgmmas still in flight (`mxmoe.kernels.sass.register_operand_hazards`); the
    PTX upcast with TMA token tiles, as every shipped tile has, compiles without that write."""
    return tl.inline_asm_elementwise("", "=f,0", [acc], dtype=tl.float32, is_pure=False,
                                     pack=1)


@triton.jit
def prefill_gemm_kernel(
    a_ptr,  # (A_rows, K) activation dtype (ROWS_PAIR: row of pair p is p // A_ROW_DIV)
    a_desc,  # tensor descriptor of a, block (BLOCK_M, BLOCK_K), when A_TMA (else a_ptr again)
    w_desc,  # W_TMA: descriptor of the words (E, N, K // 8), block (1, BLOCK_N, BLOCK_K // 8)
    s_desc,  # W_TMA: descriptor of the K-major scales (E, K // 32, N), block (1, GROUPS, BLOCK_N)
    w_ptr,  # (E, N, K // 2) uint8 MXFP4 codes, MMA_LANES (read as words); DENSE: (E, N, K)
    w_scale_ptr,  # (E, N, K // 32) uint8 E8M0, K-major (MMA_LANES): stride 1 along N
    bias_ptr,  # (E, N) float (unused without HAS_BIAS)
    out_ptr,  # (out rows, N // 2 if GATED else N) activation dtype
    topk_weights_ptr,  # (num_pairs,) float32
    sorted_ids_ptr,  # (max_blocks * BLOCK_M,) int32 pair ids, sentinel = num_pairs
    expert_ids_ptr,  # (max_blocks,) int32 local expert of each block, -1: none here
    num_post_padded_ptr,  # (1,) int32 rows in use
    N,  # weight rows (2I for GEMM1, H for GEMM2)
    K,  # reduction size, a multiple of 32
    num_pairs,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_bias_e, stride_bias_n,
    stride_om, stride_on,
    alpha,
    limit,
    num_programs,  # the persistent grid
    A_ROW_DIV: tl.constexpr,
    A_ROWS: tl.constexpr,  # ROWS_PAIR or ROWS_SORTED
    OUT_ROWS: tl.constexpr,  # ROWS_PAIR or ROWS_SORTED
    A_TMA: tl.constexpr,  # load token tiles through a_desc (A_ROWS == ROWS_SORTED)
    GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # gated: gate/up rows interleave (else [gate | up] halves)
    ACT_FN: tl.constexpr,
    ROUTER_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DENSE: tl.constexpr,  # dense weights (the same GEMM without the upcast, to measure it)
    DEQUANT_PTX: tl.constexpr,  # bf16 on NVIDIA: the PTX conversion; else the fp32 decode
    SCALE_FOLD: tl.constexpr,  # every scale byte <= 128 (`layouts.scales_fold`): one product
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 dots (exact), None otherwise
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    BLOCK_M: tl.constexpr,  # tokens per tile (the alignment's block)
    BLOCK_N: tl.constexpr,  # weight rows per tile (gated: BLOCK_N / 2 output columns), % 16 == 0
    BLOCK_K: tl.constexpr,  # a multiple of 32
    GROUP_M: tl.constexpr,  # M blocks that walk the N tiles together
    NUM_STAGES: tl.constexpr,
    FLATTEN: tl.constexpr,  # flatten the tile and K loops into one pipelined loop
    W_TMA: tl.constexpr,  # codes and scales by TMA (ungated, or gated with INTERLEAVED rows)
    RETIRE_DOTS: tl.constexpr,  # compiled NVIDIA, unless PTX upcast + TMA tokens: dots retired
    # at the end of every K step (`_retired`)
):
    num_m_blocks = tl.load(num_post_padded_ptr) // BLOCK_M
    if GATED:
        num_n_tiles = tl.cdiv(N // 2, BLOCK_N // 2)
    else:
        num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m_blocks * num_n_tiles
    tiles_per_group = GROUP_M * num_n_tiles

    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        # GROUP_M consecutive M blocks (mostly one expert) take the N tiles in step: the
        # programs running at once read a few weight tiles and a few token tiles, from L2.
        group = tile // tiles_per_group
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
        in_group = tile % tiles_per_group
        pid_m = first_m + in_group % group_size
        pid_n = in_group // group_size

        # Every block below num_tokens_post_padded has a local expert (`Alignment`); a -1
        # would only mask the tile's store (no branch: the loop nest stays flat).
        expert_id = tl.load(expert_ids_ptr + pid_m)
        expert = tl.maximum(expert_id, 0).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        # Pair ids outside [0, num_pairs) (padding, or out of range) contribute nothing. (A
        # block comparison for the expert: a scalar & block mask trips the interpreter.)
        mask_m = ((pair >= 0) & (pair < num_pairs)
                  & ((tl.zeros((BLOCK_M,), tl.int32) + expert_id) >= 0))
        pair = tl.where(mask_m, pair, 0)
        if A_ROWS == ROWS_PAIR:
            # int64: row * stride passes 2**31 at large M.
            a_row = (pair // A_ROW_DIV).to(tl.int64)
        else:
            a_row = offs_m.to(tl.int64)
        if W_TMA:
            # The tile's rows as they lie (a TMA box): gated, gate and up of a column are rows
            # 2c and 2c + 1, paired in the epilogue.
            rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = rows < N
        else:
            rows, mask_n = _paired_tile_rows(pid_n, N, BLOCK_N, GATED, INTERLEAVED)
        rows64 = rows.to(tl.int64)
        w_rows = w_ptr + expert * stride_we + rows64[:, None] * stride_wn
        if not DENSE:
            # The codes as int32 words, one per MMA lane (rows are 16-byte aligned: strides
            # in bytes keep that known to the compiler, so the copies stay 16 bytes wide).
            w_rows = w_rows.to(tl.pointer_type(tl.int32))
        s_expert = w_scale_ptr + expert * stride_se
        a_rows = a_ptr + a_row[:, None] * stride_am

        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # The scales are byte loads that Triton cannot copy asynchronously: load each
        # step's one step ahead, so that their latency hides behind a step of MMAs.
        if not DENSE and not W_TMA:
            next_scale = _tile_scales(s_expert, pid_n, N, 0, K, stride_sn, stride_sk, BLOCK_N,
                                      BLOCK_K, GATED, INTERLEAVED, EVEN_K)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if W_TMA:
                # Out of the box (rows past N, K past its end) TMA reads zeros.
                e32 = expert.to(tl.int32)
                words = tl.reshape(w_desc.load([e32, pid_n * BLOCK_N, k0 // 8]),
                                   (BLOCK_N, BLOCK_K // 8))
                scale = tl.trans(tl.reshape(s_desc.load([e32, k0 // 32, pid_n * BLOCK_N]),
                                            (BLOCK_K // 32, BLOCK_N)))
                w = _upcast_mma_lanes_words(words, scale, DEQUANT_PTX, DOT_DTYPE, BLOCK_N,
                                            BLOCK_K, SCALE_FOLD)
            elif DENSE:
                w = tl.load(w_rows + offs_k[None, :] * stride_wk,
                            mask=mask_n[:, None] & (offs_k[None, :] < K), other=0.0)
            else:
                scale = next_scale
                next_scale = _tile_scales(s_expert, pid_n, N, k0 + BLOCK_K, K, stride_sn,
                                          stride_sk, BLOCK_N, BLOCK_K, GATED, INTERLEAVED,
                                          False)
                offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                if EVEN_K:
                    words = tl.load(w_rows + offs_w[None, :], mask=mask_n[:, None], other=0)
                else:
                    words = tl.load(w_rows + offs_w[None, :],
                                    mask=mask_n[:, None] & (offs_w[None, :] < K // 8),
                                    other=0)
                w = _upcast_mma_lanes_words(words, scale, DEQUANT_PTX, DOT_DTYPE, BLOCK_N,
                                            BLOCK_K, SCALE_FOLD)
            if A_TMA:
                a = a_desc.load([pid_m * BLOCK_M, k0])
            elif EVEN_K:
                a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=mask_m[:, None],
                            other=0.0)
            else:
                a = tl.load(a_rows + offs_k[None, :] * stride_ak,
                            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            acc = tl.dot(w, tl.trans(a.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
            if RETIRE_DOTS:
                acc = _retired(acc)

        # Epilogue, in the accumulator's (weight row, token) orientation.
        if ROUTER_WEIGHT != WEIGHT_NONE:
            routing_weight = tl.load(topk_weights_ptr + pair, mask=mask_m, other=0.0)
        if ROUTER_WEIGHT == WEIGHT_BEFORE_BIAS:
            acc = acc * routing_weight[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_bias_e + rows64 * stride_bias_n,
                           mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + bias[:, None]
        if ROUTER_WEIGHT == WEIGHT_AFTER_BIAS:
            acc = acc * routing_weight[None, :]

        if OUT_ROWS == ROWS_PAIR:
            out_row = pair.to(tl.int64)
        else:
            out_row = offs_m.to(tl.int64)
        if not GATED:
            result = acc
        else:
            if W_TMA:
                # Rows 2c (gate) and 2c + 1 (up): a shuffle, once per tile.
                gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N // 2, 2, BLOCK_M)),
                                               (0, 2, 1)))
            else:
                # Rows r and r + 8 of each 16 (gate, up) sit in one thread of the accumulator.
                pairs = tl.permute(tl.reshape(acc, (BLOCK_N // 16, 2, 8, BLOCK_M)),
                                   (0, 2, 3, 1))
                gate, up = tl.split(pairs)
            result = tl.reshape(ACT_FN(gate, up, alpha, limit), (BLOCK_N // 2, BLOCK_M))
        out_cols, mask_out = _output_columns(rows64, mask_n, pid_n, N, GATED, BLOCK_N)
        tl.store(
            out_ptr + out_row[None, :] * stride_om + out_cols[:, None] * stride_on,
            result.to(out_ptr.dtype.element_ty),
            mask=mask_m[None, :] & mask_out[:, None],
        )


@triton.jit
def gather_rows_kernel(
    src_ptr,  # (rows, K) activation dtype
    dst_ptr,  # (max_blocks * BLOCK_M, K): row i = src[sorted_ids[i] // ROW_DIV], 0 for padding
    sorted_ids_ptr,
    num_post_padded_ptr,
    num_pairs,
    K,
    stride_sm, stride_sk,
    stride_dm, stride_dk,
    ROW_DIV: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM1's tokens in expert order, so that its token tiles are contiguous (TMA).
    Grid: (cdiv(max_blocks * BLOCK_M, ROWS),); rows past num_tokens_post_padded are left alone."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = offs_m < tl.load(num_post_padded_ptr)
    pair = tl.load(sorted_ids_ptr + offs_m, mask=live, other=num_pairs)
    real = pair < num_pairs
    src_row = (pair // ROW_DIV).to(tl.int64)
    dst_row = offs_m.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k[None, :] < K
        row = tl.load(src_ptr + src_row[:, None] * stride_sm + offs_k[None, :] * stride_sk,
                      mask=real[:, None] & mask_k, other=0.0)
        tl.store(dst_ptr + dst_row[:, None] * stride_dm + offs_k[None, :] * stride_dk, row,
                 mask=live[:, None] & mask_k)
