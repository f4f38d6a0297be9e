"""The grouped GEMM of the fused MoE, with MXFP4 weights dequantized inside the K loop.

One kernel serves both GEMMs and every weight format (constexpr-selected):
- GEMM1: A = hidden states, rows gathered through the aligned pair ids (``pair // top_k``),
  B = w13; epilogue: bias, gated activation (the output has N/2 columns).
- GEMM2: A = the activations of GEMM1 (one row per pair), B = w2; epilogue: bias, routing weight.
The output has one row per (token, slot) pair; the top-k sum is a separate deterministic kernel.

Grid: ``(max_blocks * SPLIT_K * num_n_tiles,)``. Program ``pid`` takes M block
``pid % max_blocks``, K slice ``(pid // max_blocks) % SPLIT_K`` and N tile
``pid // (max_blocks * SPLIT_K)`` (programs next to each other share a weight tile, which then
comes from L2). Blocks past ``num_tokens_post_padded`` return at once.

Split-K (SPLIT_K > 1) is for decode, where a few experts times the N tiles leave most SMs idle:
each K slice writes its fp32 partial sums to its own plane of the output (``stride_os`` apart),
with the bias added by slice 0 only and the routing weight (linear) applied by every slice; the
consumer sums the planes in a fixed order (deterministic, no atomics). The gated activation
needs the full sum, so GEMM1 with split-K runs without it and `split_activation_kernel` follows.
"""

import triton
import triton.language as tl

# The block/rows/K-slice selection and the epilogue (ROUTER_WEIGHT's constants too).
from ._grouped import _block_rows, _epilogue, _k_range, _tile_rows

# WEIGHT_MODE: the values of `mxmoe.kernels.inner_product.InnerProduct`
MODE_DEQUANT = tl.constexpr(0)  # MXFP4, dequantized to the dot dtype in registers
MODE_SCALED = tl.constexpr(1)  # MXFP4, through tl.dot_scaled
MODE_DENSE = tl.constexpr(2)  # dense weights in the dot dtype

# W_LAYOUT (MXFP4 modes): the byte order of the weights (`mxmoe.layouts`)
LAYOUT_PLAIN = tl.constexpr(0)  # byte j = elements 2j (low nibble), 2j+1 (high)
LAYOUT_GROUP_HALVES = tl.constexpr(1)  # in each 32-group byte j = elements j (low), j+16 (high)
LAYOUT_MMA_LANES = tl.constexpr(2)  # int32 words, one per MMA lane (bits: layouts.py; K-major scales)



@triton.jit
def _e2m1_to_f32(codes):
    """E2M1 codes (int32, 0..15) -> float32 by bit manipulation, exactly.

    The three magnitude bits (e1 e0 m) placed at bits 24..22 of a float32 are its two lowest
    exponent bits and top mantissa bit: that float is value * 2**-126 for every code, normal
    (e > 0) and subnormal (e = 0, m = 0.5) alike, so one multiply by 2**126 restores it.
    """
    bits = ((codes & 0x7) << 22) | ((codes & 0x8) << 28)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2**126


def _nibble_pairs_ptx(out: str, sign_shift: int, magnitude_shift: int, scale: str) -> str:
    """PTX for one bf16 pair: the nibbles at bits 0-3/16-19 of ``t`` (shifts 12 and 6) or at
    bits 4-7/20-23 (shifts 8 and 2) -> sign at 15/31, magnitude at 8..6/24..22, then times
    2**126 and ``scale``."""
    return f"""
        shl.b32 a, t, {sign_shift};
        shl.b32 b, t, {magnitude_shift};
        and.b32 a, a, 0x80008000;
        and.b32 b, b, 0x01C001C0;
        or.b32 a, a, b;
        fma.rn.bf16x2 a, a, k126, nz;
        fma.rn.bf16x2 {out}, a, {scale}, nz;"""


#: $0,$1: low nibbles of bytes (0,1), (2,3); $2,$3: high nibbles; $4: the four bytes; $5,$6:
#: the scales of bytes (0,1) and (2,3) as bf16 pairs. prmt puts bytes 0,1 (then 2,3) of $4 at
#: bits 0-7 and 16-23 of t.
_MXFP4_TO_BF16_PTX = tl.constexpr("""
        {
        .reg .b32 t, a, b, k126, nz;
        mov.b32 k126, 0x7E807E80;
        mov.b32 nz, 0x80008000;
        prmt.b32 t, $4, $4, 0x1100;""" + _nibble_pairs_ptx("$0", 12, 6, "$5")
    + _nibble_pairs_ptx("$2", 8, 2, "$5") + """
        prmt.b32 t, $4, $4, 0x3322;""" + _nibble_pairs_ptx("$1", 12, 6, "$6")
    + _nibble_pairs_ptx("$3", 8, 2, "$6") + """
        }
        """)


@triton.jit
def _mxfp4_to_bf16_ptx(packed, scale_bf16):
    """(rows, C) uint8 MXFP4 bytes and their bf16 scales -> (low nibbles, high nibbles), bf16.

    NVIDIA PTX (sm_80+), two values per 32-bit operation. Four bytes arrive in one register;
    prmt spreads two of them to bits 0-7 and 16-23, and shift-and-mask puts each nibble's sign
    at bit 15/31 and its three magnitude bits at 8..6/24..22 of a bf16 pair: value * 2**-126,
    exactly as in `_e2m1_to_f32`. Two fma.rn.bf16x2 (with -0 addend: a plain product that keeps
    the sign of zero) multiply by 2**126 and by the scale; both products are exact but the
    last, which rounds once like the fp32 path's conversion. Elementwise: output j depends on
    input byte j only, whatever bytes Triton packs into one invocation.
    """
    return tl.inline_asm_elementwise(
        asm=_MXFP4_TO_BF16_PTX,
        constraints="=r,=r,=r,=r,r,r,r",
        args=[packed, scale_bf16],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


# --- MMA_LANES words (`mxmoe.layouts.MmaLanesLayout`: the rotations are its MMA_LANES_ROTATIONS)

#: Sign at bits 15 / 31, magnitude at 8..6 / 24..22 of a bf16x2 register: 0x81C081C0 (and the
#: two pieces of register 3, 0x80C080C0 and 0x01000100) as the signed int32 Triton takes.
_REGISTER_MASK = tl.constexpr(0x81C081C0 - (1 << 32))
_PIECE_MASK_6 = tl.constexpr(0x80C080C0 - (1 << 32))
_PIECE_MASK_14 = tl.constexpr(0x01000100)


@triton.jit
def _rotl32(words, R: tl.constexpr):
    """Left rotation of int32 words by R (1..31): the arithmetic right shift masked."""
    return (words << R) | ((words >> (32 - R)) & ((1 << R) - 1))


@triton.jit
def _mma_lanes_register(words, I: tl.constexpr):
    """Operand register ``I`` (0..3) of MMA_LANES words (int32): the bf16x2 bit patterns of
    elements ``8I + 2t + {0, 1}`` times 2**-126 (element 0 in the low half)."""
    if I == 0:
        bits = words & _REGISTER_MASK
    elif I == 1:
        bits = _rotl32(words, 4) & _REGISTER_MASK
    elif I == 2:
        bits = _rotl32(words, 10) & _REGISTER_MASK
    else:
        bits = (_rotl32(words, 6) & _PIECE_MASK_6) | (_rotl32(words, 14) & _PIECE_MASK_14)
    return bits


@triton.jit
def _mma_lanes_pair_f32(register):
    """A register of `_mma_lanes_register` -> its two values times 2**-126 as float32 (bf16
    patterns moved to the top half: exact)."""
    low = (register << 16).to(tl.float32, bitcast=True)
    high = (register & -65536).to(tl.float32, bitcast=True)
    return low, high


@triton.jit
def _mma_lanes_pair_scaled(words, I: tl.constexpr, scale_f, DOT_DTYPE: tl.constexpr):
    """Elements ``8I + 2t + {0, 1}`` of MMA_LANES words in DOT_DTYPE, through float32: times
    2**126 (exact), then the scale (the one rounding)."""
    low, high = _mma_lanes_pair_f32(_mma_lanes_register(words, I))
    return ((low * 8.507059173023462e37 * scale_f).to(DOT_DTYPE),
            (high * 8.507059173023462e37 * scale_f).to(DOT_DTYPE))


def _mma_lanes_ptx(fold: bool) -> str:
    """PTX: $0..$7 = elements 8i + 2t + j (output 2i + j) of the word $8, bf16, times the scale
    given as a bf16 pattern in both halves of $9. Register i is a rotation and a mask of the
    word (shf.l.wrap: a funnel shift of the word with itself), register 3 two of them; each is
    then a bf16x2 pair worth value * 2**-126, which fma.rn.bf16x2 (with -0 addend: a plain
    product that keeps the sign of zero) multiplies by 2**126 and by the scale, as in
    `_mxfp4_to_bf16_ptx`; ``fold``: $9 is 2**126 times the scale already (one product)."""
    def register(out: str, bits: str) -> str:
        scale = "" if fold else "\n        fma.rn.bf16x2 o, o, k126, nz;"
        return (f"{bits}{scale}\n        fma.rn.bf16x2 o, o, $9, nz;"
                f"\n        mov.b32 {{{out}}}, o;")
    return ("""
        {
        .reg .b32 a, b, o, k126, nz;
        mov.b32 k126, 0x7E807E80;
        mov.b32 nz, 0x80008000;"""
            + register("$0, $1", """
        and.b32 o, $8, 0x81C081C0;""")
            + register("$2, $3", """
        shf.l.wrap.b32 a, $8, $8, 4;
        and.b32 o, a, 0x81C081C0;""")
            + register("$4, $5", """
        shf.l.wrap.b32 a, $8, $8, 10;
        and.b32 o, a, 0x81C081C0;""")
            + register("$6, $7", """
        shf.l.wrap.b32 a, $8, $8, 6;
        shf.l.wrap.b32 b, $8, $8, 14;
        and.b32 a, a, 0x80C080C0;
        and.b32 b, b, 0x01000100;
        or.b32 o, a, b;""")
            + """
        }
        """)


_MMA_LANES_TO_BF16_PTX = tl.constexpr(_mma_lanes_ptx(fold=False))
_MMA_LANES_TO_BF16_FOLDED_PTX = tl.constexpr(_mma_lanes_ptx(fold=True))


@triton.jit
def _mma_lanes_to_bf16_ptx(words, scale_pairs, FOLD: tl.constexpr):
    """(rows, W) MMA_LANES words (int32) and their scales as bf16x2 patterns (int32, the bf16
    scale in both halves; FOLD: times 2**126) -> eight (rows, W) bf16 tensors, output
    ``2i + j`` = element ``8i + 2t + j`` of the word's lane t. NVIDIA PTX (sm_80+); one word
    per invocation."""
    if FOLD:
        out = tl.inline_asm_elementwise(
            asm=_MMA_LANES_TO_BF16_FOLDED_PTX, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r",
            args=[words, scale_pairs], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise(
            asm=_MMA_LANES_TO_BF16_PTX, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r",
            args=[words, scale_pairs], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    return out


@triton.jit
def _mma_lanes_words_k_order(o0, o1, o2, o3, o4, o5, o6, o7, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """Eight (BLOCK_N, BLOCK_K / 8) tensors, ``o[2i + j]`` element ``8i + 2t + j`` of word
    ``4g + t`` -> the (BLOCK_N, BLOCK_K) tile in K order (element ``32g + 8i + 2t + j``). Joins,
    a permute and reshapes: only which element is which (no data moves when each thread holds
    its lanes' words, as for the MMA operand)."""
    w = tl.join(tl.join(tl.join(o0, o1), tl.join(o2, o3)),
                tl.join(tl.join(o4, o5), tl.join(o6, o7)))  # (n, word, j, i % 2, i // 2)
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 32, 4, 2, 2, 2))  # (n, g, t, j, i % 2, i // 2)
    w = tl.permute(w, (0, 1, 5, 4, 2, 3))  # (n, g, i // 2, i % 2, t, j): K order
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _e8m0_to_bf16_pairs(scales):
    """E8M0 bytes -> int32 whose halves are both the bfloat16 2**(s - 127): the byte is bf16's
    exponent field (s = 0: the subnormal 2**-127, mantissa bit 6; s = 255: NaN)."""
    s = scales.to(tl.int32)
    bits = tl.where(s == 0, 0x0040, s << 7)
    bits = tl.where(s == 255, 0x7FC0, bits)
    return bits | (bits << 16)


@triton.jit
def _folded_scale_pairs(scales):
    """E8M0 bytes s <= 128 -> int32 whose halves are both the bfloat16 2**126 * 2**(s - 127) =
    2**(s - 1), a normal for every such s (exponent field s + 126): one multiply-add."""
    return scales.to(tl.int32) * 0x00800080 + 0x3F003F00


@triton.jit
def _upcast_mma_lanes_words(words, scale, DEQUANT_PTX: tl.constexpr, DOT_DTYPE: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SCALE_FOLD: tl.constexpr):
    """(BLOCK_N, BLOCK_K / 8) MMA_LANES words (int32) and (BLOCK_N, BLOCK_K / 32) E8M0 scales
    (uint8) -> the (BLOCK_N, BLOCK_K) weights in DOT_DTYPE, in K order: the PTX conversion
    (bf16 on NVIDIA) or the same bits through float32 (elsewhere, the interpreter).
    SCALE_FOLD (PTX only): every scale byte is <= 128 (`mxmoe.layouts.scales_fold`), so
    2**126 and the scale are one bf16 factor: one product a register instead of two, and the
    scale's conversion one multiply-add instead of compares and selects."""
    GROUPS: tl.constexpr = BLOCK_K // 32
    if DEQUANT_PTX:
        if SCALE_FOLD:
            factors = _folded_scale_pairs(scale)
        else:
            factors = _e8m0_to_bf16_pairs(scale)
        pairs = tl.reshape(tl.broadcast_to(factors[:, :, None], (BLOCK_N, GROUPS, 4)),
                           (BLOCK_N, BLOCK_K // 8))
        o0, o1, o2, o3, o4, o5, o6, o7 = _mma_lanes_to_bf16_ptx(words, pairs, SCALE_FOLD)
    else:
        scale_f = tl.reshape(tl.broadcast_to(_e8m0_to_f32(scale.to(tl.int32))[:, :, None],
                                             (BLOCK_N, GROUPS, 4)), (BLOCK_N, BLOCK_K // 8))
        o0, o1 = _mma_lanes_pair_scaled(words, 0, scale_f, DOT_DTYPE)
        o2, o3 = _mma_lanes_pair_scaled(words, 1, scale_f, DOT_DTYPE)
        o4, o5 = _mma_lanes_pair_scaled(words, 2, scale_f, DOT_DTYPE)
        o6, o7 = _mma_lanes_pair_scaled(words, 3, scale_f, DOT_DTYPE)
    return _mma_lanes_words_k_order(o0, o1, o2, o3, o4, o5, o6, o7, BLOCK_N, BLOCK_K)


@triton.jit
def _e8m0_to_f32(scales):
    """E8M0 bytes (int32) -> float32 2**(s - 127): the byte is the float32 exponent field.

    s = 0 is 2**-127, a float32 subnormal (bit 22); s = 255 is NaN.
    """
    bits = tl.where(scales == 0, 0x00400000, scales << 23)
    bits = tl.where(scales == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _per_byte(group_scales, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """(BLOCK_N, GROUPS) scales -> (BLOCK_N, GROUPS * 16): each over its group's 16 bytes."""
    return tl.reshape(tl.broadcast_to(group_scales[:, :, None], (BLOCK_N, GROUPS, 16)),
                      (BLOCK_N, GROUPS * 16))


@triton.jit
def moe_gemm_kernel(
    a_ptr,  # (A_rows, K) activation dtype; row of pair p is p // A_ROW_DIV
    b_ptr,  # (E, N, K // 2) uint8 packed MXFP4, or (E, N, K) dense in DOT_DTYPE
    b_scale_ptr,  # (E, N, K // 32) uint8 E8M0 (MXFP4 modes; unused when dense)
    bias_ptr,  # (E, N) float (unused without HAS_BIAS)
    out_ptr,  # (num_pairs, N_OUT) activation dtype; N_OUT = N // 2 when gated, else N
    topk_weights_ptr,  # (num_pairs,) float32
    sorted_ids_ptr,  # (max_blocks * BLOCK_M,) int32 pair ids, sentinel = num_pairs
    expert_ids_ptr,  # (max_blocks,) int32 local expert of each block
    num_post_padded_ptr,  # (1,) int32 rows in use
    N,  # weight rows (2I for GEMM1, H for GEMM2)
    K,  # reduction size (H for GEMM1, I for GEMM2), a multiple of 32
    num_pairs,
    max_blocks,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_se, stride_sn, stride_sk,
    stride_bias_e, stride_bias_n,
    stride_om, stride_on,
    stride_os,  # between the SPLIT_K planes of the output (unused when SPLIT_K == 1)
    k_per_split,  # K elements per slice, a multiple of BLOCK_K (K when SPLIT_K == 1)
    alpha,
    limit,
    A_ROW_DIV: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    W_LAYOUT: tl.constexpr,
    GATED: tl.constexpr,  # GEMM1's gated epilogue: the output has N // 2 columns
    INTERLEAVED: tl.constexpr,  # gated: gate/up rows interleave (else [gate | up] halves)
    ACT_FN: tl.constexpr,  # gated: the activation's epilogue (`_epilogues`)
    ROUTER_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_DOT: tl.constexpr,  # dequant mode: two half-dots over even/odd K instead of one
    DEQUANT_PTX: tl.constexpr,  # dequant mode, bf16 on NVIDIA: `_mxfp4_to_bf16_ptx`
    SWAP_AB: tl.constexpr,  # accumulate C^T = W X^T: the weight tile is the dot's left operand
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 dots (exact), None (the default) otherwise
    DOT_FORMAT: tl.constexpr,  # tl.dot_scaled's name of DOT_DTYPE: "bf16" or "fp16"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per tile (gated: BLOCK_N // 2 gate/up pairs)
    BLOCK_K: tl.constexpr,  # a multiple of 32
    SPLIT_K: tl.constexpr,  # K slices, each its own program (GATED must be False)
):
    in_use, expert, pair, mask_m, a_row, pid_k, pid_n = _block_rows(
        tl.program_id(0), max_blocks, num_post_padded_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_pairs, A_ROW_DIV, SPLIT_K, BLOCK_M)
    if in_use == 0:
        return
    # The tile's weight rows (gated: alternating gate, up) and the K slice.
    rows64, mask_n = _tile_rows(pid_n, N, GATED, INTERLEAVED, BLOCK_N)
    k_begin, k_end = _k_range(pid_k, K, k_per_split, SPLIT_K)

    # With SWAP_AB the weights (dequantized in registers) are the left operand, which Hopper's
    # wgmma may take from registers, and the few tokens of a decode step the narrow side.
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_expert_ptr = b_ptr + expert * stride_be
    s_expert_ptr = b_scale_ptr + expert * stride_se
    GROUPS: tl.constexpr = BLOCK_K // 32

    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_g = k0 // 32 + tl.arange(0, GROUPS)
        if WEIGHT_MODE == MODE_DENSE:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(
                a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            ).to(DOT_DTYPE)
            w = tl.load(
                b_expert_ptr + rows64[:, None] * stride_bn + offs_k[None, :] * stride_bk,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0,
            )
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            if W_LAYOUT == LAYOUT_MMA_LANES:
                # The launcher's int32 view: one word per MMA lane (strides in words).
                offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                packed = tl.load(
                    b_expert_ptr + rows64[:, None] * stride_bn + offs_kw[None, :] * stride_bk,
                    mask=mask_n[:, None] & (offs_kw[None, :] < K // 8), other=0,
                )  # (BLOCK_N, BLOCK_K // 8) int32
            else:
                offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                mask_kb = offs_kb < K // 2
                packed = tl.load(
                    b_expert_ptr + rows64[:, None] * stride_bn + offs_kb[None, :] * stride_bk,
                    mask=mask_n[:, None] & mask_kb[None, :], other=0,
                )  # (BLOCK_N, BLOCK_K // 2) uint8
            scale = tl.load(
                s_expert_ptr + rows64[:, None] * stride_sn + offs_g[None, :] * stride_sk,
                mask=mask_n[:, None] & (offs_g[None, :] < K // 32), other=0,
            )  # (BLOCK_N, GROUPS) uint8
            if WEIGHT_MODE == MODE_SCALED:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(
                    a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0,
                ).to(DOT_DTYPE)
                if SWAP_AB:
                    acc = tl.dot_scaled(packed, scale, "e2m1", tl.trans(a), None, DOT_FORMAT, acc)
                else:
                    acc = tl.dot_scaled(a, None, DOT_FORMAT, tl.trans(packed), scale, "e2m1", acc)
            else:
                codes = packed.to(tl.int32)
                scale_f = _e8m0_to_f32(scale.to(tl.int32))
                if (SPLIT_DOT or W_LAYOUT == LAYOUT_GROUP_HALVES) and \
                        W_LAYOUT != LAYOUT_MMA_LANES:
                    # Two dots over K/2 each, one for the low nibbles and one for the high. Plain
                    # layout: the low nibbles are the even K indices, the high the odd, so A is
                    # read at stride 2. Group halves: they are the first and the second 16 of
                    # each 32-group, so A is read as runs of 16 contiguous elements.
                    offs_h = tl.arange(0, BLOCK_K // 2)
                    if W_LAYOUT == LAYOUT_GROUP_HALVES:  # the halves of each 32-group
                        offs_k2 = k0 + (offs_h // 16) * 32 + offs_h % 16
                        step_hi = 16
                    else:
                        offs_k2 = k0 + 2 * offs_h
                        step_hi = 1
                    mask_a = mask_m[:, None] & (offs_k2[None, :] < K)
                    a_base = a_ptr + a_row[:, None] * stride_am + offs_k2[None, :] * stride_ak
                    a_even = tl.load(a_base, mask=mask_a, other=0.0).to(DOT_DTYPE)
                    a_odd = tl.load(a_base + step_hi * stride_ak, mask=mask_a,
                                    other=0.0).to(DOT_DTYPE)
                    if DEQUANT_PTX:
                        # The conversion yields the low and high nibbles apart: no re-interleave.
                        scale_b = _per_byte(scale_f.to(tl.bfloat16), BLOCK_N, GROUPS)
                        w_lo, w_hi = _mxfp4_to_bf16_ptx(packed, scale_b)
                    else:
                        scale_h = _per_byte(scale_f, BLOCK_N, GROUPS)
                        w_lo = (_e2m1_to_f32(codes & 0xF) * scale_h).to(DOT_DTYPE)
                        w_hi = (_e2m1_to_f32(codes >> 4) * scale_h).to(DOT_DTYPE)
                    if SWAP_AB:
                        acc = tl.dot(w_lo, tl.trans(a_even), acc, input_precision=DOT_PRECISION)
                        acc = tl.dot(w_hi, tl.trans(a_odd), acc, input_precision=DOT_PRECISION)
                    else:
                        acc = tl.dot(a_even, tl.trans(w_lo), acc, input_precision=DOT_PRECISION)
                        acc = tl.dot(a_odd, tl.trans(w_hi), acc, input_precision=DOT_PRECISION)
                else:
                    # One dot: re-interleave the nibbles into the (BLOCK_N, BLOCK_K) tile.
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(
                        a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0,
                    ).to(DOT_DTYPE)
                    if W_LAYOUT == LAYOUT_MMA_LANES:
                        # Words decoded into K order (registers only).
                        w = _upcast_mma_lanes_words(packed, scale, DEQUANT_PTX, DOT_DTYPE,
                                                    BLOCK_N, BLOCK_K, False)
                    elif DEQUANT_PTX:
                        scale_b = _per_byte(scale_f.to(tl.bfloat16), BLOCK_N, GROUPS)
                        w_lo, w_hi = _mxfp4_to_bf16_ptx(packed, scale_b)
                        w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
                    else:
                        w = _e2m1_to_f32(tl.reshape(tl.join(codes & 0xF, codes >> 4),
                                                    (BLOCK_N, BLOCK_K)))
                        w = tl.reshape(w, (BLOCK_N, GROUPS, 32)) * scale_f[:, :, None]
                        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(DOT_DTYPE)
                    if SWAP_AB:
                        acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
                    else:
                        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if SWAP_AB:
        acc = tl.trans(acc)
    _epilogue(acc, expert, pair, mask_m, rows64, mask_n, pid_k, pid_n, N, bias_ptr, out_ptr,
              topk_weights_ptr, stride_bias_e, stride_bias_n, stride_om, stride_on, stride_os,
              alpha, limit, GATED, ACT_FN, ROUTER_WEIGHT, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def topk_sum_kernel(
    inter_ptr,  # (M * TOP_K, H) per-pair outputs of GEMM2 (rows of remote pairs never written)
    topk_ids_ptr,  # (M * TOP_K,) global expert ids
    expert_map_ptr,  # (E_global,) local id or -1 (unused without HAS_MAP)
    out_ptr,  # (M, H)
    H,
    num_global_experts,
    num_local_experts,
    stride_im, stride_ih,
    stride_om, stride_oh,
    stride_is,  # between the split-K planes of inter (unused when NUM_SPLITS == 1)
    TOP_K: tl.constexpr,
    HAS_MAP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # GEMM2's split-K planes, summed here
):
    """out[m] = sum over slots j whose expert is local of inter[m * TOP_K + j] (and over the
    split-K planes of each), in fp32, in a fixed order (deterministic).
    Grid: (M, cdiv(H, BLOCK_H))."""
    m = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(TOP_K):
        pair = m * TOP_K + j
        # int64 until the range checks, as in the alignment: a wrapped id must not pass them.
        expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
        local = expert
        if HAS_MAP:
            in_range = (expert >= 0) & (expert < num_global_experts)
            local = tl.load(expert_map_ptr + expert, mask=in_range, other=-1).to(tl.int64)
        # Broadcast the scalar verdict over the row (a scalar & block mask trips the interpreter).
        local_h = tl.full((BLOCK_H,), 0, tl.int64) + local
        valid_h = (local_h >= 0) & (local_h < num_local_experts)
        for split in range(NUM_SPLITS):
            row = tl.load(inter_ptr + split * stride_is + pair * stride_im + offs_h * stride_ih,
                          mask=mask_h & valid_h, other=0.0)
            acc += row.to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_h * stride_oh, acc.to(out_ptr.dtype.element_ty),
             mask=mask_h)


@triton.jit
def split_activation_kernel(
    partial_ptr,  # (NUM_SPLITS, num_pairs, 2I) float32: GEMM1's pre-activation K-slice sums
    out_ptr,  # (num_pairs, I) activation dtype
    inter_size,  # I
    stride_ps, stride_pm, stride_pn,
    stride_om, stride_on,
    alpha,
    limit,
    INTERLEAVED: tl.constexpr,  # gate/up rows interleave (else [gate | up] halves)
    ACT_FN: tl.constexpr,  # the activation's epilogue (`_epilogues`)
    NUM_SPLITS: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """GEMM1's epilogue after split-K: sum the planes in order, then the gated activation, as
    `moe_gemm_kernel` does it. Bias and routing weight are already in the sums. Rows of pairs
    that GEMM1 did not write (remote experts) come out as garbage that nothing reads.
    Grid: (num_pairs, cdiv(I, BLOCK_I))."""
    row = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    mask = cols < inter_size
    if INTERLEAVED:
        gate_cols = 2 * cols
        up_cols = 2 * cols + 1
    else:
        gate_cols = cols
        up_cols = cols + inter_size
    gate = tl.zeros((BLOCK_I,), tl.float32)
    up = tl.zeros((BLOCK_I,), tl.float32)
    for split in range(NUM_SPLITS):
        base = partial_ptr + split * stride_ps + row * stride_pm
        gate += tl.load(base + gate_cols * stride_pn, mask=mask, other=0.0)
        up += tl.load(base + up_cols * stride_pn, mask=mask, other=0.0)
    result = ACT_FN(gate, up, alpha, limit)
    tl.store(out_ptr + row * stride_om + cols * stride_on, result.to(out_ptr.dtype.element_ty),
             mask=mask)
