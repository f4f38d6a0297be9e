"""The grouped GEMM of the fused MoE for the memory-bound regime (decode: few pairs per expert).

`decode_gemv_kernel` reads the weights in the GROUP_HALVES layout (`mxmoe.layouts`): in every
32-element scale group, byte ``j`` holds element ``j`` (low nibble) and ``j + 16`` (high
nibble). A byte tile of ``BLOCK_K // 2`` columns therefore decodes into two tiles whose
activations are two runs of 16 consecutive K elements per group (column ``c`` = group
``c // 16``, element ``c % 16`` of the low half or of the high half): no stride-2 gather, no
re-interleave.

It runs on CUDA cores, fp32 FMA, for 1 to a few pairs per expert. A nibble becomes an fp32 bit
pattern worth ``E2M1 * 2**-126`` by shift and mask (the 0.5 code lands as a subnormal), the
activations are pre-scaled by ``2**64`` so the products stay normal, and each 32-group's
partial sum is multiplied once by ``2**62`` and once by its E8M0 scale. (A tensor-core swap-AB
variant, ``C^T = W X^T`` with the decoded tile as the dot's left operand, was measured 1.6-2x
slower than this GEMV and than the general kernel on the H200 and removed: benchmarks/NOTES.md
section 14.)

The contract is `moe_gemm_kernel`'s (same arguments, same alignment, same epilogues and split-K
planes). Grid: ``(max_blocks * SPLIT_K * num_n_tiles,)``; program ``pid`` takes M block
``pid % max_blocks``, K slice ``(pid // max_blocks) % SPLIT_K`` and N tile
``pid // (max_blocks * SPLIT_K)``. Blocks past ``num_tokens_post_padded`` or with expert -1
return at once; pair ids past ``num_pairs`` (padding, or out of range) contribute nothing.

Exactness of the GEMV's arithmetic: the decode, the two power-of-two undo multiplies and the
E8M0 scale (every byte 0..254; 255 decodes to NaN) are exact, so the result equals the fp32
sum of ``x * w * scale`` products up to summation order, for activations with ``|x| < 2**64``
(larger ones overflow to inf when pre-scaled) and products ``|x * w| >= 2**-64`` (smaller ones
are fp32 subnormals after the ``2**-62`` offset and keep fewer bits; they are below 1e-19).
"""

import triton
import triton.language as tl

from ._grouped import _block_rows, _epilogue, _k_range, _tile_rows
from ._moe_gemm import _e8m0_to_f32

__all__ = ["decode_gemv_kernel"]

#: Activations times 2**64 keep the products of the 2**-126-offset weights in the fp32 normals.
X_PRESCALE = tl.constexpr(18446744073709551616.0)  # 2**64
#: Undoes 2**-126 * 2**64 once per 32-group partial sum.
GROUP_UNDO = tl.constexpr(4611686018427387904.0)  # 2**62


#: Bits 31 and 24..22 of an int32: 0x81C00000 written as the signed value Triton takes.
SIGN_AND_MAGNITUDE = tl.constexpr(-0x7E400000)


@triton.jit
def _nibble_to_f32(words, NIBBLE: tl.constexpr):
    """Nibble ``NIBBLE`` (0..7, bits 4n..4n+3) of each int32 word -> the fp32 bit pattern worth
    E2M1 * 2**-126: shifted to bits 28..31, then an arithmetic shift by 6 puts its sign at 31
    (copied to 30..25) and its magnitude bits (e1 e0 m) at 24..22, and one mask keeps those.
    Three integer operations (two for the top nibble); the 0.5 code lands as a subnormal."""
    if NIBBLE == 7:
        bits = (words >> 6) & SIGN_AND_MAGNITUDE
    else:
        bits = ((words << (28 - 4 * NIBBLE)) >> 6) & SIGN_AND_MAGNITUDE
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_words_row(acc, words, scale_f, a_ptr, sorted_ids_ptr, slot, num_pairs, k0, k_end,
                    offs_w, stride_am, stride_ak, A_ROW_DIV: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, EVEN_K: tl.constexpr):
    """acc (BLOCK_N, GROUPS) += this K step's weights (int32 words of 8 nibbles) times the
    activation row of the pair in ``slot`` of sorted_ids, one partial sum per 32-group
    (nothing for a padding or out-of-range id)."""
    # The id broadcast over the word columns: a scalar & block mask trips the interpreter.
    pair = tl.load(sorted_ids_ptr + slot + offs_w * 0)
    valid = (pair >= 0) & (pair < num_pairs)
    row = a_ptr + (tl.where(valid, pair, 0) // A_ROW_DIV).to(tl.int64) * stride_am
    # GROUP_HALVES: word w of a group holds its bytes 4w..4w+3; nibble n is byte n // 2's low
    # (n even: element 4w + n // 2) or high half (n odd: element 16 + 4w + n // 2).
    group_first = k0 + (offs_w // 4) * 32 + (offs_w % 4) * 4
    part = tl.zeros(words.shape, dtype=tl.float32)
    for n in tl.static_range(8):
        k = group_first + (n % 2) * 16 + n // 2
        if EVEN_K:
            x = tl.load(row + k * stride_ak, mask=valid, other=0.0)
        else:
            x = tl.load(row + k * stride_ak, mask=valid & (k < k_end), other=0.0)
        part += _nibble_to_f32(words, n) * (x.to(tl.float32) * X_PRESCALE)[None, :]
    # A group's 4 words are one thread's 4 consecutive registers: this sum stays in the thread.
    part = tl.sum(tl.reshape(part, (BLOCK_N, GROUPS, 4)), axis=2)
    # Two exact power-of-two multiplies: 2**62 * 2**(s - 127) overflows fp32 past s = 192.
    return acc + (part * GROUP_UNDO) * scale_f


@triton.jit
def _load_words(w_rows, s_rows, k0, k_end, mask_n, offs_w, offs_g, stride_wk, stride_sk,
                EVEN_K: tl.constexpr):
    """The words (BLOCK_N, WORDS) int32 and scales (BLOCK_N, GROUPS) uint8 of the K step at
    k0; zeros past k_end (with EVEN_K only a step past the end can be, so one row mask)."""
    if EVEN_K:
        # A block comparison: a scalar & block mask trips the interpreter.
        live = mask_n & ((mask_n.to(tl.int32) * 0 + k0) < k_end)
        words = tl.load(w_rows + (k0 // 8 + offs_w)[None, :] * stride_wk,
                        mask=live[:, None], other=0)
        scale = tl.load(s_rows + (k0 // 32 + offs_g)[None, :] * stride_sk,
                        mask=live[:, None], other=0)
    else:
        mask_w = (k0 // 8 + offs_w) < k_end // 8
        words = tl.load(w_rows + (k0 // 8 + offs_w)[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_w[None, :], other=0)
        mask_g = (k0 // 32 + offs_g) < k_end // 32
        scale = tl.load(s_rows + (k0 // 32 + offs_g)[None, :] * stride_sk,
                        mask=mask_n[:, None] & mask_g[None, :], other=0)
    return words, scale


@triton.jit
def decode_gemv_kernel(
    a_ptr,  # (A_rows, K) activation dtype; row of pair p is p // A_ROW_DIV
    b_ptr,  # (E, N, K // 8) int32: the GROUP_HALVES bytes read as little-endian words
    b_scale_ptr,  # (E, N, K // 32) uint8 E8M0
    bias_ptr,  # (E, N) float (unused without HAS_BIAS)
    out_ptr,  # (num_pairs, N_OUT) activation dtype, N_OUT = N // 2 when gated, else N;
    #           with SPLIT_K > 1: (SPLIT_K, num_pairs, N) float32 planes
    topk_weights_ptr,  # (num_pairs,) float32
    sorted_ids_ptr,  # (max_blocks * BLOCK_M,) int32 pair ids, sentinel = num_pairs
    expert_ids_ptr,  # (max_blocks,) int32 local expert of each block, -1 unused
    num_post_padded_ptr,  # (1,) int32 rows in use
    N,  # weight rows (2I for GEMM1, H for GEMM2), a multiple of 32
    K,  # reduction size (H for GEMM1, I for GEMM2), a multiple of 32
    num_pairs,
    max_blocks,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,  # in words
    stride_se, stride_sn, stride_sk,
    stride_bias_e, stride_bias_n,
    stride_om, stride_on,
    stride_os,  # between the SPLIT_K planes of the output (unused when SPLIT_K == 1)
    k_per_split,  # K elements per slice, a multiple of BLOCK_K (K when SPLIT_K == 1)
    alpha,
    limit,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,  # GEMM1's gated epilogue: the output has N // 2 columns
    INTERLEAVED: tl.constexpr,  # gated: gate/up rows interleave (else [gate | up] halves)
    ACT_FN: tl.constexpr,  # gated: the activation's epilogue (`_epilogues`)
    ROUTER_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # pairs per program (the alignment's block): 1, 2 or 4
    BLOCK_N: tl.constexpr,  # weight rows per program (gated: BLOCK_N // 2 gate/up pairs)
    BLOCK_K: tl.constexpr,  # K per loop step, a multiple of 32
    SPLIT_K: tl.constexpr,  # K slices, each its own program (GATED must be False)
    EVEN_K: tl.constexpr,  # every K slice is whole BLOCK_K steps: no K masks in the loop
):
    """CUDA-core GEMV over the pairs of one M block, fp32 FMA, the weights read as int32 words.

    Each word holds the 8 nibbles of one 32-group's 4 bytes; each is decoded in 2-3 integer
    operations and multiplied into a per-word fp32 partial sum, which gets its group's scale
    once (one multiply per 8 weights); the words' sums are added up only after the K loop.
    The weights of a K step are decoded once for all BLOCK_M (1, 2 or 4) pairs, each with its
    own accumulator.

    Grid: ``(max_blocks * SPLIT_K * cdiv(N_OUT, cols per tile),)`` (see the module)."""
    tl.static_assert((BLOCK_M == 1) | (BLOCK_M == 2) | (BLOCK_M == 4))
    in_use, expert, pair, mask_m, a_row, pid_k, pid_n = _block_rows(
        tl.program_id(0), max_blocks, num_post_padded_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_pairs, A_ROW_DIV, SPLIT_K, BLOCK_M)
    if in_use == 0:
        return
    rows64, mask_n = _tile_rows(pid_n, N, GATED, INTERLEAVED, BLOCK_N)
    k_begin, k_end = _k_range(pid_k, K, k_per_split, SPLIT_K)

    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // 32
    offs_w = tl.arange(0, WORDS)  # word column of the step: group w // 4, word w % 4
    offs_g = tl.arange(0, GROUPS)
    w_rows = b_ptr + expert * stride_be + rows64[:, None] * stride_bn  # (BLOCK_N, 1)
    s_rows = b_scale_ptr + expert * stride_se + rows64[:, None] * stride_sn
    first_slot = (tl.program_id(0) % max_blocks) * BLOCK_M

    acc0 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    # Register double buffering: the loads of step k0 + BLOCK_K are issued before step k0 is
    # computed, so a program keeps two steps of weights in flight (plain loads into registers
    # are not pipelined by num_stages).
    words, scale = _load_words(w_rows, s_rows, k_begin, k_end, mask_n, offs_w, offs_g,
                               stride_bk, stride_sk, EVEN_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words_next, scale_next = _load_words(w_rows, s_rows, k0 + BLOCK_K, k_end, mask_n,
                                             offs_w, offs_g, stride_bk, stride_sk, EVEN_K)
        scale_f = _e8m0_to_f32(scale.to(tl.int32))
        acc0 = _gemv_words_row(acc0, words, scale_f, a_ptr, sorted_ids_ptr, first_slot,
                               num_pairs, k0, k_end, offs_w, stride_am, stride_ak, A_ROW_DIV,
                               BLOCK_N, GROUPS, EVEN_K)
        if BLOCK_M > 1:
            acc1 = _gemv_words_row(acc1, words, scale_f, a_ptr, sorted_ids_ptr, first_slot + 1,
                                   num_pairs, k0, k_end, offs_w, stride_am, stride_ak,
                                   A_ROW_DIV, BLOCK_N, GROUPS, EVEN_K)
        if BLOCK_M > 2:
            acc2 = _gemv_words_row(acc2, words, scale_f, a_ptr, sorted_ids_ptr, first_slot + 2,
                                   num_pairs, k0, k_end, offs_w, stride_am, stride_ak,
                                   A_ROW_DIV, BLOCK_N, GROUPS, EVEN_K)
            acc3 = _gemv_words_row(acc3, words, scale_f, a_ptr, sorted_ids_ptr, first_slot + 3,
                                   num_pairs, k0, k_end, offs_w, stride_am, stride_ak,
                                   A_ROW_DIV, BLOCK_N, GROUPS, EVEN_K)
        words, scale = words_next, scale_next

    slot = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.where(slot == 0, tl.sum(acc0, axis=1)[None, :], tl.sum(acc1, axis=1)[None, :])
    if BLOCK_M > 2:
        acc = tl.where(slot == 2, tl.sum(acc2, axis=1)[None, :], acc)
        acc = tl.where(slot == 3, tl.sum(acc3, axis=1)[None, :], acc)
    _epilogue(acc, expert, pair, mask_m, rows64, mask_n, pid_k, pid_n, N, bias_ptr, out_ptr,
              topk_weights_ptr, stride_bias_e, stride_bias_n, stride_om, stride_on, stride_os,
              alpha, limit, GATED, ACT_FN, ROUTER_WEIGHT, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)
