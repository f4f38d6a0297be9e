"""The grouped GEMMs of the fused MoE for the memory-bound regime (decode: few pairs per expert).

Two kernels, one inner loop (the weights read as int32 words of 8 nibbles, in either layout of
`mxmoe.layouts`, ``W_LAYOUT``): nibble ``n`` of word ``w`` of a row is K element ``8w + n`` in
the plain layout, element ``32 (w // 4) + 4 (w % 4) + n // 2 + 16 (n % 2)`` in GROUP_HALVES
(byte ``j`` of a 32-group holds elements ``j`` and ``j + 16``), and code ``n`` of word ``w`` is
element ``32 (w // 4) + 2 (w % 4) + 8 (n // 2) + n % 2`` in MMA_LANES (its bits spread over
the word so that each pair of codes is a rotation and a mask; its K-major scales are only
other strides). The activations of each code position are gathered from L1 either way.

- `decode_gemv_kernel` takes the aligned pairs (`mxmoe.routing.Alignment`): a program per M
  block of 1, 2 or 4 pairs of one expert, the weights decoded once for all of them.
- `decode_token_kernel` needs no alignment: a program per (token, N tile, K slice) takes that
  token's top-k slots, each with its own expert, ``BLOCK_J`` slots per step (their weight tiles
  loaded together: that many more bytes in flight). GEMM1 writes each pair's row; GEMM2 sums
  the token's pairs in registers (routing weight and bias per pair, a fixed order) and writes
  the token's output row, so neither the alignment nor the top-k sum runs. An expert that
  two tokens share is read once per token (from L2 when their programs run together), so it
  pays where pairs are few against the experts.

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

from ._grouped import (_block_rows, _epilogue, _k_range,
                       _store_rows, _tile_rows, _weight_and_bias)
from ._moe_gemm import _e8m0_to_f32, _mma_lanes_pair_f32, _mma_lanes_register

__all__ = ["decode_gemv_kernel", "decode_token_kernel"]

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
def _code_to_f32(words, NIBBLE: tl.constexpr, W_LAYOUT: tl.constexpr):
    """Code ``NIBBLE`` (0..7) of each int32 word -> the fp32 bit pattern worth E2M1 * 2**-126.
    MMA_LANES: code 2i + j is half j of the word's operand register i (a rotation and a mask,
    shared by the two codes of the pair), moved to the top half; the others: the nibble."""
    if W_LAYOUT == LAYOUT_MMA_LANES:
        low, high = _mma_lanes_pair_f32(_mma_lanes_register(words, NIBBLE // 2))
        if NIBBLE % 2 == 0:
            value = low
        else:
            value = high
    else:
        value = _nibble_to_f32(words, NIBBLE)
    return value


#: W_LAYOUT: the byte order of the words (as `_moe_gemm`'s).
LAYOUT_PLAIN = tl.constexpr(0)
LAYOUT_GROUP_HALVES = tl.constexpr(1)
LAYOUT_MMA_LANES = tl.constexpr(2)


@triton.jit
def _nibble_k(offs_w, k0, NIBBLE: tl.constexpr, W_LAYOUT: tl.constexpr):
    """The K element of nibble ``NIBBLE`` of the step's word columns ``offs_w`` (from k0)."""
    if W_LAYOUT == LAYOUT_GROUP_HALVES:
        # Word w of a group holds its bytes 4w..4w+3; nibble n is byte n // 2's low (n even:
        # element 4w + n // 2) or high half (n odd: element 16 + 4w + n // 2).
        return k0 + (offs_w // 4) * 32 + (offs_w % 4) * 4 + (NIBBLE % 2) * 16 + NIBBLE // 2
    elif W_LAYOUT == LAYOUT_MMA_LANES:
        # Word t of a group holds lane t's codes: "nibble" n = 2i + j is element 8i + 2t + j
        # (its bits are spread over the word: `_code_to_f32`).
        return k0 + (offs_w // 4) * 32 + (offs_w % 4) * 2 + (NIBBLE // 2) * 8 + NIBBLE % 2
    else:
        return k0 + offs_w * 8 + NIBBLE


@triton.jit
def _plane_position(cols, LAYOUT: tl.constexpr):
    """(code, word) of K elements ``cols`` in activation planes for words of ``LAYOUT``: the
    inverse of `_nibble_k`, so that plane ``code`` read at the step's word columns is the
    activation each code of those words multiplies (one contiguous vector a code)."""
    group = cols // 32
    e = cols % 32
    if LAYOUT == LAYOUT_GROUP_HALVES:
        r = e % 16
        code = 2 * (r % 4) + e // 16
        word = 4 * group + r // 4
    elif LAYOUT == LAYOUT_MMA_LANES:
        r = e % 8
        code = 2 * (e // 8) + r % 2
        word = 4 * group + r // 2
    else:
        code = cols % 8
        word = cols // 8
    return code, word


@triton.jit
def _store_planes(tile, pair, valid, pid_n, N, out_ptr, stride_om, stride_op, alpha, limit,
                  ACT_FN: tl.constexpr, ROUND_DTYPE: tl.constexpr, OUT_LAYOUT: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    """GEMM1's gated tile (BLOCK_J, BLOCK_N) fp32 -> the activation, rounded to ROUND_DTYPE
    (what GEMM2 would read back from rows of that dtype), times 2**64 as GEMM2 pre-scales it,
    stored into activation planes ``out[pair, code, word]`` float32 (`_plane_position`)."""
    gate, up = tl.split(tl.reshape(tile, (BLOCK_J, BLOCK_N // 2, 2)))
    result = ACT_FN(gate, up, alpha, limit).to(ROUND_DTYPE).to(tl.float32) * X_PRESCALE
    cols = (pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)).to(tl.int64)
    code, word = _plane_position(cols, OUT_LAYOUT)
    tl.store(out_ptr + pair[:, None] * stride_om + (code * stride_op + word)[None, :], result,
             mask=valid[:, None] & (cols < N // 2)[None, :])


@triton.jit
def _gemv_words_row(acc, words, scale_f, a_ptr, sorted_ids_ptr, slot, num_pairs, k0, k_end,
                    offs_w, stride_am, stride_ak, A_ROW_DIV: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, EVEN_K: tl.constexpr,
                    W_LAYOUT: tl.constexpr):
    """acc (BLOCK_N, GROUPS) += this K step's weights (int32 words of 8 nibbles) times the
    activation row of the pair in ``slot`` of sorted_ids, one partial sum per 32-group
    (nothing for a padding or out-of-range id)."""
    # The id broadcast over the word columns: a scalar & block mask trips the interpreter.
    pair = tl.load(sorted_ids_ptr + slot + offs_w * 0)
    valid = (pair >= 0) & (pair < num_pairs)
    row = a_ptr + (tl.where(valid, pair, 0) // A_ROW_DIV).to(tl.int64) * stride_am
    part = tl.zeros(words.shape, dtype=tl.float32)
    for n in tl.static_range(8):
        k = _nibble_k(offs_w, k0, n, W_LAYOUT)
        if EVEN_K:
            x = tl.load(row + k * stride_ak, mask=valid, other=0.0)
        else:
            x = tl.load(row + k * stride_ak, mask=valid & (k < k_end), other=0.0)
        part += _code_to_f32(words, n, W_LAYOUT) * (x.to(tl.float32) * X_PRESCALE)[None, :]
    # A group's 4 words are one thread's 4 consecutive registers: this sum stays in the thread.
    part = tl.sum(tl.reshape(part, (BLOCK_N, GROUPS, 4)), axis=2)
    # Two exact power-of-two multiplies: 2**62 * 2**(s - 127) overflows fp32 past s = 192.
    return acc + (part * GROUP_UNDO) * scale_f


@triton.jit
def _load_words(w_rows, s_rows, k0, k_end, live, offs_w, offs_g, stride_wk, stride_sk,
                EVEN_K: tl.constexpr):
    """The words (..., WORDS) int32 and scales (..., GROUPS) uint8 of the K step at k0 for the
    rows ``w_rows`` / ``s_rows`` (pointers of shape (..., 1)) where ``live`` (same shape) is
    set; zeros past k_end (with EVEN_K only a step past the end can be, so one row mask)."""
    if EVEN_K:
        # A block comparison: a scalar & block mask trips the interpreter.
        live = live & ((live.to(tl.int32) * 0 + k0) < k_end)
        words = tl.load(w_rows + (k0 // 8 + offs_w) * stride_wk, mask=live, other=0)
        scale = tl.load(s_rows + (k0 // 32 + offs_g) * stride_sk, mask=live, other=0)
    else:
        mask_w = (k0 // 8 + offs_w) < k_end // 8
        words = tl.load(w_rows + (k0 // 8 + offs_w) * stride_wk, mask=live & mask_w, other=0)
        mask_g = (k0 // 32 + offs_g) < k_end // 32
        scale = tl.load(s_rows + (k0 // 32 + offs_g) * stride_sk, mask=live & mask_g, other=0)
    return words, scale


@triton.jit
def decode_gemv_kernel(
    a_ptr,  # (A_rows, K) activation dtype; row of pair p is p // A_ROW_DIV
    b_ptr,  # (E, N, K // 8) int32: the W_LAYOUT bytes read as little-endian words
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
    W_LAYOUT: tl.constexpr,  # LAYOUT_PLAIN, LAYOUT_GROUP_HALVES or LAYOUT_MMA_LANES
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
    live = mask_n[:, None]
    words, scale = _load_words(w_rows, s_rows, k_begin, k_end, live, offs_w[None, :],
                               offs_g[None, :], stride_bk, stride_sk, EVEN_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words_next, scale_next = _load_words(w_rows, s_rows, k0 + BLOCK_K, k_end, live,
                                             offs_w[None, :], offs_g[None, :], stride_bk,
                                             stride_sk, EVEN_K)
        scale_f = _e8m0_to_f32(scale.to(tl.int32))
        acc0 = _gemv_words_row(acc0, words, scale_f, a_ptr, sorted_ids_ptr, first_slot,
                               num_pairs, k0, k_end, offs_w, stride_am, stride_ak, A_ROW_DIV,
                               BLOCK_N, GROUPS, EVEN_K, W_LAYOUT)
        if BLOCK_M > 1:
            acc1 = _gemv_words_row(acc1, words, scale_f, a_ptr, sorted_ids_ptr, first_slot + 1,
                                   num_pairs, k0, k_end, offs_w, stride_am, stride_ak,
                                   A_ROW_DIV, BLOCK_N, GROUPS, EVEN_K, W_LAYOUT)
        if BLOCK_M > 2:
            acc2 = _gemv_words_row(acc2, words, scale_f, a_ptr, sorted_ids_ptr, first_slot + 2,
                                   num_pairs, k0, k_end, offs_w, stride_am, stride_ak,
                                   A_ROW_DIV, BLOCK_N, GROUPS, EVEN_K, W_LAYOUT)
            acc3 = _gemv_words_row(acc3, words, scale_f, a_ptr, sorted_ids_ptr, first_slot + 3,
                                   num_pairs, k0, k_end, offs_w, stride_am, stride_ak,
                                   A_ROW_DIV, BLOCK_N, GROUPS, EVEN_K, W_LAYOUT)
        words, scale = words_next, scale_next

    slot = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.where(slot == 0, tl.sum(acc0, axis=1)[None, :], tl.sum(acc1, axis=1)[None, :])
    if BLOCK_M > 2:
        acc = tl.where(slot == 2, tl.sum(acc2, axis=1)[None, :], acc)
        acc = tl.where(slot == 3, tl.sum(acc3, axis=1)[None, :], acc)
    _epilogue(acc, expert, pair, mask_m, rows64, mask_n, pid_k, pid_n, N, bias_ptr, out_ptr,
              topk_weights_ptr, stride_bias_e, stride_bias_n, stride_om, stride_on, stride_os,
              alpha, limit, GATED, ACT_FN, ROUTER_WEIGHT, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _token_slots(token, j0, topk_ids_ptr, expert_map_ptr, num_global_experts,
                 num_local_experts, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """Slots j0 .. j0 + BLOCK_J of the token's top-k: (pair ids (int64), valid, local expert
    (int64, 0 where not valid)). A slot is valid when it exists and its expert is local (and in
    range: an id the alignment would drop is dropped here too)."""
    slot = j0 + tl.arange(0, BLOCK_J)
    exists = slot < TOP_K
    pair = token.to(tl.int64) * TOP_K + slot
    # int64 before the range checks, as in the alignment: a wrapped id must not pass them.
    expert = tl.load(topk_ids_ptr + pair, mask=exists, other=-1).to(tl.int64)
    if HAS_MAP:
        in_range = exists & (expert >= 0) & (expert < num_global_experts)
        expert = tl.load(expert_map_ptr + expert, mask=in_range, other=-1).to(tl.int64)
    valid = exists & (expert >= 0) & (expert < num_local_experts)
    return pair, valid, tl.where(valid, expert, 0)


@triton.jit
def decode_token_kernel(
    a_ptr,  # (A_rows, K) activation dtype; row of pair p is p // A_ROW_DIV
    b_ptr,  # (E, N, K // 8) int32: the W_LAYOUT bytes read as little-endian words
    b_scale_ptr,  # (E, N, K // 32) uint8 E8M0
    bias_ptr,  # (E, N) float (unused without HAS_BIAS)
    out_ptr,  # SUM_PAIRS: (num_tokens, N); else (num_tokens * TOP_K, N_OUT), N_OUT = N // 2
    #           when gated; with SPLIT_K > 1: (SPLIT_K, rows, N) float32 planes
    topk_weights_ptr,  # (num_tokens * TOP_K,) float32
    topk_ids_ptr,  # (num_tokens * TOP_K,) global expert ids
    expert_map_ptr,  # (E_global,) local id or -1 (unused without HAS_MAP)
    N,  # weight rows (2I for GEMM1, H for GEMM2), a multiple of 32
    K,  # reduction size (H for GEMM1, I for GEMM2), a multiple of 32
    num_tokens,
    num_global_experts,
    num_local_experts,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,  # in words
    stride_se, stride_sn, stride_sk,
    stride_bias_e, stride_bias_n,
    stride_om, stride_on,
    stride_os,  # between the SPLIT_K planes of the output (unused when SPLIT_K == 1)
    stride_ap,  # X_PLANES: between the activation planes of a row of a (unused otherwise)
    stride_op,  # OUT_PLANES: between the activation planes of a row of out (unused otherwise)
    k_per_split,  # K elements per slice, a multiple of BLOCK_K (K when SPLIT_K == 1)
    alpha,
    limit,
    TOP_K: tl.constexpr,
    A_ROW_DIV: tl.constexpr,  # TOP_K: the token's row of x (GEMM1); 1: the pair's row (GEMM2)
    SUM_PAIRS: tl.constexpr,  # GEMM2: the token's pairs summed into its output row
    GATED: tl.constexpr,  # GEMM1's gated epilogue: the output has N // 2 columns
    INTERLEAVED: tl.constexpr,  # gated: gate/up rows interleave (else [gate | up] halves)
    ACT_FN: tl.constexpr,  # gated: the activation's epilogue (`_epilogues`)
    ROUTER_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    BLOCK_J: tl.constexpr,  # top-k slots per step, their weight tiles loaded together
    BLOCK_N: tl.constexpr,  # weight rows per program (gated: BLOCK_N // 2 gate/up pairs)
    BLOCK_K: tl.constexpr,  # K per loop step, a multiple of 32
    SPLIT_K: tl.constexpr,  # K slices, each its own program (GATED must be False)
    EVEN_K: tl.constexpr,  # every K slice is whole BLOCK_K steps: no K masks in the loop
    W_LAYOUT: tl.constexpr,  # LAYOUT_PLAIN, LAYOUT_GROUP_HALVES or LAYOUT_MMA_LANES
    X_PLANES: tl.constexpr,  # a is (rows, 8, >= K // 8) float32 activation planes
    #                          (`_store_planes`; word w of plane n at n * stride_ap + w)
    OUT_PLANES: tl.constexpr,  # gated: out is (rows, 8, >= N // 16) float32 activation planes
    ROUND_DTYPE: tl.constexpr,  # OUT_PLANES: the activation dtype the planes' values are in
    OUT_LAYOUT: tl.constexpr,  # OUT_PLANES: the layout of the words that will read the planes
):
    """CUDA-core GEMV over one token's top-k slots, fp32 FMA, no alignment (see the module).

    Per step, the word tiles (BLOCK_J, BLOCK_N, BLOCK_K // 8) of BLOCK_J slots (each its own
    expert's rows) are loaded at once, the next step's before this one is computed; the decode
    and the per-group scaling are `decode_gemv_kernel`'s. Slots whose expert is not local
    contribute nothing (GEMM1 leaves their rows unwritten; GEMM2 skips them).

    Grid: ``(num_tokens * SPLIT_K * cdiv(N_OUT, cols per tile),)``; program ``pid`` takes
    token ``pid % num_tokens``, K slice ``(pid // num_tokens) % SPLIT_K`` and N tile
    ``pid // (num_tokens * SPLIT_K)``, so the programs that read one N tile of the experts run
    side by side (a shared expert's tile comes from L2)."""
    tl.static_assert(not OUT_PLANES or (GATED and SPLIT_K == 1 and not SUM_PAIRS))
    pid = tl.program_id(0)
    token = pid % num_tokens
    pid_kn = pid // num_tokens
    pid_k = pid_kn % SPLIT_K
    pid_n = pid_kn // SPLIT_K
    rows64, mask_n = _tile_rows(pid_n, N, GATED, INTERLEAVED, BLOCK_N)
    k_begin, k_end = _k_range(pid_k, K, k_per_split, SPLIT_K)

    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // 32
    offs_w = tl.arange(0, WORDS)
    offs_g = tl.arange(0, GROUPS)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, TOP_K, BLOCK_J):
        pair, valid, expert = _token_slots(token, j0, topk_ids_ptr, expert_map_ptr,
                                           num_global_experts, num_local_experts, TOP_K,
                                           HAS_MAP, BLOCK_J)
        w_rows = (b_ptr + expert[:, None, None] * stride_be
                  + rows64[None, :, None] * stride_bn)  # (BLOCK_J, BLOCK_N, 1)
        s_rows = (b_scale_ptr + expert[:, None, None] * stride_se
                  + rows64[None, :, None] * stride_sn)
        live = valid[:, None, None] & mask_n[None, :, None]
        # The activation rows as 3-d pointers (BLOCK_J or 1, 1, 1), so that the activations
        # load straight in the word tile's layout.
        a_rows = a_ptr + (pair // A_ROW_DIV)[:, None, None] * stride_am
        a_rows_token = a_ptr + token.to(tl.int64) * stride_am  # the same, when one row
        valid_x = valid[:, None, None]
        acc = tl.zeros((BLOCK_J, BLOCK_N, GROUPS), dtype=tl.float32)
        words, scale = _load_words(w_rows, s_rows, k_begin, k_end, live, offs_w[None, None, :],
                                   offs_g[None, None, :], stride_bk, stride_sk, EVEN_K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            words_next, scale_next = _load_words(w_rows, s_rows, k0 + BLOCK_K, k_end, live,
                                                 offs_w[None, None, :], offs_g[None, None, :],
                                                 stride_bk, stride_sk, EVEN_K)
            part = tl.zeros(words.shape, dtype=tl.float32)
            # K is whole 32-groups: the step's K mask is one per group (its 4 words).
            in_k = ((k0 + (offs_w // 4) * 32) < k_end)[None, None, :]
            for n in tl.static_range(8):
                k = _nibble_k(offs_w, k0, n, W_LAYOUT)[None, None, :]
                if A_ROW_DIV == TOP_K:
                    # One row for every slot, loaded once (a slot that is not valid has zero
                    # words and is never stored, so an unmasked row costs it nothing).
                    rows = a_rows_token
                    mask_x = k >= 0
                else:
                    rows = a_rows
                    mask_x = valid_x
                if X_PLANES:
                    # Plane n at the step's words: the activations of code n, contiguous,
                    # float32 and pre-scaled already.
                    x_at = rows + n * stride_ap + (k0 // 8 + offs_w)[None, None, :]
                else:
                    x_at = rows + k * stride_ak
                if EVEN_K:
                    x = tl.load(x_at, mask=mask_x, other=0.0)
                else:
                    x = tl.load(x_at, mask=mask_x & in_k, other=0.0)
                if X_PLANES:
                    part += _code_to_f32(words, n, W_LAYOUT) * x
                else:
                    part += _code_to_f32(words, n, W_LAYOUT) * (x.to(tl.float32) * X_PRESCALE)
            # A group's 4 words are one thread's 4 consecutive registers: this sum stays in
            # the thread (where the compiler keeps the word tile's layout for the reshape).
            part = tl.sum(tl.reshape(part, (BLOCK_J, BLOCK_N, GROUPS, 4)), axis=3)
            scale_f = _e8m0_to_f32(scale.to(tl.int32))
            acc += (part * GROUP_UNDO) * scale_f
            words, scale = words_next, scale_next
        acc = tl.sum(acc, axis=2)
        tile = _weight_and_bias(acc, expert[:, None], pair, valid, rows64,
                                mask_n, pid_k, bias_ptr, topk_weights_ptr, stride_bias_e,
                                stride_bias_n, ROUTER_WEIGHT, HAS_BIAS, BLOCK_N)
        if SUM_PAIRS:
            # Slots in order, each added once: the same sum on every run.
            total += tl.sum(tl.where(valid[:, None], tile, 0.0), axis=0)
        elif OUT_PLANES:
            _store_planes(tile, pair, valid, pid_n, N, out_ptr, stride_om, stride_op, alpha,
                          limit, ACT_FN, ROUND_DTYPE, OUT_LAYOUT, BLOCK_J, BLOCK_N)
        else:
            _store_rows(tile, pair, valid, rows64, mask_n, pid_k, pid_n, N, out_ptr, stride_om,
                        stride_on, stride_os, alpha, limit, GATED, ACT_FN, SPLIT_K, BLOCK_J,
                        BLOCK_N)
    if SUM_PAIRS:
        if SPLIT_K > 1:
            out_ptr += pid_k.to(tl.int64) * stride_os
        tl.store(out_ptr + token.to(tl.int64) * stride_om + rows64 * stride_on,
                 total.to(out_ptr.dtype.element_ty), mask=mask_n)
