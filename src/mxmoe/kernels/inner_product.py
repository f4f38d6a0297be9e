"""The inner products the fused-MoE GEMM kernel can use (its ``WEIGHT_MODE`` constexpr)."""

import enum


class InnerProduct(enum.IntEnum):
    #: MXFP4 codes dequantized to the dot dtype in registers, then `tl.dot`.
    DEQUANT = 0
    #: MXFP4 codes and scales straight into `tl.dot_scaled`.
    SCALED = 1
    #: dense weights in the dot dtype, `tl.dot`.
    DENSE = 2
