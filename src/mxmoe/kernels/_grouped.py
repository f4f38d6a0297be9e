"""What the grouped GEMMs of the fused MoE share (`_moe_gemm.moe_gemm_kernel`,
`_decode_gemm.decode_gemv_kernel`): their contract with the alignment, written once; the
prefill GEMM (`_prefill_gemm`) takes its tile's weight rows and output columns from here too.

A program takes one M block of the aligned pairs (``sorted_ids`` / ``expert_ids`` /
``num_tokens_post_padded``, `mxmoe.routing.Alignment`), one K slice and one N tile; blocks past
the rows in use or with expert -1 do nothing; pair ids outside ``[0, num_pairs)`` (padding, or
out of range) contribute nothing. The epilogue applies the routing weight (before or after the
bias), the bias (K slice 0 only), the gated activation of GEMM1, and stores the pairs' rows or
their split-K plane.
"""

import triton
import triton.language as tl

#: ROUTER_WEIGHT: where the routing weight multiplies the accumulator.
WEIGHT_NONE = tl.constexpr(0)
WEIGHT_BEFORE_BIAS = tl.constexpr(1)  # GEMM1 with apply_router_weight_on_input: (w x) W^T + b
WEIGHT_AFTER_BIAS = tl.constexpr(2)  # GEMM2 by default: w (a W^T + b)


@triton.jit
def _block_rows(pid, max_blocks, num_post_padded_ptr, sorted_ids_ptr, expert_ids_ptr,
                num_pairs, A_ROW_DIV: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """The program's M block: (in use, expert (int64), pair ids, mask, A rows (int64), K slice,
    N tile). A block is in use when it lies below num_tokens_post_padded and has an expert."""
    pid_m = pid % max_blocks
    pid_kn = pid // max_blocks
    pid_k = pid_kn % SPLIT_K
    pid_n = pid_kn // SPLIT_K
    num_post_padded = tl.load(num_post_padded_ptr)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    in_use = (pid_m * BLOCK_M < num_post_padded) & (expert >= 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    # A negative id is out of range as well as one past the end.
    mask_m = (pair >= 0) & (pair < num_pairs)
    pair = tl.where(mask_m, pair, 0)
    # int64: pair * stride passes 2**31 at large M.
    a_row = (pair // A_ROW_DIV).to(tl.int64)
    return in_use, expert, pair, mask_m, a_row, pid_k, pid_n


#: GATE_UP: where a gated tile holds the up row of each output column beside its gate row.
GATE_UP_ADJACENT = tl.constexpr(0)  # rows 2c and 2c + 1 of the tile (`_store_rows` splits them)
GATE_UP_8_APART = tl.constexpr(1)  # rows r and r + 8 of each 16 (the prefill's accumulator)


@triton.jit
def _gated_tile_rows(pid_n, N, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
                     BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr):
    """The weight rows (int32) of N tile ``pid_n`` and their mask. Gated: BLOCK_N // 2 output
    columns, each a (gate, up) pair of rows placed in the tile as GATE_UP says, the rows taken
    from w13 as INTERLEAVED says. Every grouped GEMM picks its rows here, so that they agree on
    which rows of w13 make an output column."""
    t = tl.arange(0, BLOCK_N)
    if not GATED:
        rows = pid_n * BLOCK_N + t
        mask = rows < N
    else:
        half = N // 2
        if GATE_UP == GATE_UP_ADJACENT:
            out_col = pid_n * (BLOCK_N // 2) + t // 2
        else:
            out_col = pid_n * (BLOCK_N // 2) + 8 * (t // 16) + t % 8
        # The side inside each row expression, as the kernels computed it before sharing this:
        # the same order of operations keeps their SASS as it was.
        if INTERLEAVED:
            rows = 2 * out_col + _up_side(t, GATE_UP)
        else:
            rows = out_col + _up_side(t, GATE_UP) * half
        mask = out_col < half
    return rows, mask


@triton.jit
def _up_side(t, GATE_UP: tl.constexpr):
    """1 where row ``t`` of a gated tile is an up row, 0 where a gate row."""
    if GATE_UP == GATE_UP_ADJACENT:
        side = t % 2
    else:
        side = (t // 8) % 2
    return side


@triton.jit
def _tile_rows(pid_n, N, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's weight rows (int64) and their mask. Gated: BLOCK_N // 2 output columns, each
    a (gate, up) pair of rows, so that the tile's rows alternate gate, up."""
    rows, mask_n = _gated_tile_rows(pid_n, N, GATED, INTERLEAVED, BLOCK_N, GATE_UP_ADJACENT)
    return rows.to(tl.int64), mask_n


@triton.jit
def _output_columns(rows64, mask_n, pid_n, N, GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    """(output columns (int64), their mask) of N tile ``pid_n``: its weight rows, or, gated, its
    BLOCK_N // 2 activation columns, however its gate and up rows lay in the tile."""
    if not GATED:
        out_cols = rows64
        mask_out = mask_n
    else:
        out_cols = (pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)).to(tl.int64)
        mask_out = out_cols < N // 2
    return out_cols, mask_out


@triton.jit
def _k_range(pid_k, K, k_per_split, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        k_begin = 0
        k_end = K
    else:
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
    return k_begin, k_end


@triton.jit
def _weight_and_bias(acc, expert, pair, mask_m, rows64, mask_n, pid_k, bias_ptr,
                     topk_weights_ptr, stride_bias_e, stride_bias_n, ROUTER_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 with the pairs' routing weights (before or after the bias)
    and the bias (K slice 0 only). ``expert``: the block's expert (a scalar), or each pair's
    as a (BLOCK_M, 1) column (valid ids where ``mask_m`` is set)."""
    if ROUTER_WEIGHT != WEIGHT_NONE:
        routing_weight = tl.load(topk_weights_ptr + pair, mask=mask_m, other=0.0)
    if ROUTER_WEIGHT == WEIGHT_BEFORE_BIAS:
        acc = acc * routing_weight[:, None]
    if HAS_BIAS:
        # Only K slice 0 adds the bias (a block mask: a scalar & block mask trips the
        # interpreter).
        first_slice = (tl.zeros((BLOCK_N,), tl.int32) + pid_k) == 0
        bias = tl.load(bias_ptr + expert * stride_bias_e + rows64[None, :] * stride_bias_n,
                       mask=(mask_n & first_slice)[None, :], other=0.0).to(tl.float32)
        acc = acc + bias
    if ROUTER_WEIGHT == WEIGHT_AFTER_BIAS:
        acc = acc * routing_weight[:, None]
    return acc


@triton.jit
def _store_rows(acc, pair, mask_m, rows64, mask_n, pid_k, pid_n, N, out_ptr, stride_om,
                stride_on, stride_os, alpha, limit, GATED: tl.constexpr, ACT_FN: tl.constexpr,
                SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 -> the gated activation (GEMM1) -> the pairs' output rows
    (or their split-K plane)."""
    out_row = pair.to(tl.int64)
    if not GATED:
        result = acc
    else:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        result = ACT_FN(gate, up, alpha, limit)
    out_cols, mask_out = _output_columns(rows64, mask_n, pid_n, N, GATED, BLOCK_N)
    if SPLIT_K > 1:
        out_ptr += pid_k.to(tl.int64) * stride_os
    tl.store(
        out_ptr + out_row[:, None] * stride_om + out_cols[None, :] * stride_on,
        result.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_out[None, :],
    )


@triton.jit
def _epilogue(acc, expert, pair, mask_m, rows64, mask_n, pid_k, pid_n, N,
              bias_ptr, out_ptr, topk_weights_ptr,
              stride_bias_e, stride_bias_n, stride_om, stride_on, stride_os, alpha, limit,
              GATED: tl.constexpr, ACT_FN: tl.constexpr, ROUTER_WEIGHT: tl.constexpr,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 -> weight / bias / activation -> the output rows of the
    pairs (or their split-K plane)."""
    acc = _weight_and_bias(acc, expert, pair, mask_m, rows64, mask_n, pid_k, bias_ptr,
                           topk_weights_ptr, stride_bias_e, stride_bias_n, ROUTER_WEIGHT,
                           HAS_BIAS, BLOCK_N)
    _store_rows(acc, pair, mask_m, rows64, mask_n, pid_k, pid_n, N, out_ptr, stride_om,
                stride_on, stride_os, alpha, limit, GATED, ACT_FN, SPLIT_K, BLOCK_M, BLOCK_N)
