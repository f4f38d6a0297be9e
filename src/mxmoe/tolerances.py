"""The tolerance policy of `mxmoe check` and `mxmoe bench` (and what the probe allows).

The error is ``max |out - ref| / max |ref|`` against the float32 reference on the same quantized
weights. A wrong kernel is off by O(1); 16-bit rounding of the activations alone gives ~4e-3.
Nothing here imports torch at module import (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

__all__ = ["HALF_PRECISION_TOLERANCE", "FP32_TOLERANCE", "BF16_INNER_PRODUCT", "tolerance_for"]

#: Allowed error of a path whose arithmetic rounds to 16 bits / computes in fp32.
HALF_PRECISION_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-4
#: Backends whose inner product takes the activations as bf16 whatever their dtype.
BF16_INNER_PRODUCT = frozenset({"triton_scaled"})


def tolerance_for(path: str, dtype) -> float:
    """The tolerance of ``path`` (a backend or benchmark path name) on activations of ``dtype``:
    `HALF_PRECISION_TOLERANCE` where its arithmetic rounds to 16 bits (bf16/fp16 activations,
    or an inner product that takes them as bf16), `FP32_TOLERANCE` where it computes in fp32."""
    import torch

    if dtype != torch.float32 or path in BF16_INNER_PRODUCT:
        return HALF_PRECISION_TOLERANCE
    return FP32_TOLERANCE
