"""The MXFP4 format, bit for bit: decode, nibble order, quantization rules, gpt-oss layout.

Every expected value here is computed in the test from a literal table and `math.ldexp`, not
from mxmoe's own tables. Comparisons have zero tolerance: float32 bit patterns are compared
(so -0 differs from +0) and NaN is compared by position.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mxmoe
import mxmoe.format
from mxmoe import MXFP4Tensor, ScaleRounding, dequantize_mxfp4, quantize_mxfp4
from mxmoe.format import e2m1_to_float, e8m0_to_float

#: E2M1 code -> value, written out from the OCP spec (bit 3 = sign, so code 8 is -0).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
EDGE_SCALES = [0, 1, 126, 127, 128, 254, 255]
RULES = ["floor", "ceil"]
U8 = torch.uint8


def expected_value(code: int, scale: int) -> float:
    """E2M1[code] * 2**(scale - 127) in float64; the E8M0 byte 255 is NaN."""
    return math.nan if scale == 255 else math.ldexp(E2M1[code], scale - 127)


def pack(codes: list[int]) -> list[int]:
    """Two codes a byte: the even index in the low nibble, the odd index in the high nibble."""
    return [codes[i] | codes[i + 1] << 4 for i in range(0, len(codes), 2)]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions, and bit patterns everywhere else (-0 != +0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), (actual, expected)
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64,
                 torch.float16: torch.int16, torch.bfloat16: torch.int16}[actual.dtype]
    assert torch.equal(actual[~nan].view(int_dtype), expected[~nan].view(int_dtype)), (
        actual, expected)


def one_block(values, fill=0.0, dtype=torch.float32) -> torch.Tensor:
    """A 32-element block starting with ``values``, padded with ``fill``."""
    return torch.tensor(list(values) + [fill] * (32 - len(values)), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def test_e2m1_table_matches_the_spec_including_negative_zero():
    assert_bits_equal(e2m1_to_float(torch.arange(16, dtype=torch.uint8)),
                      torch.tensor(E2M1, dtype=torch.float32))
    assert torch.signbit(e2m1_to_float(torch.tensor([8], dtype=torch.uint8))).item()


def test_e8m0_decodes_every_byte_to_a_power_of_two_and_255_to_nan():
    expected = torch.tensor([expected_value(2, s) for s in range(256)], dtype=torch.float64)
    assert_bits_equal(e8m0_to_float(torch.arange(256).to(torch.uint8)),
                      expected.to(torch.float32))


@pytest.mark.parametrize("scale", EDGE_SCALES, ids=lambda s: f"scale={s}")
def test_all_16_codes_decode_exactly_under_edge_scales(scale):
    # Codes 0..15 twice fill one 32-element block. At scale 254 the codes of magnitude >= 2
    # exceed float32's range (2 * 2**127 = 2**128) and decode to +-inf, as the float64 value
    # rounded to float32 does; at scales 0 and 1 the small codes are float32 subnormals.
    codes = list(range(16)) * 2
    blocks = torch.tensor([pack(codes)], dtype=torch.uint8)
    scales = torch.tensor([[scale]], dtype=torch.uint8)
    expected = torch.tensor([[expected_value(c, scale) for c in codes]], dtype=torch.float64)

    out = MXFP4Tensor(blocks, scales).dequantize()
    assert_bits_equal(out, expected.to(torch.float32))
    if scale != 255:
        assert torch.signbit(out[0, 8]).item(), "code 8 is -0: its sign bit must be set"
    assert_bits_equal(dequantize_mxfp4(blocks, scales), expected.to(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scale", EDGE_SCALES, ids=lambda s: f"scale={s}")
def test_dequantize_to_half_dtypes_rounds_the_exact_value_once(dtype, scale):
    # Every finite value is exact in float32, so float32 -> dtype rounds once, like float64 ->
    # dtype. fp16 flushes the small scales to 0 and overflows past 65504.
    codes = list(range(16)) * 2
    q = MXFP4Tensor(torch.tensor([pack(codes)], dtype=torch.uint8),
                    torch.tensor([[scale]], dtype=torch.uint8))
    expected = torch.tensor([[expected_value(c, scale) for c in codes]], dtype=torch.float64)
    assert_bits_equal(q.dequantize(dtype), expected.to(dtype))


def test_nibble_order_low_nibble_is_the_even_index():
    # 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1.
    q = MXFP4Tensor(torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8),
                    torch.tensor([[127]], dtype=torch.uint8))
    assert_bits_equal(q.dequantize()[0, :2], torch.tensor([0.5, 1.0]))


def test_hand_written_row_decodes_as_written():
    # Scale 128 doubles every value.
    # 0x21 -> [code 1, code 2]   = [0.5, 1.0]  * 2 = [1.0, 2.0]
    # 0x8F -> [code 15, code 8]  = [-6.0, -0.0] * 2 = [-12.0, -0.0]
    # 0x70 -> [code 0, code 7]   = [0.0, 6.0]  * 2 = [0.0, 12.0]
    # 0xA5 -> [code 5, code 10]  = [3.0, -1.0] * 2 = [6.0, -2.0]
    row = [0x21, 0x8F, 0x70, 0xA5] + [0x00] * 12
    q = MXFP4Tensor(torch.tensor([row], dtype=U8), torch.tensor([[128]], dtype=U8))
    expected = torch.tensor([1.0, 2.0, -12.0, -0.0, 0.0, 12.0, 6.0, -2.0] + [0.0] * 24)
    assert_bits_equal(q.dequantize()[0], expected)


def test_hand_written_row_is_what_quantize_writes():
    # amax 6 -> scale byte 127 under both rules, so each value is its own code.
    x = one_block([0.5, 1.0, -6.0, -0.0, 0.0, 6.0, 3.0, -1.0])
    for rule in RULES:
        q = quantize_mxfp4(x, scale_rounding=rule)
        assert q.blocks.tolist() == [0x21, 0x8F, 0x70, 0xA5] + [0x00] * 12
        assert q.scales.tolist() == [127]


def test_each_block_uses_its_own_scale():
    # Two blocks of code 2 (1.0) with scales 120 and 130: 2**-7 and 2**3.
    q = MXFP4Tensor(torch.full((1, 32), 0x22, dtype=torch.uint8),
                    torch.tensor([[120, 130]], dtype=torch.uint8))
    expected = torch.tensor([[2.0**-7] * 32 + [2.0**3] * 32])
    assert_bits_equal(q.dequantize(), expected)


# ---------------------------------------------------------------------------------------------
# Quantize: element rounding (block amax 6 -> scale 1 under both rules)
# ---------------------------------------------------------------------------------------------

#: (x, value it rounds to, why). Ties go to the neighbour with the even code (mantissa bit 0).
TIES = [
    (0.25, 0.0, "between 0 (code 0) and 0.5 (code 1): even code 0"),
    (0.75, 1.0, "between 0.5 (code 1) and 1.0 (code 2): even code 2"),
    (1.25, 1.0, "between 1.0 (code 2) and 1.5 (code 3): even code 2"),
    (1.75, 2.0, "between 1.5 (code 3) and 2.0 (code 4): even code 4"),
    (2.5, 2.0, "between 2.0 (code 4) and 3.0 (code 5): even code 4"),
    (3.5, 4.0, "between 3.0 (code 5) and 4.0 (code 6): even code 6"),
    (5.0, 4.0, "between 4.0 (code 6) and 6.0 (code 7): even code 6"),
]
#: Each tie's lower and upper grid neighbours.
NEIGHBOURS = {0.25: (0.0, 0.5), 0.75: (0.5, 1.0), 1.25: (1.0, 1.5), 1.75: (1.5, 2.0),
              2.5: (2.0, 3.0), 3.5: (3.0, 4.0), 5.0: (4.0, 6.0)}


def rounds_to(x: float, rule: str, dtype=torch.float32) -> torch.Tensor:
    """Quantize [x, 6, 0, ...] (amax 6: scale byte 127 under both rules) and decode x."""
    q = quantize_mxfp4(one_block([x, 6.0], dtype=dtype), scale_rounding=rule)
    assert q.scales.tolist() == [127]
    return q.dequantize()[0]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize("tie,value,why", TIES, ids=[f"{t}->{v}" for t, v, _ in TIES])
def test_ties_round_half_to_even(tie, value, why, sign, rule):
    # Negative ties mirror the positive ones; -0.25 keeps its sign and becomes -0 (code 8).
    assert_bits_equal(rounds_to(sign * tie, rule), torch.tensor(sign * value))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize("tie", list(NEIGHBOURS), ids=lambda t: f"{t}")
def test_one_ulp_off_a_tie_rounds_to_the_nearer_neighbour(tie, sign, rule):
    t = torch.tensor(tie)
    below = torch.nextafter(t, torch.tensor(0.0)).item()
    above = torch.nextafter(t, torch.tensor(8.0)).item()
    low, high = NEIGHBOURS[tie]
    assert_bits_equal(rounds_to(sign * below, rule), torch.tensor(sign * low))
    assert_bits_equal(rounds_to(sign * above, rule), torch.tensor(sign * high))


def test_float64_input_is_rounded_once_not_through_float32():
    # 0.25 + 2**-40 is above the 0.25 tie, so it rounds up to 0.5; rounding it to float32
    # first would land exactly on the tie and then round to 0.
    assert_bits_equal(rounds_to(0.25 + 2.0**-40, "floor", torch.float64), torch.tensor(0.5))
    assert_bits_equal(rounds_to(5.0 - 2.0**-40, "floor", torch.float64), torch.tensor(4.0))


def test_float64_values_beyond_float32_range_get_a_finite_scale():
    # 1e39 is finite in float64 and in MXFP4 (6 * 2**127 ~ 1.02e39), but inf in float32:
    # floor(log2(1e39)) = 129 -> exponent 127 -> byte 254, 1e39 / 2**127 = 5.88 -> 6.
    q = quantize_mxfp4(one_block([1e39], dtype=torch.float64))
    assert q.scales.tolist() == [254]
    assert q.blocks[0].item() & 0xF == 7


@pytest.mark.parametrize("rule", RULES)
def test_signs_are_kept_and_tiny_negatives_become_negative_zero(rule):
    x = one_block([-0.0, -0.1, 0.1, -6.0, 6.0])
    q = quantize_mxfp4(x, scale_rounding=rule)
    assert q.scales.tolist() == [127]
    assert_bits_equal(q.dequantize()[:5], torch.tensor([-0.0, -0.0, 0.0, -6.0, 6.0]))


# ---------------------------------------------------------------------------------------------
# Quantize: the scale of a block
# ---------------------------------------------------------------------------------------------

#: (amax, floor byte, ceil byte), by hand:
#: floor: 127 + floor(log2(amax)) - 2;   ceil: 127 + ceil(log2(amax / 6)).
SCALE_CASES = [
    (6.0, 127, 127),      # floor: log2 6 = 2.58 -> 2 - 2 = 0;     ceil: log2 1 = 0
    (4.0, 127, 127),      # floor: 2 - 2 = 0;                      ceil: log2 0.667 = -0.58 -> 0
    (7.0, 127, 128),      # floor: log2 7 = 2.81 -> 0;             ceil: log2 1.167 = 0.22 -> 1
    (3.0, 126, 126),      # floor: log2 3 = 1.58 -> 1 - 2 = -1;    ceil: log2 0.5 = -1
    (1.5, 125, 125),      # floor: log2 1.5 = 0.58 -> -2;          ceil: log2 0.25 = -2
    (1.6, 125, 126),      # floor: 0 - 2 = -2;                     ceil: log2 0.267 = -1.91 -> -1
    (1.0, 125, 125),      # floor: 0 - 2 = -2;                     ceil: log2 0.167 = -2.58 -> -2
    (12.0, 128, 128),     # floor: log2 12 = 3.58 -> 1;            ceil: log2 2 = 1
    (0.1, 121, 122),      # floor: log2 0.1 = -3.32 -> -4 - 2;     ceil: log2 0.0167 = -5.91 -> -5
    (2.0**-125 * 1.5, 0, 0),  # 6 * 2**-127: floor -125 - 2 = -127; ceil log2 2**-127 = -127
    (2.0**-126, 0, 0),    # floor: -128, clamped to 0;             ceil: -128.58 -> -128, clamped
    (2.0**-149, 0, 0),    # smallest float32 subnormal: -151 / -151.58 -> clamped to 0
    (3.4028234663852886e38, 252, 253),  # largest float32, 2**128 - 2**104: 127 - 2; 125.4 -> 126
]


@pytest.mark.parametrize("amax,floor_byte,ceil_byte", SCALE_CASES,
                         ids=[f"amax={a:g}" for a, _, _ in SCALE_CASES])
def test_scale_byte_of_each_rule(amax, floor_byte, ceil_byte):
    x = one_block([amax, -amax / 3])
    assert quantize_mxfp4(x, scale_rounding="floor").scales.tolist() == [floor_byte]
    assert quantize_mxfp4(x, scale_rounding=ScaleRounding.CEIL).scales.tolist() == [ceil_byte]


def test_default_rule_is_floor():
    x = one_block([7.0])
    assert quantize_mxfp4(x).scales.tolist() == [127]


@pytest.mark.parametrize("amax", [7.0, 6.5, 7.99, -7.0], ids=lambda a: f"amax={a}")
def test_floor_saturates_an_amax_above_0_75_of_its_binade_at_6(amax):
    # floor(log2 |amax|) = 2 -> scale 1, and |amax| / 1 > 6: it saturates to +-6.
    q = quantize_mxfp4(one_block([amax, 1.0]), scale_rounding="floor")
    assert q.scales.tolist() == [127]
    assert_bits_equal(q.dequantize()[:2], torch.tensor([math.copysign(6.0, amax), 1.0]))


def test_ceil_never_saturates():
    # amax 7 -> scale 2, 7 / 2 = 3.5 -> tie to 4 -> 8.0 (above 7, not clipped to 6).
    q = quantize_mxfp4(one_block([7.0]), scale_rounding="ceil")
    assert q.scales.tolist() == [128]
    assert q.dequantize()[0].item() == 8.0
    # On random data every |x| fits under 6 * scale.
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 10
    q = quantize_mxfp4(x, scale_rounding="ceil")
    scale = e8m0_to_float(q.scales).repeat_interleave(32, dim=-1)
    assert (x.abs() <= 6 * scale).all()


@pytest.mark.parametrize("rule", RULES)
def test_all_zero_block_gets_scale_byte_0_and_zero_codes(rule):
    x = torch.cat([torch.zeros(32), one_block([3.0])])
    q = quantize_mxfp4(x, scale_rounding=rule)
    assert q.scales.tolist() == [0, 126]
    assert q.blocks[:16].tolist() == [0] * 16


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_block_with_nan_or_inf_gets_the_nan_scale_and_others_are_untouched(bad, rule):
    x = torch.cat([one_block([1.0, bad]), one_block([6.0, 1.5])])
    q = quantize_mxfp4(x, scale_rounding=rule)
    assert q.scales.tolist() == [255, 127]
    out = q.dequantize()
    assert torch.isnan(out[:32]).all()
    assert_bits_equal(out[32:], one_block([6.0, 1.5]))


def test_tiny_amax_clamps_at_byte_0_and_flushes_what_is_below_its_resolution():
    # 2**-126 with scale 2**-127 is code 4 (2.0), exactly; 2**-149 / 2**-127 = 2**-22 -> 0.
    q = quantize_mxfp4(one_block([2.0**-126, 2.0**-149]))
    assert q.scales.tolist() == [0]
    assert_bits_equal(q.dequantize()[:2], torch.tensor([2.0**-126, 0.0]))


def test_huge_float64_amax_clamps_at_byte_254_and_saturates():
    # floor(log2(1e40)) = 132 -> exponent 130 -> clamped to 127 (byte 254); 1e40 / 2**127 = 59
    # saturates to 6.
    q = quantize_mxfp4(one_block([1e40, -1e40], dtype=torch.float64))
    assert q.scales.tolist() == [254]
    assert q.blocks[0].item() == 0xF7  # code 7 (+6), then code 15 (-6)


# ---------------------------------------------------------------------------------------------
# Quantize against an independent scalar quantizer, and requantization
# ---------------------------------------------------------------------------------------------


def quantize_block_by_hand(values: list[float], rule: str) -> tuple[list[int], int]:
    """One 32-value block -> (codes, scale byte), in float64 scalar code, without logarithms."""
    if not all(math.isfinite(v) for v in values):
        return [0] * 32, 255
    amax = max(abs(v) for v in values)
    if amax == 0:
        exponent = -127
    elif rule == "floor":
        exponent = 0  # largest e with 2**e <= amax, then minus 2
        while math.ldexp(1.0, exponent) > amax:
            exponent -= 1
        while math.ldexp(1.0, exponent + 1) <= amax:
            exponent += 1
        exponent -= 2
    else:
        exponent = 0  # smallest e with 6 * 2**e >= amax
        while math.ldexp(6.0, exponent) < amax:
            exponent += 1
        while math.ldexp(6.0, exponent - 1) >= amax:
            exponent -= 1
    exponent = min(max(exponent, -127), 127)
    codes = []
    for v in values:
        a = min(abs(v) / math.ldexp(1.0, exponent), 6.0)  # exact: a power-of-two division
        best = min(range(8), key=lambda c: (abs(E2M1[c] - a), c % 2))  # nearest, then even
        codes.append(best | (8 if math.copysign(1.0, v) < 0 else 0))
    return codes, exponent + 127


def assert_matches_hand_quantizer(x: torch.Tensor, rule: str) -> None:
    q = quantize_mxfp4(x, scale_rounding=rule)
    rows = x.reshape(-1, 32).tolist()
    for b, row in enumerate(rows):
        codes, scale = quantize_block_by_hand(row, rule)
        assert q.scales.reshape(-1)[b].item() == scale, (row, rule)
        if scale != 255:  # the codes of a NaN block are unspecified
            assert q.blocks.reshape(-1, 16)[b].tolist() == pack(codes), (row, rule)


@pytest.mark.parametrize("rule", RULES)
def test_random_blocks_match_the_hand_quantizer(rule):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 32, generator=g) * torch.logspace(-30, 30, 24).unsqueeze(1)
    # Values on the grid and on ties, scaled, to exercise the rounding at every scale.
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)
    x = torch.cat([x, torch.stack([grid * 2.0**-130, grid * 2.0**10, -grid * 2.0**-3])])
    assert_matches_hand_quantizer(x, rule)


float32s = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(float32s, min_size=32, max_size=32), rule=st.sampled_from(RULES))
def test_any_float32_block_matches_the_hand_quantizer(values, rule):
    assert_matches_hand_quantizer(torch.tensor(values, dtype=torch.float32), rule)


@pytest.mark.parametrize("rule", RULES)
def test_requantizing_dequantized_random_data_is_lossless(rule):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, 128, generator=g) * torch.logspace(-20, 20, 16).reshape(16, 1, 1)
    values = quantize_mxfp4(x, scale_rounding=rule).dequantize()
    assert_bits_equal(quantize_mxfp4(values, scale_rounding=rule).dequantize(), values)


# Scales up to 252 only: from 253 on, codes of magnitude >= 4 exceed float32 (4 * 2**126).
mxfp4_rows = st.tuples(
    st.lists(st.integers(0, 255), min_size=16 * 3, max_size=16 * 3),
    st.lists(st.integers(0, 252), min_size=3, max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(row=mxfp4_rows, rule=st.sampled_from(RULES))
def test_requantizing_any_mxfp4_values_is_lossless(row, rule):
    blocks, scales = row
    values = MXFP4Tensor(torch.tensor(blocks, dtype=torch.uint8),
                         torch.tensor(scales, dtype=torch.uint8)).dequantize()
    assert_bits_equal(quantize_mxfp4(values, scale_rounding=rule).dequantize(), values)


# ---------------------------------------------------------------------------------------------
# Quantize: memory-bounded chunks, shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_elements", [1, 64, 100, 1 << 30],
                         ids=["one row a chunk", "two rows", "uneven chunks", "one chunk"])
def test_quantizing_in_chunks_of_rows_gives_the_same_bytes(monkeypatch, chunk_elements):
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(3))
    whole = quantize_mxfp4(x)
    monkeypatch.setattr(mxmoe.format, "QUANTIZE_CHUNK_ELEMENTS", chunk_elements)
    chunked = quantize_mxfp4(x)
    assert torch.equal(chunked.blocks, whole.blocks)
    assert torch.equal(chunked.scales, whole.scales)


def test_quantize_holds_at_most_one_chunk_of_rows_at_a_time(monkeypatch):
    # The float temporaries are made per chunk: 35 rows of 64 with a 256-element budget go
    # through as 4-row chunks (the last one 3 rows), never as the whole tensor.
    seen = []
    quantize_rows = mxmoe.format._quantize_rows

    def recording(rows, rounding):
        seen.append(tuple(rows.shape))
        return quantize_rows(rows, rounding)

    monkeypatch.setattr(mxmoe.format, "_quantize_rows", recording)
    monkeypatch.setattr(mxmoe.format, "QUANTIZE_CHUNK_ELEMENTS", 256)
    quantize_mxfp4(torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(8)))
    assert seen == [(4, 64)] * 8 + [(3, 64)]


@pytest.mark.parametrize("shape", [(64,), (0, 64), (2, 3, 96), (4, 0)],
                         ids=["1-D", "no rows", "3-D", "K = 0"])
def test_quantize_keeps_the_leading_shape(shape):
    q = quantize_mxfp4(torch.ones(shape))
    assert q.shape == torch.Size(shape)
    assert q.blocks.shape == (*shape[:-1], shape[-1] // 2)
    assert q.scales.shape == (*shape[:-1], shape[-1] // 32)


def test_quantize_accepts_a_non_contiguous_tensor():
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4)).T
    assert torch.equal(quantize_mxfp4(x).blocks, quantize_mxfp4(x.contiguous()).blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_quantize_like_their_float32_values(dtype):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(quantize_mxfp4(x).blocks, quantize_mxfp4(x.float()).blocks)
    assert torch.equal(quantize_mxfp4(x).scales, quantize_mxfp4(x.float()).scales)


# ---------------------------------------------------------------------------------------------
# gpt-oss checkpoint layout
# ---------------------------------------------------------------------------------------------


def gpt_oss_style_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks ``[..., G, 16]``, scales ``[..., G]`` -> float32 ``[..., G * 32]``, the way
    gpt-oss's checkpoint loader decodes: a 16-entry table indexed by the low nibble (even
    elements) and the high nibble (odd elements), then ldexp by ``scale - 127``."""
    lut = torch.tensor(E2M1, dtype=torch.float32)
    *prefix, groups, nbytes = blocks.shape
    out = torch.empty(*prefix, groups, nbytes * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return out.reshape(*prefix, groups * nbytes * 2)


def test_gpt_oss_layout_decodes_like_the_gpt_oss_lookup_table():
    g = torch.Generator().manual_seed(6)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=g, dtype=torch.uint8)
    # ldexp gives inf, not NaN, for byte 255: compare over the numeric bytes 0..254.
    scales = torch.randint(0, 255, (3, 5, 4), generator=g, dtype=torch.uint8)
    scales[0, 0, :] = torch.tensor([0, 1, 127, 254], dtype=torch.uint8)
    q = MXFP4Tensor.from_gpt_oss_blocks(blocks, scales)
    assert q.shape == (3, 5, 128)
    assert_bits_equal(q.dequantize(), gpt_oss_style_decode(blocks, scales))


def test_gpt_oss_layout_is_a_view_not_a_copy():
    blocks = torch.zeros(2, 3, 16, dtype=torch.uint8)
    scales = torch.full((2, 3), 127, dtype=torch.uint8)
    q = MXFP4Tensor.from_gpt_oss_blocks(blocks, scales)
    assert q.blocks.data_ptr() == blocks.data_ptr()
    assert q.scales.data_ptr() == scales.data_ptr()
    blocks[1, 2, 15] = 0x70  # element 2*32 + 31 = 95 of row 1 becomes code 7
    assert q.dequantize()[1, 95].item() == 6.0


def test_gpt_oss_layout_rejects_a_last_dim_other_than_16():
    with pytest.raises(ValueError, match=r"\[\.\.\., K/32, 16\]"):
        MXFP4Tensor.from_gpt_oss_blocks(torch.zeros(2, 3, 8, dtype=torch.uint8),
                                        torch.zeros(2, 3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# MXFP4Tensor: construction, shape, indexing, device
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "blocks,scales,error,fragment",
    [
        (torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, 1, dtype=U8), TypeError,
         "blocks must be uint8, got torch.int8"),
        (torch.zeros(2, 16, dtype=U8), torch.zeros(2, 1), TypeError,
         "scales must be uint8 (E8M0), got torch.float32"),
        (torch.zeros(2, 16, dtype=U8).numpy(), torch.zeros(2, 1, dtype=U8), TypeError,
         "must be torch.Tensors, got ndarray"),
        (torch.zeros(2, 16, dtype=U8), torch.zeros(3, 1, dtype=U8), ValueError,
         "scales shape (3, 1) does not match blocks shape (2, 16)"),
        (torch.zeros(2, 16, dtype=U8), torch.zeros(2, dtype=U8), ValueError,
         "does not match blocks shape"),
        (torch.zeros(2, 16, dtype=U8), torch.zeros(2, 2, dtype=U8), ValueError,
         "blocks have 16 bytes per row"),
        (torch.zeros((), dtype=U8), torch.zeros((), dtype=U8), ValueError,
         "at least one dimension"),
    ],
    ids=["int8 blocks", "float scales", "numpy blocks", "leading dims differ",
         "scales missing a dim", "K/32 does not match K/2", "0-d"],
)
def test_constructor_rejects_bad_dtypes_and_shapes(blocks, scales, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        MXFP4Tensor(blocks, scales)


def test_shape_is_logical_and_nbytes_counts_4_25_bits_a_weight():
    q = MXFP4Tensor(torch.zeros(4, 6, 48, dtype=U8), torch.zeros(4, 6, 3, dtype=U8))
    assert q.shape == torch.Size([4, 6, 96])
    assert q.dim() == 3 and len(q) == 4
    assert q.nbytes * 8 == 4 * 6 * 96 * 4.25


def random_mxfp4(*shape, seed=7) -> MXFP4Tensor:
    g = torch.Generator().manual_seed(seed)
    *lead, k = shape
    return MXFP4Tensor(torch.randint(0, 256, (*lead, k // 2), generator=g, dtype=U8),
                       torch.randint(100, 150, (*lead, k // 32), generator=g, dtype=U8))


@pytest.mark.parametrize(
    "index",
    [1, -1, slice(1, 3), (2, 0), (slice(None), 1), torch.tensor([3, 0])],
    ids=["int", "negative", "slice", "two ints", "slice and int", "index tensor"],
)
def test_indexing_the_leading_dims_selects_the_same_values(index):
    q = random_mxfp4(4, 3, 64)
    assert_bits_equal(q[index].dequantize(), q.dequantize()[index])


def test_indexing_an_expert_is_a_view():
    q = random_mxfp4(4, 3, 64)
    assert q[2].blocks.data_ptr() == q.blocks[2].data_ptr()


@pytest.mark.parametrize("index", [(0, 0, 0), (Ellipsis, 0)], ids=["through K", "ellipsis"])
def test_indexing_through_the_packed_dim_is_refused(index):
    with pytest.raises(IndexError, match="leading"):
        random_mxfp4(4, 3, 64)[index]


def test_to_moves_blocks_and_scales_and_keeps_the_values():
    q = random_mxfp4(2, 3, 64)
    moved = q.to("cpu")
    assert moved.device == torch.device("cpu")
    assert_bits_equal(moved.dequantize(), q.dequantize())
    meta = q.to("meta")
    assert meta.blocks.device.type == "meta" and meta.scales.device.type == "meta"
    assert meta.shape == q.shape


def test_dequantize_mxfp4_function_equals_the_method():
    q = random_mxfp4(3, 64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert_bits_equal(dequantize_mxfp4(q.blocks, q.scales, dtype), q.dequantize(dtype))


def test_package_exports_the_format():
    assert mxmoe.MXFP4Tensor is MXFP4Tensor and mxmoe.quantize_mxfp4 is quantize_mxfp4


# ---------------------------------------------------------------------------------------------
# quantize_mxfp4 argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,kwargs,error,fragment",
    [
        (torch.zeros(4, 48), {}, ValueError, "multiple of 32, got shape (4, 48)"),
        (torch.zeros(33), {}, ValueError, "multiple of 32"),
        (torch.zeros(()), {}, ValueError, "multiple of 32"),
        (torch.zeros(64), {"scale_rounding": "nearest"}, ValueError,
         "scale_rounding must be one of ['floor', 'ceil'], got 'nearest'"),
        (torch.zeros(64, dtype=torch.int32), {}, TypeError, "floating tensor, got torch.int32"),
        ([0.0] * 32, {}, TypeError, "must be a torch.Tensor, got list"),
    ],
    ids=["K = 48", "K = 33", "0-d", "unknown rounding", "int input", "list input"],
)
def test_quantize_rejects_bad_arguments(x, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        quantize_mxfp4(x, **kwargs)
