"""The MXFP4 format: packed E2M1 codes with one E8M0 scale per 32 elements along the last axis.

Pure torch, any device. This module is the specification of the format for every kernel.
"""

from __future__ import annotations

import enum
import math

import torch

from .layouts import PLAIN, Layout, get_layout
from .constants import (
    BYTES_PER_BLOCK,
    E8M0_EXPONENT_BIAS,
    E8M0_MAX_FINITE,
    E8M0_NAN,
    F4_E2M1_MAX_EXPONENT,
    F4_E2M1_SIGN_BIT,
    F4_E2M1_VALUES,
    MXFP4_BLOCK_SIZE,
)

__all__ = [
    "MXFP4Tensor",
    "ScaleRounding",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "e2m1_to_float",
    "e8m0_to_float",
]


class ScaleRounding(str, enum.Enum):
    """How `quantize_mxfp4` picks the shared exponent of a 32-element block (amax = max |x|)."""

    #: OCP rule: scale = 2**(floor(log2(amax)) - 2); elements round half-to-even, saturate at ±6.
    FLOOR = "floor"
    #: triton_kernels rule: scale = 2**ceil(log2(amax / 6)); every |x| / scale <= 6, no saturation.
    CEIL = "ceil"


def _e2m1_table(device: torch.device) -> torch.Tensor:
    magnitudes = torch.tensor(F4_E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes])


def _e8m0_table(device: torch.device) -> torch.Tensor:
    # Every 2**(s - 127), s in [0, 254], is exact in float32 (2**-127 as a subnormal).
    values = [math.ldexp(1.0, s - E8M0_EXPONENT_BIAS) for s in range(E8M0_NAN)] + [math.nan]
    return torch.tensor(values, dtype=torch.float32, device=device)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode 4-bit E2M1 codes (uint8 values 0..15) to float32."""
    return _e2m1_table(codes.device)[codes.long()]


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes to float32: 2**(s - 127), and NaN for 255."""
    return _e8m0_table(scales.device)[scales.long()]


def _unpack_codes(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K]; low nibble is the even index."""
    low = blocks & 0x0F
    high = blocks >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode packed MXFP4 to `dtype`: blocks uint8 [..., K/2], scales uint8 [..., K/32] -> [..., K]."""
    return MXFP4Tensor(blocks, scales).dequantize(dtype)


class MXFP4Tensor:
    """A tensor stored as MXFP4: the blocks, the scales and the logical shape, as one object.

    Args:
        blocks: uint8 ``[..., K // 2]``; in the plain layout byte ``j`` holds code ``2j`` in its
            low nibble and code ``2j + 1`` in its high nibble.
        scales: uint8 ``[..., K // 32]``; E8M0, ``2 ** (s - 127)``, 255 is NaN.
        layout: how the codes are ordered in ``blocks`` (`mxmoe.layouts`); ``"plain"`` is the
            checkpoint's order. `to_layout` converts, bit-exactly.

    The logical shape is ``[..., K]``. Indexing selects along the leading dimensions (for expert
    weights ``[E, N, K]``, ``w[e]`` is expert ``e``) and returns views, in the same layout.
    """

    # _signature: what `mxmoe.plans` keys this weight on, computed on first use. The object is
    # treated as immutable: its tensors are not replaced, nor their shapes changed in place.
    __slots__ = ("blocks", "scales", "layout", "_signature")

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor,
                 layout: Layout | str = PLAIN):
        if not isinstance(blocks, torch.Tensor) or not isinstance(scales, torch.Tensor):
            raise TypeError(
                f"MXFP4Tensor: blocks and scales must be torch.Tensors, got "
                f"{type(blocks).__name__} and {type(scales).__name__}"
            )
        if blocks.dtype != torch.uint8:
            raise TypeError(f"MXFP4Tensor: blocks must be uint8, got {blocks.dtype}")
        if scales.dtype != torch.uint8:
            raise TypeError(f"MXFP4Tensor: scales must be uint8 (E8M0), got {scales.dtype}")
        if blocks.dim() < 1:
            raise ValueError("MXFP4Tensor: blocks must have at least one dimension [..., K/2]")
        if scales.dim() != blocks.dim() or scales.shape[:-1] != blocks.shape[:-1]:
            raise ValueError(
                f"MXFP4Tensor: scales shape {tuple(scales.shape)} does not match blocks shape "
                f"{tuple(blocks.shape)}: expected {tuple(blocks.shape[:-1])} + (K/32,)"
            )
        if blocks.shape[-1] != scales.shape[-1] * BYTES_PER_BLOCK:
            raise ValueError(
                f"MXFP4Tensor: blocks have {blocks.shape[-1]} bytes per row (K = "
                f"{2 * blocks.shape[-1]}) but scales have {scales.shape[-1]} per row; expected "
                f"{BYTES_PER_BLOCK} bytes (32 elements) per scale, i.e. blocks [..., "
                f"{scales.shape[-1] * BYTES_PER_BLOCK}]"
            )
        if blocks.device != scales.device:
            raise ValueError(
                f"MXFP4Tensor: blocks on {blocks.device} and scales on {scales.device}: "
                f"expected one device"
            )
        self.blocks = blocks
        self.scales = scales
        self.layout = get_layout(layout)
        self._signature = None

    def __getstate__(self):
        # A copy (copy, deepcopy, pickle) has new tensors: it computes its own signature.
        return self.blocks, self.scales, self.layout

    def __setstate__(self, state):
        self.blocks, self.scales, self.layout = state
        self._signature = None

    @classmethod
    def from_gpt_oss_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor) -> "MXFP4Tensor":
        """Wrap gpt-oss checkpoint tensors: blocks ``[..., K/32, 16]``, scales ``[..., K/32]``.

        The result's blocks are a view of the given tensor (the same bytes), not a copy.
        """
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(
                f"from_gpt_oss_blocks: blocks must be a torch.Tensor, got {type(blocks).__name__}"
            )
        if blocks.dim() < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
            raise ValueError(
                f"from_gpt_oss_blocks: blocks must be [..., K/32, {BYTES_PER_BLOCK}], got "
                f"{tuple(blocks.shape)}"
            )
        return cls(blocks.flatten(-2), scales)

    @property
    def shape(self) -> torch.Size:
        """The logical shape ``[..., K]``."""
        return torch.Size((*self.blocks.shape[:-1], self.blocks.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def dim(self) -> int:
        return self.blocks.dim()

    @property
    def nbytes(self) -> int:
        """Bytes in memory: the packed codes plus the scales (4.25 bits a weight)."""
        return self.blocks.numel() * self.blocks.element_size() + self.scales.numel()

    def to(self, device) -> "MXFP4Tensor":
        return MXFP4Tensor(self.blocks.to(device), self.scales.to(device), self.layout)

    def contiguous(self) -> "MXFP4Tensor":
        if self.blocks.is_contiguous() and self.scales.is_contiguous():
            return self
        return MXFP4Tensor(self.blocks.contiguous(), self.scales.contiguous(), self.layout)

    def to_layout(self, layout: Layout | str) -> "MXFP4Tensor":
        """The same weights in ``layout`` (through the plain layout; bit-exact both ways).
        Returns ``self`` when already there. Do this once, at load time: it copies."""
        layout = get_layout(layout)
        if layout == self.layout:
            return self
        blocks, scales = self.layout.to_plain(self.blocks, self.scales)
        blocks, scales = layout.from_plain(blocks, scales)
        return MXFP4Tensor(blocks, scales, layout)

    def plain(self) -> "MXFP4Tensor":
        """The weights in the checkpoint's (plain) layout: what checkpoint writers store."""
        return self.to_layout(PLAIN)

    def __getitem__(self, index) -> "MXFP4Tensor":
        # Only leading dimensions: a trailing index would cut through packed bytes.
        if not isinstance(index, tuple):
            index = (index,)
        if Ellipsis in index or len(index) >= self.blocks.dim():
            raise IndexError(
                f"MXFP4Tensor indexes only its leading {self.blocks.dim() - 1} dimension(s), "
                f"got {len(index)} index(es)"
            )
        return MXFP4Tensor(self.blocks[index], self.scales[index], self.layout)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode to ``dtype`` (computed in float32, then cast), from any layout. Scale 255
        decodes to NaN."""
        blocks, scales = self.layout.to_plain(self.blocks, self.scales)
        values = e2m1_to_float(_unpack_codes(blocks))
        scale = e8m0_to_float(scales).repeat_interleave(MXFP4_BLOCK_SIZE, dim=-1)
        return (values * scale).to(dtype)

    def __repr__(self) -> str:
        layout = "" if self.layout == PLAIN else f", layout={self.layout.name}"
        return f"MXFP4Tensor(shape={tuple(self.shape)}, device={self.device}{layout})"


def _shared_exponent(amax: torch.Tensor, rounding: ScaleRounding) -> torch.Tensor:
    """Unbiased int32 exponent of each block's scale, from its float32 amax (> 0, finite)."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    # floor(log2(amax)) = exponent - 1, exactly, without a rounded log.
    floor_log2 = exponent - 1
    if rounding is ScaleRounding.FLOOR:
        return floor_log2 - F4_E2M1_MAX_EXPONENT
    # ceil(log2(amax / 6)): the smallest e with 6 * 2**e >= amax. 6 * 2**(exponent - 3) equals
    # 0.75 * 2**exponent, so e = exponent - 3 unless the mantissa exceeds 0.75.
    return exponent - 3 + (mantissa > 0.75).to(exponent.dtype)


def _round_to_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Magnitude codes 0..7 of |scaled|, round half to even (even code = mantissa bit 0), max 6."""
    a = scaled.abs()
    # Each midpoint goes to the neighbour whose code is even: 0.25 -> 0, 0.75 -> 1.0,
    # 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0; above 6 saturates to 6.
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    )
    return code.to(torch.uint8)


#: Elements of ``x`` quantized at once: `quantize_mxfp4` works on chunks of whole rows so that
#: its float temporaries stay near this size, however large the tensor (a gpt-oss-120b w13 is
#: 2.1G elements).
QUANTIZE_CHUNK_ELEMENTS = 1 << 24


def quantize_mxfp4(
    x: torch.Tensor,
    *,
    scale_rounding: ScaleRounding | str = ScaleRounding.FLOOR,
) -> MXFP4Tensor:
    """Quantize ``x [..., K]`` (float) to MXFP4 along its last dimension (K % 32 == 0).

    - ``"floor"`` (OCP): scale = 2**(floor(log2(amax)) - 2); x / scale rounded half-to-even onto
      the E2M1 grid and saturated at ±6.
    - ``"ceil"`` (OpenAI triton_kernels): scale = 2**ceil(log2(amax / 6)); nothing saturates;
      elements still round half-to-even.

    An all-zero block gets scale byte 0; a block holding NaN or ±Inf gets the NaN scale (255).
    Scale exponents outside E8M0's range are clamped to [2**-127, 2**127]. The sign of each
    element is kept, so a negative value that rounds to zero becomes -0 (code 8). float64 input
    is quantized in float64 (rounding it to float32 first would round twice).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize_mxfp4: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_mxfp4: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % MXFP4_BLOCK_SIZE != 0:
        raise ValueError(
            f"quantize_mxfp4: the last dimension must be a multiple of {MXFP4_BLOCK_SIZE}, got "
            f"shape {tuple(x.shape)}"
        )
    try:
        rounding = ScaleRounding(scale_rounding)
    except ValueError:
        raise ValueError(
            f"quantize_mxfp4: scale_rounding must be one of "
            f"{[r.value for r in ScaleRounding]}, got {scale_rounding!r}"
        ) from None

    k = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    blocks = torch.empty(rows.shape[0], k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows.shape[0], k // MXFP4_BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    rows_per_chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        blocks[chunk], scales[chunk] = _quantize_rows(rows[chunk], rounding)
    return MXFP4Tensor(
        blocks.reshape(*x.shape[:-1], k // 2),
        scales.reshape(*x.shape[:-1], k // MXFP4_BLOCK_SIZE),
    )


def _quantize_rows(
    rows: torch.Tensor, rounding: ScaleRounding
) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[R, K]`` -> (blocks uint8 ``[R, K/2]``, scales uint8 ``[R, K/32]``)."""
    work_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    groups = rows.to(work_dtype).reshape(rows.shape[0], -1, MXFP4_BLOCK_SIZE)
    amax = groups.abs().amax(dim=-1)
    not_finite = ~torch.isfinite(amax)
    is_zero = amax == 0
    safe_amax = torch.where(not_finite | is_zero, torch.ones_like(amax), amax)

    exponent = _shared_exponent(safe_amax, rounding)
    biased = (exponent + E8M0_EXPONENT_BIAS).clamp(0, E8M0_MAX_FINITE)
    biased = torch.where(is_zero, torch.zeros_like(biased), biased)
    biased = torch.where(not_finite, torch.full_like(biased, E8M0_NAN), biased)

    # 1 / scale is an exact power of two in float32 for every biased exponent in [0, 254], so
    # the product is exact (only results far below E2M1's resolution can lose bits).
    inv_scale = e8m0_to_float((E8M0_MAX_FINITE - biased.clamp(max=E8M0_MAX_FINITE)).to(torch.uint8))
    scaled = groups * inv_scale.unsqueeze(-1)
    scaled = torch.where(not_finite.unsqueeze(-1), torch.zeros_like(scaled), scaled)

    magnitude = _round_to_e2m1(scaled)
    sign = torch.where(torch.signbit(scaled), F4_E2M1_SIGN_BIT, 0).to(torch.uint8)
    codes = (magnitude | sign).reshape(rows.shape[0], -1)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, biased.to(torch.uint8)
