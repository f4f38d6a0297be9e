"""Named numbers of the MXFP4 format (OCP Microscaling v1.0, MX FP4) and of gpt-oss."""

#: Elements that share one E8M0 scale.
MXFP4_BLOCK_SIZE = 32
#: Two 4-bit codes per byte: low nibble = even K index, high nibble = odd K index.
CODES_PER_BYTE = 2
#: Packed bytes per scale block.
BYTES_PER_BLOCK = MXFP4_BLOCK_SIZE // CODES_PER_BYTE

#: Largest E2M1 magnitude.
F4_E2M1_MAX = 6.0
#: Exponent of the largest E2M1 magnitude (6 = 1.5 * 2**2).
F4_E2M1_MAX_EXPONENT = 2
#: Magnitudes of the E2M1 codes 0..7; codes 8..15 are the same negated (bit 3 is the sign).
F4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Sign bit of an E2M1 code.
F4_E2M1_SIGN_BIT = 0x8

#: An E8M0 byte s means 2**(s - 127).
E8M0_EXPONENT_BIAS = 127
#: The E8M0 byte that encodes NaN.
E8M0_NAN = 255
#: Largest E8M0 byte that encodes a number (2**127).
E8M0_MAX_FINITE = 254

#: gpt-oss swiglu defaults ("swigluoai" in vLLM).
GPT_OSS_SWIGLU_ALPHA = 1.702
GPT_OSS_SWIGLU_LIMIT = 7.0
